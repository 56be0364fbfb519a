"""Stage 01: the contrastive prior, i.e. raw-feature initialisation of the N instance-class rows.

Implements the paper's second technique (section "A Contrastive Prior", Figure 4): build the
network from --seed (ResNet backbone + 2-layer MLP head to D = 128), make one pass over the
training set with no parameter changing and BN in training mode, and use each instance's embedding
as its classifier row. "Running BNs" is read the PyTorch way: each batch is normalised by its own
mean and variance (--bn running); --bn fixed is eval mode, where the fresh statistics (0, 1) make
BN an identity; --init random is Figure 4's Gaussian arm (no pass). The rows are stored at unit
length: the cosine logits ignore length, but a row's SGD step scales with 1 / |w|^2.

The pass draws its batches from a seeded permutation of all N instances (prior_batches): BN in
training mode subtracts what a batch shares, so a batch must be a random sample of the data, not a
run of one class folder. A BN batch is one process's share, --batch-size / W (the paper's 4096 on
64 GPUs: 64), and its size shapes the prior. Process r embeds batches r, r + W, ... and one
all_to_all sends every row to the process that owns it (dist_softmax.send_rows_to_owners); the
rows depend on the per-process batch, not on the process count. Each instance is embedded from its
centre crop (eval_transform), one deterministic view. Output, loadable with torch.load(...,
weights_only=True) on any number of processes:
  RUN/init.pt    {"network": state_dict after the pass, "classifier": {"weight": [N, 128],
                  "momentum": None (02 adds SGD's), "num_classes": N}, "args", "fingerprint"}
  RUN/data.json  the training list's fingerprint; later stages refuse different data
It prints two diagnostics: the same-class top-1 retrieval of the rows against chance (the paper:
about 3% against 0.1% on ImageNet, with a random ResNet-50), and Figure 4's gap, read here as the
mean cosine of two augmented views of one instance against views of two instances.

01 also holds the conventions every later stage uses (arguments, the data listing and image
loading, transforms, the network), defined here because 01 is the first stage that needs them.

Commands:
  python 01_extract_init.py --data demo_data --out runs/demo --arch resnet18 --image-size 64 --batch-size 256
  torchrun --nproc_per_node=8 01_extract_init.py --data /datasets/imagenet --out runs/in1k
  torchrun --nnodes=8 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
      01_extract_init.py --data /datasets/imagenet --out runs/in1k
--data ROOT holds train/ in ImageFolder layout (found recursively: tiny-imagenet-200/ works as is).
"""
import argparse
import contextlib
import copy
import hashlib
import json
import math
import os
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn
from torchvision import transforms

import dist_softmax as dsm

fail = dsm.fail  # one line on stderr naming the problem and the fix, exit code 2

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class Parser(argparse.ArgumentParser):
    """argparse with every stage's conventions: the docstring as --help, and a bad argument stopping
    with one line (no usage block), exit code 2."""

    def __init__(self, doc):
        super().__init__(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)

    def error(self, message):
        fail(f"{message}; see --help")


def number(kind, low=None, high=None, open_low=False, open_high=False):
    """An argparse type: a finite int or float within [low, high] ((low, high] with open_low, ...), else
    one line that says what it must be."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if (value is None or not math.isfinite(value) or (low is not None and (value <= low if open_low else value < low))
                or (high is not None and (value >= high if open_high else value > high))):
            bounds = [f"{'>' if open_low else '>='} {low}" if low is not None else "",
                      f"{'<' if open_high else '<='} {high}" if high is not None else ""]
            shape = "a whole number" if kind is int else "a finite number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {shape} {' and '.join(b for b in bounds if b)}".strip())
        return value
    return parse


POSITIVE, COUNT = number(int, 1), number(int, 0)  # --epochs, --batch-size...; --workers


def add_common_args(parser, epochs, batch_size, data_required=True):
    """The flags every stage shares (see the README's conventions). epochs=None: no --epochs."""
    parser.add_argument("--data", required=data_required, metavar="ROOT",
                        help="dataset root holding train/ (and val/ for evaluation), ImageFolder layout")
    parser.add_argument("--out", default="run", metavar="RUN", help="run folder shared by all stages")
    parser.add_argument("--arch", default="resnet50", choices=["resnet18", "resnet34", "resnet50"])
    parser.add_argument("--image-size", type=number(int, 8), default=224,
                        help="crop side, 8 or more; <= 64 uses the small-image stem (3x3 stride-1 conv1, no max-pool)")
    if epochs is not None:
        parser.add_argument("--epochs", type=POSITIVE, default=epochs)
    parser.add_argument("--batch-size", type=POSITIVE, default=batch_size,
                        help="global batch in instances, split evenly over the processes")
    parser.add_argument("--workers", type=COUNT, default=min(8, os.cpu_count() or 1),
                        help="data-loading processes per training process")
    parser.add_argument("--loader-timeout", type=POSITIVE, default=300, metavar="S",
                        help="seconds a loader worker may take for one batch before the run stops with a message")
    parser.add_argument("--seed", type=number(int, 0, 2**31 - 1), default=0)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])


parser = Parser(__doc__)
add_common_args(parser, epochs=None, batch_size=4096)
parser.add_argument("--bn", default="running", choices=["running", "ema", "fixed"],
                    help="running: each batch normalised by its own statistics (BN in training mode, the paper's "
                         "running BNs); ema: by the running averages this batch has just updated; fixed: eval mode")
parser.add_argument("--init", default="raw", choices=["raw", "random"],
                    help="raw: rows = embeddings from the pass; random: Gaussian rows, no pass")
parser.add_argument("--dim", type=POSITIVE, default=128, help="embedding size D")
parser.add_argument("--head", default="mlp", choices=["mlp", "linear"],
                    help="the 2-layer MLP head, or one linear layer (Table 2's 'no MLP head' row)")
parser.add_argument("--overwrite", action="store_true",
                    help="replace the init.pt of a run folder that 02 has already trained in (RUN/checkpoint.pt)")
parser.add_argument("--diagnostic-samples", type=POSITIVE, default=1000,
                    help="queries for the retrieval check and instances for the cosine gap")


def main(argv=None):
    args = parser.parse_args(argv)
    with dsm.stage(args) as device:
        world = dsm.get_world_size()
        log = print if dsm.is_main() else (lambda *a, **k: None)

        # ---- data ----
        train_dir = os.path.join(args.data, "train")
        paths, labels, classes = list_images(train_dir)
        n = len(paths)
        if n < 2 * world:  # each process owns rows and, with running BNs, normalises batches of two or more
            fail(f"{train_dir} holds {n} images, fewer than 2 per process for {world} processes; use fewer processes")
        trained = os.path.join(args.out, "checkpoint.pt")
        if os.path.isfile(trained) and not args.overwrite:
            fail(f"{args.out} holds a trained run ({trained}); 01 would replace the init.pt it started from; pass a "
                 "new --out, or --overwrite to replace init.pt (02 then still resumes from checkpoint.pt)")
        fingerprint = check_data_fingerprint(args.out, paths, args.data)
        local_batch = resolve_rank_batch(args.batch_size, world)
        if args.init == "raw" and len(prior_batches(n, local_batch, args.seed)) < world:
            fail(f"--batch-size {args.batch_size} leaves some of the {world} processes without a batch of the "
                 f"{n} images; use a smaller --batch-size")
        if args.init == "raw" and args.bn == "running" and local_batch < 2:
            fail(f"--batch-size {args.batch_size} gives each process batches of 1, which BN in training mode "
                 f"cannot normalise; use --batch-size {2 * world} or more")
        log(f"01_extract_init: {n} instances, {len(classes)} folder classes, {world} process(es) on {device}, "
            f"batch {args.batch_size} ({local_batch} per process), init {args.init}, BN {args.bn}")

        # ---- network ----
        torch.manual_seed(args.seed)  # the same initial network on every rank
        net = EmbeddingNet(args.arch, args.image_size, args.dim, args.head).to(device)
        if device.type == "cuda":
            net = net.to(memory_format=torch.channels_last)
        net.requires_grad_(False)  # no parameter changes; in training mode only BN's statistics move
        classifier = dsm.DistCosineSoftmax(n, args.dim).to(device)
        start, end = classifier.start, classifier.end

        # ---- the pass: shuffled batches, each row sent to the rank that owns it ----
        t0 = time.perf_counter()
        if args.init == "raw":
            hooks = set_bn_mode(net, args.bn)
            ids, embeddings = zip(*prior_pass(net, paths, eval_transform(args.image_size), local_batch, args,
                                              device))
            rows = dsm.send_rows_to_owners(torch.cat(ids), torch.cat(embeddings), n)
            for hook in hooks:
                hook.remove()
            if args.bn != "fixed":
                merge_bn_averages(net)  # one network state for the run, whatever the process count
        else:
            rows = dsm.seeded_rows(start, end, args.seed, lambda g, b: torch.randn(b, args.dim, generator=g)).to(device)
        # Unit rows: the cosine logits ignore a row's length, but its SGD step scales with 1/|w|^2,
        # so every arm starts at the same scale whatever the raw embeddings' norm.
        with torch.no_grad():
            classifier.weight.copy_(F.normalize(rows.float(), dim=1))
        log(f"rows ready in {time.perf_counter() - t0:.1f} s")

        # ---- save ----
        state = dsm.gather_classifier(classifier)  # collective
        if dsm.is_main():
            network = {k: v.detach().cpu() for k, v in net.state_dict().items()}
            path = os.path.join(args.out, "init.pt")
            atomic_save({"network": network, "classifier": state, "args": vars(args),
                             "fingerprint": fingerprint}, path)
            log(f"wrote {path}: network + {n} x {args.dim} classifier rows")

            # ---- diagnostics (rank 0, on the assembled rows) ----
            if len(classes) > 1:
                hits, chance, queries = retrieval_top1(state["weight"], labels, args.diagnostic_samples,
                                                       args.seed, device)
                log(f"same-class top-1 retrieval of the {args.init} rows: {100 * hits:.1f}% over {queries} queries "
                    f"(chance {100 * chance:.1f}%)")
            same, other = view_cosine_gap(net, paths, args, device)
            log(f"mean cosine, two views of one instance: {same:.4f}; of two instances: {other:.4f}; "
                f"gap {same - other:.4f} (BN {args.bn})")


# ---------------------------------------------------------------- errors and data

def list_images(folder):
    """(paths, labels, classes) for every image below `folder`, recursively, sorted by relative path.

    label = index of the file's top-level subfolder among the sorted subfolder names (files
    directly in `folder` form a class named ""). The position in `paths` is the instance id.
    """
    if not os.path.isdir(folder):
        fail(f"{folder} is not a folder; --data ROOT must hold train/ with one subfolder per class")

    def unreadable(error):
        fail(f"cannot read {error.filename} ({error.strerror}); make it readable or move it out of {folder}")

    found, seen, skipped = [], set(), 0
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True, onerror=unreadable):
        info = os.stat(dirpath)
        folder_id = (info.st_dev, info.st_ino)
        if folder_id in seen:  # a symbolic link back to a folder already listed (a loop, or a second path)
            dirnames[:], skipped = [], skipped + 1
            continue
        seen.add(folder_id)
        dirnames.sort()  # the first path to a folder wins, the same one every time
        found += [os.path.relpath(os.path.join(dirpath, name), folder).replace(os.sep, "/")
                  for name in filenames if name.lower().endswith(IMAGE_EXTENSIONS)]
    if skipped and dsm.is_main():
        print(f"note: {skipped} folder(s) below {folder} reached again through symbolic links were listed once")
    if not found:
        fail(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found below {folder}")
    found.sort()
    tops = [rel.split("/")[0] if "/" in rel else "" for rel in found]
    classes = sorted(set(tops))
    index = {c: i for i, c in enumerate(classes)}
    return [os.path.join(folder, rel) for rel in found], [index[t] for t in tops], classes


def check_data_fingerprint(run_dir, paths, data_root):
    """Record (first call) or check (later calls) RUN/data.json: the count and sha256 of the
    training list relative to data_root. Different data -> fail(). Returns the fingerprint."""
    rel = [os.path.relpath(p, data_root).replace(os.sep, "/") for p in paths]
    fingerprint = {"count": len(rel), "sha256": hashlib.sha256("\n".join(rel).encode()).hexdigest()}
    path = os.path.join(run_dir, "data.json")
    if os.path.isfile(path):
        try:
            with open(path) as f:
                saved = json.load(f)
            saved["count"], saved["sha256"]
        except (OSError, ValueError, TypeError, KeyError) as e:
            fail(f"{path} is not a data fingerprint ({type(e).__name__}: {e}); delete it and rerun with the "
                 f"--data this run was made from")
        if (saved["count"], saved["sha256"]) != (fingerprint["count"], fingerprint["sha256"]):
            fail(f"{run_dir} was made from {saved['count']} training images ({saved.get('root', '?')}) but "
                 f"--data {data_root} lists {fingerprint['count']} different ones; pass the original --data "
                 f"or a new --out folder")
    elif dsm.is_main():
        write_json(path, {**fingerprint, "root": os.path.abspath(data_root)})
    return fingerprint


def atomic_save(obj, path, dump=torch.save):
    """dump(obj, binary file) to a temporary file beside `path`, then rename: a crash never leaves
    half a file, and a full disk leaves the previous file as it was (one line, exit 2). torch.save
    by default; pickle.dump or a bytes writer work the same way. The file gets the umask's mode."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-" + os.path.basename(path))
    except OSError as e:
        fail(f"cannot write {path} ({e.strerror}); pass an --out you can write to")
    try:
        with os.fdopen(fd, "wb") as f:
            dump(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp's 0600 would hide results from the user's group
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):  # ENOSPC, EDQUOT, EIO...: the previous file is untouched
            fail(f"cannot write {path} ({e.strerror}); the previous {os.path.basename(path)} is kept; "
                 "free space or pass another --out, then rerun the command")
        raise


UMASK = os.umask(0o22)  # read once (umask can only be read by setting it), then put back
os.umask(UMASK)


def write_json(path, obj):
    """JSON written atomically: a reader never sees half a file."""
    atomic_save(json.dumps(obj, indent=2).encode(), path, dump=lambda data, f: f.write(data))


def load_run_file(path, needs=(), fix="rerun the stage that writes it"):
    """torch.load(path, weights_only=True) of a file a stage wrote, as a dict holding the keys
    `needs`: anything unreadable, truncated or of another shape stops with one line naming the file
    and `fix`, not a traceback."""
    try:
        obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # noqa: BLE001 - every way of being unreadable gets the same answer
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        fail(f"cannot read {path} ({reason}); {fix}")
    missing = [key for key in needs if not isinstance(obj, dict) or key not in obj]
    if missing:
        fail(f"{path} is not a file this stage reads (no {', '.join(missing)}); {fix}")
    return obj


class ImageList(torch.utils.data.Dataset):
    """paths -> (transform(image), instance id = position in `paths`), or (transform(image), class
    label) when `labels` are given: the one data convention of every stage."""

    def __init__(self, paths, transform, labels=None):
        self.paths, self.transform, self.labels = paths, transform, labels

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return self.transform(load_rgb(self.paths[index])), index if self.labels is None else self.labels[index]


def load_rgb(path):
    """The image at `path` as 8-bit RGB. 16-bit, 32-bit and float images are scaled by their own range
    (65535 for 16-bit values, else their maximum), not clipped to white; a file PIL cannot decode, or
    one too large to decode safely (PIL's decompression-bomb guard), is an InputError naming it."""
    try:
        with Image.open(path) as image:
            if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                pixels = np.asarray(image, dtype=np.float64)
                top = 65535.0 if image.mode != "F" and pixels.max() <= 65535 else max(pixels.max(), 1e-12)
                return Image.fromarray(np.clip(pixels / top * 255, 0, 255).astype(np.uint8)).convert("RGB")
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise dsm.InputError(bad_image(path, e)) from None


def bad_image(path, error):
    return f"cannot read image {path} ({str(error).splitlines()[0] if str(error) else type(error).__name__}); remove or replace that file"


def data_loader(dataset, args, device, **kwargs):
    """torch's DataLoader as every stage uses it: --workers processes, pinned memory on CUDA, and a
    --loader-timeout for each batch, so that a loader that stops delivering ends the run with one
    line (dist_softmax.stage) instead of a silent wait."""
    return torch.utils.data.DataLoader(dataset, num_workers=args.workers, pin_memory=device.type == "cuda",
                                       timeout=args.loader_timeout if args.workers else 0, **kwargs)


def timed_batches(loader):
    """One epoch of (batch, seconds spent waiting for it): the data-wait share of the progress lines."""
    batches = iter(loader)
    while True:
        t0 = time.perf_counter()
        batch = next(batches, None)
        if batch is None:
            return
        yield batch, time.perf_counter() - t0


class TwoViews:
    """Two independent draws of a random transform, stacked: [2, C, H, W]."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image):
        return torch.stack([self.transform(image), self.transform(image)])


def eval_transform(image_size):
    """Resize the short side to 1.14 x size (256/224), centre crop, ImageNet normalisation."""
    return transforms.Compose([
        transforms.Resize(int(round(image_size * 1.14))),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


# SimCLR's augmentation of the training views (the paper cites it), for train_transform and 02's
# device path. Colour jitter (brightness, contrast, saturation, hue): SimCLR's strength 1, or MoCo v2's half.
CROP_SCALE, CROP_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)
JITTER = {"simclr": (0.8, 0.8, 0.8, 0.2), "mocov2": (0.4, 0.4, 0.4, 0.1)}
P_JITTER, P_GRAY, P_BLUR, BLUR_SIGMA = 0.8, 0.2, 0.5, (0.1, 2.0)


def blur_kernel(image_size):
    return max(3, int(0.1 * image_size) // 2 * 2 + 1)  # about 10% of the side, odd


def train_transform(image_size, jitter="simclr"):
    """SimCLR's augmentation: crop, flip, colour jitter (SimCLR's or MoCo v2's strength), grayscale, blur."""
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size, scale=CROP_SCALE, ratio=CROP_RATIO),
        transforms.RandomHorizontalFlip(),
        transforms.RandomApply([transforms.ColorJitter(*JITTER[jitter])], p=P_JITTER),
        transforms.RandomGrayscale(p=P_GRAY),
        transforms.RandomApply([transforms.GaussianBlur(blur_kernel(image_size), sigma=BLUR_SIGMA)], p=P_BLUR),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def resolve_rank_batch(global_batch, world_size):
    """This process's share of the global --batch-size; it must split evenly."""
    if global_batch < world_size or global_batch % world_size:
        fail(f"--batch-size {global_batch} does not split evenly over {world_size} processes; "
             f"use a multiple of {world_size}")
    return global_batch // world_size


# ---------------------------------------------------------------- networks

def autocast(device):
    """bf16 autocast on CUDA (the matrix products of every stage), nothing on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def to_device(images, device):
    """A batch of images on `device` in the default dtype (float32 unless a test asks for float64),
    channels_last on CUDA (faster convolutions under autocast)."""
    images = images.to(device, torch.get_default_dtype(), non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else images



def build_backbone(arch, image_size):
    """(torchvision ResNet with fc = Identity, feature width). Key names stay torchvision's.

    At image_size <= 64 the usual small-image stem replaces conv1 (3x3, stride 1) and drops the
    max-pool. Such a state_dict loads into torchvision.models.<arch>() given the same stem, i.e.
    into build_backbone(arch, size) or a torchvision ResNet whose conv1 was swapped likewise;
    at larger sizes it loads into a plain torchvision.models.<arch>() with only fc.* missing.
    """
    model = getattr(torchvision.models, arch)(weights=None)
    feature_dim = model.fc.in_features
    model.fc = nn.Identity()
    if image_size <= 64:
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
        if dsm.is_main():
            print(f"{arch} at {image_size} px: small-image stem (3x3 stride-1 conv1, no max-pool)")
    return model, feature_dim


class EmbeddingNet(nn.Module):
    """Backbone + a 2-layer MLP head to D dims: Linear(F, F) + BN + ReLU + Linear(F, D).

    The paper says "2-layer MLP" and no more. The hidden width here equals the backbone width (2048
    for ResNet-50) and BN sits in the hidden layer, as in SimCLR's head (MoCo v2's has none); with
    running BNs this BN is part of what shapes the prior. The output is not normalised (the cosine
    classifier does that).
    """

    def __init__(self, arch, image_size, dim=128, head="mlp"):
        super().__init__()
        self.backbone, width = build_backbone(arch, image_size)
        if head == "mlp":
            self.head = nn.Sequential(nn.Linear(width, width, bias=False), nn.BatchNorm1d(width),
                                      nn.ReLU(inplace=True), nn.Linear(width, dim))
        else:  # Table 2's ablation without the MLP head
            self.head = nn.Sequential(nn.Linear(width, dim))

    def forward(self, x):
        return self.head(self.backbone(x))


# ---------------------------------------------------------------- the pass and its diagnostics

def prior_batches(num_instances, batch_size, seed):
    """The batches of the prior pass: a seeded permutation of all instances cut into batches of
    batch_size, the same for any process count. Mixed batches matter: BN in training mode subtracts
    what a batch shares, and a batch of one folder class would lose that class's signal. A last
    batch of one (which BN cannot normalise) joins the one before."""
    order = torch.randperm(num_instances, generator=torch.Generator().manual_seed(seed))
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:
        tail = batches.pop()
        batches[-1] = torch.cat([batches[-1], tail])
    return batches


@torch.no_grad()
def prior_pass(net, paths, transform, batch_size, args, device):
    """Yield (instance ids, embeddings) batch by batch for this process's share of prior_batches:
    batches r, r + W, r + 2W, ... on rank r. The network runs in the mode it is in."""
    rank, world = dsm.get_rank(), dsm.get_world_size()
    batches = [b.tolist() for b in prior_batches(len(paths), batch_size, args.seed)[rank::world]]
    for images, index in data_loader(ImageList(paths, transform), args, device, batch_sampler=batches):
        with autocast(device):
            yield index.to(device), net(to_device(images, device)).float()


def batch_norms(net):
    return [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def set_bn_mode(net, mode):
    """Figure 4's readings of BN during the prior pass; returns hooks to remove after it.
    running: training mode, each batch normalised by its own statistics; the saved statistics
    become the plain average over the pass (momentum None). ema: each batch normalised by the
    running averages it has just updated (momentum 0.1, started from the first batch's statistics):
    "a weighted average of ... features extracted in previous iterations". fixed: eval mode."""
    net.train(mode == "running")
    for bn in batch_norms(net):
        bn.reset_running_stats()
        bn.momentum = None if mode == "running" else 0.1
    return [bn.register_forward_pre_hook(_update_running_stats) for bn in batch_norms(net)] if mode == "ema" else []


def _update_running_stats(bn, inputs):
    x = inputs[0].float()
    dims = [0] + list(range(2, x.dim()))
    weight = 1.0 if bn.num_batches_tracked == 0 else bn.momentum
    bn.running_mean.lerp_(x.mean(dims), weight)
    bn.running_var.lerp_(x.var(dims), weight)  # unbiased, as BN's own running_var
    bn.num_batches_tracked += 1


def merge_bn_averages(net):
    """After a pass: every rank's statistics averaged, weighted by each rank's batch count (with
    --bn running they then do not depend on the process count); momentum back to 0.1."""
    for bn in batch_norms(net):
        if dsm.get_world_size() > 1:
            count = bn.num_batches_tracked.to(bn.running_mean)
            totals = torch.cat([bn.running_mean * count, bn.running_var * count, count.view(1)])
            torch.distributed.all_reduce(totals)
            width = len(bn.running_mean)
            bn.running_mean.copy_(totals[:width] / totals[-1].clamp_min(1))
            bn.running_var.copy_(totals[width:2 * width] / totals[-1].clamp_min(1))
            bn.num_batches_tracked.fill_(int(totals[-1]))
        bn.momentum = 0.1


@torch.no_grad()
def retrieval_top1(rows, labels, samples, seed, device, chunk=65536):
    """Share of queries whose most cosine-similar other row has the same folder class, the chance
    of that for a random other row (sum_c n_c (n_c - 1) / N (N - 1)), and the number of queries."""
    labels = torch.as_tensor(labels)
    n = rows.shape[0]
    query = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))[:samples]  # not prior_batches' draw
    q = F.normalize(rows[query].to(device).float(), dim=1)
    best_val = torch.full((len(query),), -float("inf"), device=device)
    best_idx = torch.zeros(len(query), dtype=torch.long, device=device)
    for c0 in range(0, n, chunk):
        s = q @ F.normalize(rows[c0:c0 + chunk].to(device).float(), dim=1).t()
        own = (query.to(device) >= c0) & (query.to(device) < c0 + s.shape[1])
        s[own.nonzero()[:, 0], query.to(device)[own] - c0] = -float("inf")  # never the query itself
        val, idx = s.max(1)
        better = val > best_val
        best_val[better], best_idx[better] = val[better], idx[better] + c0
    hits = (labels[best_idx.cpu()] == labels[query]).double().mean().item()
    sizes = torch.bincount(labels).double()
    chance = ((sizes * (sizes - 1)).sum() / (n * (n - 1))).item()
    return hits, chance, len(query)


@torch.no_grad()
def view_cosine_gap(net, paths, args, device, batch_size=64):
    """Figure 4's similarity gap: mean cosine of the embeddings of two augmented views of one
    instance, and of views of two different instances, on a fixed sample, with BN as in the pass.
    A copy of the network is used so that its BN statistics stay as they were saved."""
    net = copy.deepcopy(net).train(args.bn == "running")  # ema: the pass's final averages
    generator = torch.Generator().manual_seed(args.seed + 2)
    sample = torch.randperm(len(paths), generator=generator)[:args.diagnostic_samples].tolist()
    torch.manual_seed(args.seed + 3)  # the augmentations drawn below
    dataset = ImageList([paths[i] for i in sample], TwoViews(train_transform(args.image_size)))
    batch_size = min(batch_size, len(sample))
    # Whole batches only: BN in training mode would normalise a last batch of one or two alone.
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, drop_last=len(sample) > batch_size)
    first, second = [], []
    for views, _ in loader:
        with autocast(device):
            z = net(to_device(views.flatten(0, 1), device)).float().view(views.shape[0], 2, -1)
        first.append(F.normalize(z[:, 0], dim=1))
        second.append(F.normalize(z[:, 1], dim=1))
    first, second = torch.cat(first), torch.cat(second)
    same = (first * second).sum(1).mean().item()
    other = (first * second.roll(1, dims=0)).sum(1).mean().item()  # instance i against i - 1
    return same, other


if __name__ == "__main__":
    main()
