"""Benchmark: what the N-way instance classifier costs in 02_pretrain.py's training step.

Times 02's own train_step (backbone + MLP head + DistCosineSoftmax over N = 100,000 instances,
hard-class smoothing alpha 0.2, k 100, two SGD optimisers) against the same backbone trained as a
plain 200-way supervised classifier (linear fc + cross entropy, one SGD), on the same image
tensor: `--batch` instances x 2 views = the same number of images through the backbone.
The variants alternate step by step (order flipped every round) and medians are reported.
Synthetic tensors for the step timing; the data-wait share is measured separately by feeding
02's step from the real loader (ImageList + two SimCLR views) over generated demo images.
Also reported: one refresh of the hard-class table (03's mine_hard_classes, once per epoch),
as seconds and as a share of an epoch of N / batch steps.
Target (issue 3): instance / supervised step time <= 1.15x.

    python tests/bench_02_pretrain.py --json /tmp/bench_02.json                    # CPU, ResNet-18, 64 px
    python tests/bench_02_pretrain.py --device cuda --arch resnet50 --batch 256 --image-size 224
"""
import argparse
import contextlib
import importlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import demo_data  # noqa: E402
import dist_softmax  # noqa: E402

extract = importlib.import_module("01_extract_init")
pretrain = importlib.import_module("02_pretrain")

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--arch", default="resnet18")
parser.add_argument("--image-size", type=int, default=64)
parser.add_argument("--batch", type=int, default=32, help="instances per step (2 views each)")
parser.add_argument("--instances", type=int, default=100_000, help="N, the instance classes")
parser.add_argument("--classes", type=int, default=200, help="classes of the supervised baseline")
parser.add_argument("--alpha", type=float, default=0.2)
parser.add_argument("--hard-k", type=int, default=100)
parser.add_argument("--rounds", type=int, default=7, help="timed steps per variant, after 2 warm-up steps")
parser.add_argument("--loader-steps", type=int, default=8, help="steps fed by the real loader")
parser.add_argument("--workers", type=int, default=2)
parser.add_argument("--skip-mining", action="store_true")
parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
parser.add_argument("--json", default=None, help="write the results here")


def main():
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    torch.manual_seed(0)
    images = torch.randn(2 * args.batch, 3, args.image_size, args.image_size, device=device)
    if cuda:
        images = images.contiguous(memory_format=torch.channels_last)

    # ---- the two variants ----
    instance = InstanceStep(args, device, amp)
    supervised = SupervisedStep(args, device, amp)
    variants = {"instance (02)": instance, "supervised": supervised}
    times = {name: [] for name in variants}
    peak = {}
    for name, step in variants.items():  # warm-up, and the peak memory of each alone
        reset_peak(device)
        for _ in range(2):
            step(images)
        peak[name] = peak_gib(device)
    for r in range(args.rounds):
        order = list(variants) if r % 2 == 0 else list(variants)[::-1]
        for name in order:
            sync(device)
            t0 = time.perf_counter()
            variants[name](images)
            sync(device)
            times[name].append(time.perf_counter() - t0)
    median = {name: statistics.median(t) for name, t in times.items()}
    ratio = median["instance (02)"] / median["supervised"]

    # ---- data-wait share with the real loader ----
    wait_share = loader_wait_share(args, instance, device)

    # ---- one hard-class refresh (per epoch) ----
    mining_s = None
    if args.alpha > 0 and not args.skip_mining:
        sync(device)
        t0 = time.perf_counter()
        instance.mine()
        sync(device)
        mining_s = time.perf_counter() - t0
    epoch_steps = args.instances // args.batch

    # ---- report ----
    machine = machine_name(device)
    print(f"\n{args.arch} at {args.image_size} px, {args.batch} instances x 2 views = {2 * args.batch} images "
          f"per step, N = {args.instances:,} instances vs {args.classes} classes, {device}, "
          f"{torch.get_num_threads()} threads; {machine}")
    print(f"{'variant':<16}{'step s (median)':>16}{'images/s':>10}{'peak GiB':>10}{'x supervised':>14}")
    for name in variants:
        memory = f"{peak[name]:.2f}" if peak[name] is not None else "-"
        print(f"{name:<16}{median[name]:>16.3f}{2 * args.batch / median[name]:>10.1f}{memory:>10}"
              f"{median[name] / median['supervised']:>14.3f}")
    print(f"instance / supervised step time: {ratio:.3f}x (target <= 1.15x)")
    print(f"data-wait share, real loader ({args.workers} workers, demo images): {100 * wait_share:.1f}%")
    if mining_s is not None:
        share = mining_s / (mining_s + epoch_steps * median["instance (02)"])
        print(f"hard-class refresh (k={instance.k}, once per epoch): {mining_s:.1f} s = {100 * share:.2f}% "
              f"of an epoch of {epoch_steps} steps")
    results = {"machine": machine, "device": device.type, "threads": torch.get_num_threads(),
               "torch": torch.__version__, "config": vars(args),
               "step_s": {name: {"median": median[name], "all": times[name]} for name in variants},
               "images_per_s": {name: 2 * args.batch / median[name] for name in variants},
               "peak_gib": peak, "ratio": ratio, "target": 1.15, "data_wait_share": wait_share,
               "mining_s": mining_s, "epoch_steps": epoch_steps}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.json}")


# ---------------------------------------------------------------- the variants

class InstanceStep:
    """02's step: EmbeddingNet + DistCosineSoftmax (N rows) + smoothing, 02's train_step."""

    def __init__(self, args, device, amp):
        self.net = extract.EmbeddingNet(args.arch, args.image_size).to(device)
        if device.type == "cuda":
            self.net = self.net.to(memory_format=torch.channels_last)
        self.classifier = dist_softmax.DistCosineSoftmax(args.instances, 128).to(device)
        self.optimizers = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
                           for m in (self.net, self.classifier)]
        self.alpha, self.k, self.amp, self.device = args.alpha, min(args.hard_k, args.instances - 1), amp, device
        self.hard = importlib.import_module("03_hard_classes") if args.alpha > 0 else None
        # A stand-in table (a real one is mined once per epoch; its cost is timed separately).
        self.table = (torch.randint(0, args.instances, (args.instances, self.k), device=device)
                      if self.hard else None)
        self.generator = torch.Generator().manual_seed(1)
        self.instances = args.instances

    def __call__(self, images, ids=None):
        if ids is None:
            ids = torch.randint(0, self.instances, (images.shape[0] // 2,), generator=self.generator)
        ids = ids.to(self.device)
        hard = (self.hard.lookup_hard_classes(self.table, ids, self.classifier).repeat_interleave(2, 0)
                if self.hard else None)
        return pretrain.train_step(self.net, self.classifier, self.optimizers, images,
                                   ids.repeat_interleave(2), hard, self.alpha, self.amp)

    def mine(self):
        self.table, _ = self.hard.mine_hard_classes(self.classifier, self.k)


class SupervisedStep:
    """The baseline: the same backbone, a linear fc to C classes, cross entropy, one SGD."""

    def __init__(self, args, device, amp):
        backbone, width = extract.build_backbone(args.arch, args.image_size)
        self.model = torch.nn.Sequential(backbone, torch.nn.Linear(width, args.classes)).to(device)
        if device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        self.classes, self.amp, self.device = args.classes, amp, device
        self.generator = torch.Generator().manual_seed(2)

    def __call__(self, images):
        labels = torch.randint(0, self.classes, (images.shape[0],), generator=self.generator).to(self.device)
        with self.amp:
            loss = F.cross_entropy(self.model(images).float(), labels)
        value = loss.item()  # 02 reads its loss every step too (the non-finite check)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return value


# ---------------------------------------------------------------- loader, machine

def loader_wait_share(args, instance, device):
    """Share of wall time spent waiting for the next batch when 02's step is fed by the real
    loader (generated PNGs, two augmented views each); the first batch (worker start) is skipped."""
    with tempfile.TemporaryDirectory() as tmp:
        per_class = max(2, -(-(args.batch * (args.loader_steps + 1)) // 10))
        root = demo_data.make_demo_dataset(tmp, num_classes=10, train_per_class=per_class, val_per_class=0,
                                         image_size=args.image_size)
        paths, _, _ = extract.list_images(os.path.join(root, "train"))
        dataset = extract.ImageList(paths, extract.TwoViews(extract.train_transform(args.image_size)))
        loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch, shuffle=True, drop_last=True,
                                             num_workers=args.workers, pin_memory=device.type == "cuda")
        batches = iter(loader)
        next(batches)
        wait = total = 0.0
        for _ in range(args.loader_steps):
            t0 = time.perf_counter()
            views, ids = next(batches)
            t1 = time.perf_counter()
            images = views.flatten(0, 1).to(device, non_blocking=True)
            if device.type == "cuda":
                images = images.contiguous(memory_format=torch.channels_last)
            instance(images, ids)
            sync(device)
            wait += t1 - t0
            total += time.perf_counter() - t0
    return wait / total


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device):
    """Peak CUDA memory; None on CPU (one process runs both variants, so RSS cannot tell them apart)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def machine_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        model = names[0] if names else model
    return f"{model}, {os.cpu_count()} cores"


if __name__ == "__main__":
    main()
