"""Benchmark: two augmented views per image, 01's PIL path against 02's device path, per core.

  pil           01's train_transform twice per image in one loader process (what --data-path pil
                runs in each worker): PIL decode, crop, flip, jitter, grayscale, blur, normalise
  device        02's DeviceViews on --device: the file's bytes, torchvision decode, SimCLRViews on
                batches of --batch (what --data-path device runs; on CUDA, JPEGs decode on the GPU)
  device-cached the same with --cache-images: the decoded uint8 images stay in memory, so only the
                augmentation is timed
  pil-workers   the pil path as 02 runs it: a DataLoader with --workers loader processes
  device-workers the device path as 02 runs it: --workers processes read the files, this one
                decodes and augments

The in-process variants run on one thread (torch.set_num_threads(1)): views per second per core.
The -workers variants are wall-clock views per second of the whole loader. On CUDA the device
variants are synchronised before the clock stops. The images are --images JPEG files of
--source-size px (generated shapes, or the first of --data ROOT/train).

  python tests/bench_loader.py --image-size 64                        # CPU: 2,048 images of 64 px
  python tests/bench_loader.py --data ../cifar10-dev --image-size 32 --source-size 32
  python tests/bench_loader.py --device cuda --image-size 224 --source-size 256 --batch 512
"""
import argparse
import importlib
import json
import os
import sys
import tempfile
import time

import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import demo_data  # noqa: E402

extract = importlib.import_module("01_extract_init")
pretrain = importlib.import_module("02_pretrain")

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--image-size", type=int, default=64, help="side of the views")
parser.add_argument("--source-size", type=int, default=64, help="side of the generated JPEG files")
parser.add_argument("--images", type=int, default=2048)
parser.add_argument("--batch", type=int, default=256)
parser.add_argument("--data", default=None, help="use the first --images of ROOT/train instead of generated ones")
parser.add_argument("--device", default="cpu")
parser.add_argument("--rounds", type=int, default=3, help="each variant this many times, alternating; the best counts")
parser.add_argument("--workers", type=int, default=1, help="loader processes of the -workers variants")
parser.add_argument("--json", default=None)


def main():
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        paths = image_files(args, tmp)
        loader_args = argparse.Namespace(seed=0, image_size=args.image_size, workers=0, cache_images=False,
                                         jitter="simclr", loader_timeout=300)
        plain = pretrain.DeviceViews(paths, loader_args, device)
        cached = pretrain.DeviceViews(paths, argparse.Namespace(**{**vars(loader_args), "cache_images": True}), device)
        workers = pretrain.DeviceViews(paths, argparse.Namespace(**{**vars(loader_args), "workers": args.workers}), device)
        pil = extract.ImageList(paths, extract.TwoViews(extract.train_transform(args.image_size)))
        pil_loader = torch.utils.data.DataLoader(pil, batch_size=args.batch, num_workers=args.workers, drop_last=True)
        variants = {"pil": lambda: [pil[i] for i in range(len(pil))],
                    "device": lambda: list(plain.batches(range(len(paths)), args.batch, 0)),
                    "device-cached": lambda: list(cached.batches(range(len(paths)), args.batch, 0)),
                    "pil-workers": lambda: list(pil_loader),
                    "device-workers": lambda: list(workers.batches(range(len(paths)), args.batch, 0))}
        best = {name: float("inf") for name in variants}
        for _ in range(args.rounds):
            for name, run in variants.items():
                t0 = time.perf_counter()
                run()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                best[name] = min(best[name], time.perf_counter() - t0)
    views = 2 * (len(paths) // args.batch) * args.batch
    rows = {name: {"seconds": round(s, 3), "views_per_s": round((2 * len(paths) if name == "pil" else views) / s, 1)}
            for name, s in best.items()}
    print(f"{len(paths)} JPEG images of {args.source_size} px -> two views of {args.image_size} px, one thread "
          f"(-workers: {args.workers} loader processes), {device}")
    print(f"{'variant':<15}{'seconds':>9}{'views/s':>10}{'x pil':>8}")
    for name, row in rows.items():
        print(f"{name:<15}{row['seconds']:>9.2f}{row['views_per_s']:>10.0f}{row['views_per_s'] / rows['pil']['views_per_s']:>8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


def image_files(args, tmp):
    """--images JPEG paths: from --data ROOT/train, or generated demo shapes saved as JPEG."""
    if args.data:
        return extract.list_images(os.path.join(args.data, "train"))[0][:args.images]
    root = demo_data.make_demo_dataset(os.path.join(tmp, "png"), num_classes=10, train_per_class=args.images // 10,
                                       val_per_class=0, image_size=args.source_size)
    paths = []
    for path in extract.list_images(os.path.join(root, "train"))[0]:
        with Image.open(path) as image:
            paths.append(path[:-len(".png")] + ".jpg")
            image.convert("RGB").save(paths[-1], quality=90)
    return paths


if __name__ == "__main__":
    main()
