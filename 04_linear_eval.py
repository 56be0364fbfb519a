"""Stage 04: the ImageNet evaluation protocols: linear probe, weighted kNN, semi-supervised fine-tuning.

Scores a backbone under the protocols behind the paper's Tables 2-7. The backbone comes from
RUN/backbone.pt (02_pretrain.py), or --pretrained PATH: a 02 checkpoint.pt, a 01 init.pt, or any
torchvision-named ResNet state_dict (fc.* may be present or absent; any other difference stops
with a message). --pretrained none scores the randomly initialised network (seeded by --seed), the
baseline every number should be read against.

  linear probe (default)  Tables 2-6. Frozen backbone with BN in eval mode, one linear layer on the
                          pooled features. SGD, momentum 0.9, weight decay 0, lr 40 at batch 2048
                          (scaled linearly, printed), cosine decay over --epochs (100). Training
                          crops: random resized crop + flip; validation: resize + centre crop. At
                          the end every backbone tensor is checked bit-identical to the loaded one.
  --cached-features       the same probe trained on features embedded once (centre crop, no
                          augmentation): minutes instead of hours, the smoke-run path. The same
                          numbers on any process count (the global batch is drawn from one shared
                          permutation and the gradient summed over the ranks' feature shards).
  --standardize           (probe) shift/scale each feature dimension by the train mean/std first:
                          an affine map the linear layer could absorb, so still a linear probe,
                          but one lr then suits any feature scale (a random network's features
                          are large and barely centred). Off by default, as in the paper.
  --knn                   weighted kNN (the instance-discrimination protocol): L2-normalised pooled
                          features, the k most cosine-similar training images vote for their class
                          with weight exp(sim / 0.07), k = 20 and 200 (clamped to the train size).
                          Each process holds a shard of the training features; for every chunk of
                          queries it finds its own top k, all_gather merges the candidates.
  --label-fraction F      semi-supervised (Table 7): fine-tune the whole network with a linear
                          classifier on a class-balanced fraction F of the training labels (drawn
                          with --seed, or --subset-file), backbone lr 0.001 and classifier lr 15
                          (F = 0.01) or 10 (otherwise) at batch 256 (scaled), cosine, --epochs (20).

Top-1/top-5 on ROOT/val are printed every epoch as one line and appended to RUN/<result>_log.jsonl.
Validation is split over the processes in contiguous shards and the hit counts are summed, so every
image is counted exactly once on any process count. Results, side by side in RUN:
  linear_eval.json  knn.json  semi_0.01.json  semi_0.1.json      (the pretrained backbone)
  linear_eval_random.json  knn_random.json  semi_0.01_random.json  (--pretrained none)
each {"protocol", "checkpoint", "top1", "top5", "settings", ...}. The trained protocols write
RUN/<result>_checkpoint.pt atomically after every epoch; rerunning the same command resumes from it
(on any process count). kNN is one pass and has nothing to resume.

Commands (after 01 and 02 with the same --data and --out; --arch/--image-size default to RUN/init.pt's):
  python 04_linear_eval.py --data demo_data --out runs/demo --batch-size 256 --cached-features --standardize --lr 1
  python 04_linear_eval.py --data demo_data --out runs/demo --batch-size 256 --cached-features --standardize --lr 1 \\
      --pretrained none                                   # the random-init baseline, beside it
  python 04_linear_eval.py --data demo_data --out runs/demo --batch-size 256 --knn     # (and --pretrained none)
  torchrun --nproc_per_node=8 04_linear_eval.py --data /datasets/imagenet --out runs/in1k
  torchrun --nproc_per_node=8 04_linear_eval.py --data /datasets/imagenet --out runs/in1k --knn
  torchrun --nproc_per_node=8 04_linear_eval.py --data /datasets/imagenet --out runs/in1k --label-fraction 0.01
  torchrun --nnodes=8 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
      04_linear_eval.py --data /datasets/imagenet --out runs/in1k
--data ROOT holds train/ and val/: val/ in ImageFolder layout (class folders named as in train/),
or tiny-ImageNet's val/images/ + val/val_annotations.txt, read as is.
"""
import argparse
import contextlib
import hashlib
import importlib
import json
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchvision import transforms

import dist_softmax as dsm

extract = importlib.import_module("01_extract_init")
pretrain = importlib.import_module("02_pretrain")
fail = extract.fail

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
extract.add_common_args(parser, epochs=None, batch_size=None)
parser.set_defaults(arch=None, image_size=None)  # default: as in RUN/init.pt, else resnet50 at 224 px
parser.add_argument("--epochs", type=int, default=None, help="linear probe: 100; semi-supervised: 20")
parser.add_argument("--pretrained", default=None, metavar="PATH|none",
                    help="backbone to evaluate (default RUN/backbone.pt); 'none': the random-init baseline")
parser.add_argument("--knn", action="store_true", help="weighted kNN instead of the linear probe")
parser.add_argument("--knn-k", default="20,200", help="neighbour counts, comma-separated (the first is top1/top5)")
parser.add_argument("--knn-temperature", type=float, default=0.07)
parser.add_argument("--chunk-size", type=int, default=4096,
                    help="kNN: queries and training rows per similarity block (bounds memory)")
parser.add_argument("--label-fraction", type=float, default=None, metavar="F",
                    help="semi-supervised fine-tuning on a class-balanced fraction F of the labels (0.01, 0.1)")
parser.add_argument("--subset-file", default=None,
                    help="semi-supervised: the labelled images, one per line (path under train/ or file name)")
parser.add_argument("--cached-features", action="store_true",
                    help="linear probe on features embedded once without augmentation (fast)")
parser.add_argument("--standardize", action="store_true",
                    help="linear probe: standardise each feature with the train mean/std (up to 10000 centre "
                         "crops) before the linear layer; one lr then fits any backbone's feature scale")
parser.add_argument("--lr", type=float, default=None,
                    help="linear layer lr at the reference batch: 40 at 2048 (probe); 15 (1%%) / 10 at 256 (semi)")
parser.add_argument("--backbone-lr", type=float, default=0.001, help="semi-supervised backbone lr at batch 256")
parser.add_argument("--momentum", type=float, default=0.9)
parser.add_argument("--weight-decay", type=float, default=0.0)
parser.add_argument("--print-freq", type=int, default=50, help="steps between progress lines (image training)")


def main(argv=None):
    args = parser.parse_args(argv)
    protocol = "knn" if args.knn else "semi" if args.label_fraction is not None else "linear"
    check_arguments(args, protocol)
    owns_group = not dist.is_initialized()  # a caller's group is left to the caller
    device = dsm.init_distributed(args.device)
    world = dsm.get_world_size()
    log = print if dsm.is_main() else (lambda *a, **k: None)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    # ---- data ----
    paths, labels, classes = extract.list_images(os.path.join(args.data, "train"))
    val_paths, val_labels = list_val_images(args.data, classes)
    extract.check_data_fingerprint(args.out, paths, args.data)
    args.batch_size = args.batch_size or (256 if protocol == "semi" else 2048)
    args.epochs = args.epochs or (20 if protocol == "semi" else 100)
    local_batch = extract.resolve_rank_batch(args.batch_size, world)
    if min(len(paths), len(val_paths)) < world:
        fail(f"{len(paths)} train / {len(val_paths)} val images cannot be split over {world} processes; "
             f"use fewer processes")

    # ---- backbone ----
    source = args.pretrained or os.path.join(args.out, "backbone.pt")
    network_defaults(args, source, log)
    if source != "none" and args.pretrained is None and not os.path.isfile(source):
        fail(f"{source} not found; run 02_pretrain.py with --out {args.out} first, pass --pretrained PATH, "
             f"or --pretrained none for the random-init baseline")
    backbone, width, described = load_pretrained_backbone(source, args.arch, args.image_size, args.seed)
    backbone = backbone.to(device)
    if device.type == "cuda":
        backbone = backbone.to(memory_format=torch.channels_last)
    if source == "none":
        estimate_bn_statistics(backbone, paths, args, device, log)
    stem = {"linear": "linear_eval", "knn": "knn"}.get(protocol) or f"semi_{args.label_fraction:g}"
    stem += "_random" if source == "none" else ""  # side by side with the pretrained result
    log(f"04_linear_eval: {protocol}{' (cached features)' if args.cached_features else ''} of {described}; "
        f"{args.arch} at {args.image_size} px, {len(paths)} train / {len(val_paths)} val images, "
        f"{len(classes)} classes, {world} process(es) on {device}, batch {args.batch_size} ({local_batch} per process)")
    log("args: " + json.dumps(vars(args), sort_keys=True))

    # ---- the protocol ----
    data = dict(paths=paths, labels=labels, val_paths=val_paths, val_labels=val_labels,
                num_classes=len(classes), local_batch=local_batch)
    if protocol == "knn":
        result = knn_protocol(args, backbone, data, device, log)
    else:
        result = trained_protocol(args, protocol, stem, backbone, width, data, device, log)

    # ---- result ----
    result = {"protocol": protocol, "checkpoint": described, "top1": result.pop("top1"), "top5": result.pop("top5"),
              "arch": args.arch, "image_size": args.image_size, "train_images": len(paths),
              "val_images": len(val_paths), "classes": len(classes), "world_size": world, **result}
    if dsm.is_main():
        path = os.path.join(args.out, stem + ".json")
        extract.write_json(path, result)
        log(f"{protocol}: top-1 {result['top1']:.2f}  top-5 {result['top5']:.2f}  ({described}); wrote {path}")
    dsm.finish_distributed(owns_group)
    return result


def network_defaults(args, source, log):
    """--arch / --image-size not given: take them from the checkpoint or RUN/init.pt (01 recorded
    them and 02 kept them), so `--out RUN --data ROOT` evaluates what that run trained."""
    if args.arch is not None and args.image_size is not None:
        return
    made, origin = {}, None
    for path in (source, os.path.join(args.out, "init.pt")):
        if os.path.isfile(path):
            try:
                obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except Exception:  # noqa: BLE001 - an unreadable file is reported when the backbone loads
                continue
            if isinstance(obj, dict) and isinstance(obj.get("args"), dict) and "arch" in obj["args"]:
                made, origin = obj["args"], path
                break
    args.arch = args.arch or made.get("arch", "resnet50")
    args.image_size = args.image_size or made.get("image_size", 224)
    log(f"network: {args.arch} at {args.image_size} px ({'as in ' + origin if origin else 'defaults'}; "
        f"--arch/--image-size override)")


def check_arguments(args, protocol):
    if args.knn and args.label_fraction is not None:
        fail("--knn and --label-fraction are two protocols; run them one at a time")
    if (args.cached_features or args.standardize) and protocol != "linear":
        fail(f"--{'cached-features' if args.cached_features else 'standardize'} applies to the linear probe only; drop it")
    if args.label_fraction is not None and not 0 < args.label_fraction <= 1:
        fail(f"--label-fraction {args.label_fraction} must be in (0, 1], e.g. 0.01 or 0.1")
    if args.subset_file is not None and args.label_fraction is None:
        fail("--subset-file is for semi-supervised fine-tuning; also pass --label-fraction (0.01 or 0.1)")
    if args.epochs is not None and args.epochs < 1:
        fail(f"--epochs {args.epochs} must be at least 1")
    if protocol == "knn":
        try:
            args.knn_k = [int(k) for k in str(args.knn_k).split(",")]
        except ValueError:
            args.knn_k = []
        if not args.knn_k or min(args.knn_k) < 1:
            fail(f"--knn-k {args.knn_k} must list positive neighbour counts, e.g. 20,200")


# ---------------------------------------------------------------- data

def list_val_images(data_root, classes):
    """(paths, labels) of ROOT/val with labels indexing `classes` (train's order).

    Two layouts: ImageFolder (val/<class>/..., class folders named as in train/, any subset of them)
    or tiny-ImageNet's val/images/*.JPEG + val/val_annotations.txt ("file<TAB>class<TAB>box...").
    """
    val_dir = os.path.join(data_root, "val")
    index = {c: i for i, c in enumerate(classes)}
    annotations = os.path.join(val_dir, "val_annotations.txt")
    if os.path.isfile(annotations):
        pairs = []
        with open(annotations) as f:
            for number, line in enumerate(f, 1):
                fields = line.strip().split("\t")
                if not fields[0]:
                    continue
                if len(fields) < 2:
                    fail(f"{annotations} line {number} has no class column; expected 'file<TAB>class<TAB>...'")
                pairs.append((fields[0], fields[1]))
        paths, labels = [], []
        for name, cls in sorted(pairs):
            if cls not in index:
                fail(f"{annotations} labels {name} as class {cls}, which train/ does not have; "
                     f"use the train/ that belongs to this val/")
            path = os.path.join(val_dir, "images", name)
            if not os.path.isfile(path):
                fail(f"{path} is listed in {annotations} but missing; restore val/images/")
            paths.append(path)
            labels.append(index[cls])
        if not paths:
            fail(f"{annotations} lists no images")
        return paths, labels
    if not os.path.isdir(val_dir):
        fail(f"{val_dir} not found; the evaluation needs ROOT/val/ (ImageFolder, or tiny-ImageNet's "
             f"images/ + val_annotations.txt)")
    paths, folder_labels, folders = extract.list_images(val_dir)
    unknown = [c for c in folders if c not in index]
    if unknown:
        fail(f"{val_dir} has class folder(s) {unknown[:3]} that train/ lacks; name val/ folders as in train/")
    return paths, [index[folders[label]] for label in folder_labels]


def probe_train_transform(image_size):
    """The probe's and fine-tuning's training crops: random resized crop + flip, nothing else."""
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(extract.IMAGENET_MEAN, extract.IMAGENET_STD)])


def class_balanced_subset(labels, fraction, seed):
    """Sorted indices: round(fraction x n_c) images (at least 1) of every class c, drawn with `seed`."""
    labels = torch.as_tensor(labels)
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in range(int(labels.max()) + 1):
        members = (labels == c).nonzero()[:, 0]
        if len(members):
            take = max(1, round(fraction * len(members)))
            chosen.append(members[torch.randperm(len(members), generator=generator)[:take]])
    return sorted(torch.cat(chosen).tolist())


def read_subset_file(path, train_paths, train_dir):
    """Sorted indices of the images a subset file names: one per line, a path under train/ or a
    bare file name (as in the 1% / 10% ImageNet lists)."""
    if not os.path.isfile(path):
        fail(f"--subset-file {path} not found")
    rel = [os.path.relpath(p, train_dir).replace(os.sep, "/") for p in train_paths]
    by_rel = {r: i for i, r in enumerate(rel)}
    by_name = {}
    for i, r in enumerate(rel):
        by_name.setdefault(os.path.basename(r), []).append(i)
    chosen = set()
    with open(path) as f:
        for line in f:
            name = line.strip()
            if not name:
                continue
            if name in by_rel:
                chosen.add(by_rel[name])
            elif "/" not in name and len(by_name.get(name, [])) == 1:
                chosen.add(by_name[name][0])
            else:
                fail(f"--subset-file {path} names {name!r}, which is not one image under {train_dir} "
                     f"(give paths relative to train/ or unique file names)")
    if not chosen:
        fail(f"--subset-file {path} names no images")
    return sorted(chosen)


# ---------------------------------------------------------------- the backbone

def load_pretrained_backbone(source, arch, image_size, seed=0):
    """(backbone, feature width, description). source: 'none' (random init from `seed`), a 02/01
    checkpoint ({"network": ...}: its backbone.* keys), or a torchvision-named ResNet state_dict
    (optionally under "state_dict", optionally prefixed "module."). Strict: only fc.* may be
    missing or extra; any other missing, unexpected or misshapen tensor is a fail()."""
    torch.manual_seed(seed)  # the random baseline is the same network on every rank and every run
    backbone, width = extract.build_backbone(arch, image_size)
    if source == "none":
        return backbone, width, f"none (random init, seed {seed})"
    if not os.path.isfile(source):
        fail(f"--pretrained {source} not found; pass RUN/backbone.pt, a 02 checkpoint.pt, or none")
    try:
        obj = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        fail(f"cannot read --pretrained {source} ({type(e).__name__}); it must be a torch.save'd state_dict "
             f"or checkpoint of tensors")
    if not isinstance(obj, dict):
        fail(f"--pretrained {source} holds a {type(obj).__name__}, not a state_dict")
    if isinstance(obj.get("network"), dict):  # 01 init.pt / 02 checkpoint.pt
        made = obj.get("args") or {}
        if made.get("arch", arch) != arch or made.get("image_size", image_size) != image_size:
            fail(f"{source} was trained as {made['arch']} at {made['image_size']} px; "
                 f"pass --arch {made['arch']} --image-size {made['image_size']}")
        state = {k[len("backbone."):]: v for k, v in obj["network"].items() if k.startswith("backbone.")}
    elif isinstance(obj.get("state_dict"), dict):
        state = obj["state_dict"]
    else:
        state = obj
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # the classifier may come or not
    expected = backbone.state_dict()
    problems = [f"unexpected key {k}" for k in state if k not in expected]
    problems += [f"missing key {k}" for k in expected if k not in state]
    problems += [f"{k} has shape {list(v.shape)} but {arch} at {image_size} px needs {list(expected[k].shape)}"
                 for k, v in state.items() if k in expected and (not torch.is_tensor(v) or v.shape != expected[k].shape)]
    if problems:
        hint = ("; conv1 differs: <= 64 px uses the 3x3 small stem, pass the --image-size it was trained at"
                if any(p.startswith("conv1.weight has shape") for p in problems) else "")
        fail(f"--pretrained {source} does not fit {arch}: {'; '.join(problems[:3])}"
             f"{f' (+{len(problems) - 3} more)' if len(problems) > 3 else ''}{hint}; only fc.* may differ, "
             f"pass the matching --arch/--image-size or a torchvision-named ResNet state_dict")
    backbone.load_state_dict(state)
    return backbone, width, os.path.abspath(source)


BN_SAMPLE, BN_BATCH = 10000, 256  # the random baseline's BN statistics: images, and images per batch


def estimate_bn_statistics(backbone, paths, args, device, log):
    """Give the random-init baseline BN statistics of the training images, as a trained backbone
    has: the average over shuffled batches of BN_BATCH (01's prior pass, BN in training mode; a
    fixed batch, so any process count gives the same statistics) of the centre crops of up to
    BN_SAMPLE training images drawn with --seed. Without this its BN would normalise with the
    untouched 0 / 1, and the comparison with a trained backbone would not be fair."""
    sample = torch.randperm(len(paths), generator=torch.Generator().manual_seed(args.seed))[:BN_SAMPLE]
    extract.track_bn_averages(backbone)
    backbone.train()
    for _ in extract.prior_pass(backbone, [paths[i] for i in sample], extract.eval_transform(args.image_size),
                                BN_BATCH, args.workers, device, args.seed):
        pass
    extract.merge_bn_averages(backbone)
    backbone.eval()
    log(f"random-init baseline: BN statistics estimated on {len(sample)} training images "
        f"(centre crops, shuffled batches of {min(BN_BATCH, len(sample))})")


@torch.no_grad()
def embed(backbone, paths, image_size, batch_size, workers, device):
    """Pooled backbone features [len(paths), width] (float32, on `device`) of the centre crops,
    BN in eval mode, in file order."""
    backbone.eval()
    loader = torch.utils.data.DataLoader(extract.ImageList(paths, extract.eval_transform(image_size)),
                                         batch_size=batch_size, num_workers=workers,
                                         pin_memory=device.type == "cuda")
    features = None
    with extract.bad_images_fail():
        for images, index in loader:
            with autocast(device):
                out = backbone(to_device(images, device)).float()
            if features is None:
                features = torch.empty(len(paths), out.shape[1], device=device)
            features[index.to(device)] = out
    return features


class Probe(nn.Module):
    """backbone -> (features - shift) x scale -> linear classifier. frozen: the backbone runs without
    gradients and stays in eval mode whatever .train() is asked, so BN statistics never move (the
    linear-probe protocol). shift/scale stay 0/1 unless --standardize sets them (a fixed affine map
    the linear layer could absorb, so the probe stays linear)."""

    def __init__(self, backbone, width, num_classes, frozen):
        super().__init__()
        self.backbone, self.frozen = backbone, frozen
        self.register_buffer("shift", torch.zeros(width))
        self.register_buffer("scale", torch.ones(width))
        self.fc = nn.Linear(width, num_classes)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)
        if frozen:
            backbone.requires_grad_(False)

    def train(self, mode=True):
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def forward(self, images):
        with torch.no_grad() if self.frozen else contextlib.nullcontext():
            features = self.backbone(images)
        return self.classify(features)

    def classify(self, features):
        return self.fc((features.float() - self.shift) * self.scale)


# ---------------------------------------------------------------- linear probe and fine-tuning

def trained_protocol(args, protocol, stem, backbone, width, data, device, log):
    """The linear probe (frozen, on images or cached features) and semi-supervised fine-tuning:
    one training loop with per-epoch evaluation, logging and atomic checkpoints."""
    rank, world = dsm.get_rank(), dsm.get_world_size()
    torch.manual_seed(args.seed)  # the same initial linear layer on every rank
    probe = Probe(backbone, width, data["num_classes"], frozen=protocol == "linear").to(device)
    paths, labels = data["paths"], data["labels"]
    settings = {"epochs": args.epochs, "batch_size": args.batch_size, "momentum": args.momentum,
                "weight_decay": args.weight_decay, "seed": args.seed, "cached_features": args.cached_features,
                "standardize": args.standardize}

    # ---- labelled subset (semi-supervised) ----
    if protocol == "semi":
        train_dir = os.path.join(args.data, "train")
        subset = (read_subset_file(args.subset_file, paths, train_dir) if args.subset_file
                  else class_balanced_subset(labels, args.label_fraction, args.seed))
        paths, labels = [paths[i] for i in subset], [labels[i] for i in subset]
        rel = "\n".join(os.path.relpath(p, train_dir).replace(os.sep, "/") for p in paths)
        settings.update(label_fraction=args.label_fraction, subset_file=args.subset_file,
                        labelled_images=len(paths), subset_sha256=hashlib.sha256(rel.encode()).hexdigest())
        if dsm.is_main():
            with open(os.path.join(args.out, stem + "_subset.txt"), "w") as f:
                f.write(rel + "\n")
        log(f"labelled subset: {len(paths)} images ({100 * len(paths) / len(data['paths']):.2f}% of train, "
            f"{'from ' + args.subset_file if args.subset_file else f'class-balanced, seed {args.seed}'}); "
            f"listed in {os.path.join(args.out, stem + '_subset.txt')}")

    # ---- optimiser: the paper's lrs, scaled linearly with the batch ----
    reference = 2048 if protocol == "linear" else 256
    lr = args.lr if args.lr is not None else (40.0 if protocol == "linear" else
                                              15.0 if args.label_fraction <= 0.01 else 10.0)
    scale = args.batch_size / reference
    groups = [{"params": probe.fc.parameters(), "lr": lr * scale, "base_lr": lr * scale}]
    if protocol == "semi":
        groups.append({"params": probe.backbone.parameters(), "lr": args.backbone_lr * scale,
                       "base_lr": args.backbone_lr * scale})
        settings["backbone_lr"] = args.backbone_lr * scale
    settings["lr"] = lr * scale
    optimizer = torch.optim.SGD(groups, momentum=args.momentum, weight_decay=args.weight_decay)
    log(f"lr {lr:g} x {args.batch_size}/{reference} = {lr * scale:.6g} (linear layer)"
        + (f", {args.backbone_lr:g} x {args.batch_size}/{reference} = {args.backbone_lr * scale:.6g} (backbone)"
           if protocol == "semi" else "") + f", cosine over {args.epochs} epochs, momentum {args.momentum}, "
        f"weight decay {args.weight_decay:g}")
    snapshot = ({k: v.detach().clone() for k, v in backbone.state_dict().items()}
                if protocol == "linear" else None)

    # ---- training and evaluation, per protocol ----
    if args.cached_features:
        t0 = time.perf_counter()
        start, end = dsm.shard_range(len(paths), rank, world)
        v0, v1 = dsm.shard_range(len(data["val_paths"]), rank, world)
        train_x = embed(backbone, paths[start:end], args.image_size, data["local_batch"], args.workers, device)
        val_x = embed(backbone, data["val_paths"][v0:v1], args.image_size, data["local_batch"], args.workers, device)
        train_y = torch.tensor(labels[start:end], device=device)
        val_y = torch.tensor(data["val_labels"][v0:v1], device=device)
        log(f"cached features: {len(paths)} train + {len(data['val_paths'])} val images embedded in "
            f"{time.perf_counter() - t0:.1f} s")
        if args.standardize:
            standardize(probe, train_x, log)

        def train_epoch(epoch):
            with one_cpu_thread(device):
                return cached_epoch(probe, optimizer, train_x, train_y, start, len(paths), args, epoch)

        def evaluate():
            with torch.no_grad(), one_cpu_thread(device):
                return topk_hits(probe.classify(val_x), val_y)
    else:
        model = probe
        if world > 1:
            model = DistributedDataParallel(probe, device_ids=[device] if device.type == "cuda" else None)
        dataset = extract.ImageList(paths, probe_train_transform(args.image_size))
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                                      seed=args.seed)
        loader = torch.utils.data.DataLoader(dataset, batch_size=data["local_batch"], sampler=sampler,
                                             num_workers=args.workers, pin_memory=device.type == "cuda")
        label_table = torch.tensor(labels)
        if args.standardize:
            sample = sorted(torch.randperm(len(paths), generator=torch.Generator().manual_seed(args.seed))[:10000].tolist())
            s0, s1 = dsm.shard_range(len(sample), rank, world)
            standardize(probe, embed(backbone, [paths[i] for i in sample[s0:s1]], args.image_size,
                                     data["local_batch"], args.workers, device), log)

        def train_epoch(epoch):
            pretrain.seed_everything(pretrain.step_seed(args.seed, epoch, rank))  # resumable crops
            sampler.set_epoch(epoch)
            return image_epoch(model, optimizer, loader, label_table, args, epoch, device, log)

        def evaluate():
            return evaluate_images(probe, data["val_paths"], data["val_labels"], args, data["local_batch"], device)

    # ---- resume ----
    ckpt_path = os.path.join(args.out, stem + ("_cached" if args.cached_features else "") + "_checkpoint.pt")
    log_path = os.path.join(args.out, stem + "_log.jsonl")
    trained = probe if protocol == "semi" else probe.fc  # what the checkpoint must restore
    history, first_epoch = [], 0
    settings["backbone_sha256"] = state_fingerprint(backbone)
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True) if os.path.isfile(ckpt_path) else None
    if ckpt is not None and ckpt["settings"].get("backbone_sha256") != settings["backbone_sha256"]:
        log(f"note: {ckpt_path} belongs to another backbone (retrained or another --pretrained); starting over")
        ckpt = None
    if ckpt is not None:
        saved = ckpt["settings"]
        pretrain.refuse_changed_settings(ckpt_path, saved, settings, sorted(set(settings) | set(saved)))
        trained.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        history, first_epoch = ckpt["history"], ckpt["epoch"] + 1
        log(f"resumed from {ckpt_path}: {first_epoch}/{args.epochs} epoch(s) done "
            f"(saved by {ckpt['world_size']} process(es), now {world})")
        del ckpt

    # ---- epochs ----
    t_start = time.perf_counter()
    for epoch in range(first_epoch, args.epochs):
        t0 = time.perf_counter()
        loss, lr_now = train_epoch(epoch)
        top1, top5, count = evaluate()
        seconds = time.perf_counter() - t0
        eta = (time.perf_counter() - t_start) / (epoch + 1 - first_epoch) * (args.epochs - epoch - 1)
        record = {"epoch": epoch, "loss": loss, "lr": lr_now, "top1": top1, "top5": top5, "val_images": count,
                  "epoch_s": round(seconds, 3)}
        history.append(record)
        if dsm.is_main():
            print(f"epoch {epoch + 1}/{args.epochs} loss {loss:.4f} lr {lr_now:.4g} top-1 {top1:.2f} "
                  f"top-5 {top5:.2f} ({count} val) {seconds:.1f} s eta {pretrain.format_seconds(eta)}", flush=True)
            pretrain.write_log(log_path, record)
            dsm.atomic_save({"model": {k: v.detach().cpu() for k, v in trained.state_dict().items()},
                             "optimizer": optimizer.state_dict(), "epoch": epoch, "history": history,
                             "settings": settings, "world_size": world}, ckpt_path)

    # ---- the frozen backbone must be exactly what was loaded ----
    result = {"top1": history[-1]["top1"], "top5": history[-1]["top5"], "settings": settings,
              "best_top1": max(h["top1"] for h in history), "history": history}
    if snapshot is not None:
        changed = changed_tensors(backbone, snapshot)
        if changed:
            fail(f"the frozen backbone changed during the linear probe ({', '.join(changed[:3])}); this is a bug, "
                 f"please report it")
        log(f"backbone unchanged: all {len(snapshot)} tensors bit-identical to the loaded ones")
        result["backbone_unchanged"] = True
    return result


def image_epoch(model, optimizer, loader, label_table, args, epoch, device, log):
    """One epoch on augmented images; lr set every step (cosine). Returns (mean loss, last lr)."""
    model.train()
    steps = len(loader)
    meter, total, lr = pretrain.Meter(), 0.0, 0.0
    for i, ((images, index), wait) in enumerate(pretrain.timed_batches(loader)):
        meter.wait += wait
        lr = set_lr(optimizer, epoch + (i + 0.5) / steps, args.epochs)
        targets = label_table[index].to(device, non_blocking=True)
        with autocast(device):
            logits = model(to_device(images, device))
        loss = F.cross_entropy(logits.float(), targets)
        value = average_over_ranks(loss.item(), device)  # the global mean: every rank stops together
        if not math.isfinite(value):
            fail(f"loss is {value} at epoch {epoch} step {i}; lower --lr and rerun to resume from the last epoch")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += value
        meter.add(value)
        if (i + 1) % args.print_freq == 0 and i + 1 < steps:
            record = meter.report(epoch, i + 1, steps, i + 1, lr, args.batch_size, args.batch_size,
                                  steps - i - 1, device)
            log(f"epoch {epoch + 1} step {i + 1}/{steps} loss {record['loss']:.4f} lr {lr:.4g} "
                f"img/s {record['images_per_s']:.0f} data {100 * record['data_wait']:.0f}% "
                f"mem {record['peak_mem_gib']:.2f}G", flush=True)
            meter = pretrain.Meter()
    return total / max(steps, 1), lr


def cached_epoch(probe, optimizer, train_x, train_y, start, num_train, args, epoch):
    """One epoch of the linear layer on cached features. The global batches come from one
    permutation shared by all ranks; each rank takes the members of the batch in its feature shard
    [start, start + len(train_x)) and one all_reduce sums gradients and loss, so the step equals
    the single-process one on any process count. Returns (mean loss, last lr)."""
    order = torch.randperm(num_train, generator=torch.Generator().manual_seed(args.seed * 1000003 + epoch))
    order = order.to(train_x.device)
    steps = math.ceil(num_train / args.batch_size)
    params = [probe.fc.weight, probe.fc.bias]  # the order of the gradients in `flat`
    total, lr = 0.0, 0.0
    for i in range(steps):
        batch = order[i * args.batch_size:(i + 1) * args.batch_size]
        mine = batch[(batch >= start) & (batch < start + len(train_x))] - start
        lr = set_lr(optimizer, epoch + (i + 0.5) / steps, args.epochs)
        # Cross-entropy and its gradient in closed form (d loss / d logits = softmax - one-hot):
        # the layer is tiny, and skipping autograd keeps a CPU epoch at milliseconds.
        with torch.no_grad():
            z = (train_x[mine] - probe.shift) * probe.scale
            logits = probe.fc(z)
            g = logits.softmax(dim=1)
            target = train_y[mine]
            loss_sum = (logits.logsumexp(dim=1) - logits.gather(1, target[:, None])[:, 0]).sum()
            g[torch.arange(len(target), device=g.device), target] -= 1
            flat = torch.cat([(g.t() @ z).flatten(), g.sum(0), loss_sum.view(1)])
        if dist.is_initialized():
            dist.all_reduce(flat)
        flat /= len(batch)  # the mean over the global batch
        offset = 0
        for p in params:
            p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        optimizer.step()
        value = flat[-1].item()
        if not math.isfinite(value):
            fail(f"loss is {value} at epoch {epoch} step {i}; lower --lr and rerun to resume from the last epoch")
        total += value
    return total / steps, lr


def standardize(probe, features, log):
    """Set the probe's shift/scale to the per-dimension mean and 1/std of the features, summed over
    the ranks' shards (float64), so every process gets the same values."""
    stats = torch.cat([features.double().sum(0), features.double().pow(2).sum(0),
                       torch.tensor([len(features)], dtype=torch.float64, device=features.device)])
    if dist.is_initialized():
        dist.all_reduce(stats)
    width, count = features.shape[1], stats[-1]
    mean = stats[:width] / count
    var = (stats[width:2 * width] / count - mean ** 2).clamp_min(0)
    probe.shift.copy_(mean)
    probe.scale.copy_(1 / (var.sqrt() + 1e-6))
    log(f"standardised features: mean |shift| {mean.abs().mean():.4g}, mean std {var.sqrt().mean():.4g} "
        f"over {int(count)} train images")


def set_lr(optimizer, progress, epochs):
    """Cosine decay (no warm-up) of every group's base_lr; progress in epochs. Returns the first group's lr."""
    for group in optimizer.param_groups:
        group["lr"] = pretrain.learning_rate(group["base_lr"], progress, 0, epochs)
    return optimizer.param_groups[0]["lr"]


@torch.no_grad()
def evaluate_images(probe, val_paths, val_labels, args, batch_size, device):
    """(top-1 %, top-5 %, images counted) on the centre crops of val. Each rank scores its own
    contiguous shard and the hit counts are summed: every image exactly once, any process count."""
    probe.eval()
    start, end = dsm.shard_range(len(val_paths), dsm.get_rank(), dsm.get_world_size())
    loader = torch.utils.data.DataLoader(extract.ImageList(val_paths[start:end], extract.eval_transform(args.image_size)),
                                         batch_size=batch_size, num_workers=args.workers,
                                         pin_memory=device.type == "cuda")
    labels = torch.tensor(val_labels[start:end])
    hits = torch.zeros(3, dtype=torch.float64, device=device)
    with extract.bad_images_fail():
        for images, index in loader:
            with autocast(device):
                logits = probe(to_device(images, device))
            hits += local_hits(logits.float(), labels[index].to(device))
    return finish_hits(hits)


def topk_hits(logits, targets):
    """(top-1 %, top-5 %, count) of this rank's logits, summed over the ranks."""
    return finish_hits(local_hits(logits, targets))


def local_hits(logits, targets):
    """[top-1 hits, top-5 hits, count] (float64) of one rank's predictions; top-5 clamps to the class count."""
    k = min(5, logits.shape[1])
    correct = logits.topk(k, dim=1).indices == targets[:, None]
    return torch.stack([correct[:, 0].sum(), correct.any(1).sum(), torch.tensor(len(targets), device=logits.device)]).double()


def finish_hits(hits):
    if dist.is_initialized():
        dist.all_reduce(hits)
    top1, top5, count = hits.tolist()
    return 100 * top1 / max(count, 1), 100 * top5 / max(count, 1), int(count)


def average_over_ranks(value, device):
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dsm.get_world_size()


def state_fingerprint(module):
    """sha256 of a module's state_dict values (a resumed run must continue on the same backbone)."""
    digest = hashlib.sha256()
    for key, value in module.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def changed_tensors(module, snapshot):
    """Names of the state_dict tensors of `module` that are not bit-identical to `snapshot`."""
    state = module.state_dict()
    return [k for k, v in snapshot.items() if not torch.equal(state[k], v)]


# ---------------------------------------------------------------- weighted kNN

def knn_protocol(args, backbone, data, device, log):
    """Embed train (sharded over the ranks) and val (gathered to every rank), vote, score."""
    rank, world = dsm.get_rank(), dsm.get_world_size()
    t0 = time.perf_counter()
    start, end = dsm.shard_range(len(data["paths"]), rank, world)
    v0, v1 = dsm.shard_range(len(data["val_paths"]), rank, world)
    train_x = F.normalize(embed(backbone, data["paths"][start:end], args.image_size, data["local_batch"],
                                args.workers, device), dim=1)
    val_x = F.normalize(embed(backbone, data["val_paths"][v0:v1], args.image_size, data["local_batch"],
                              args.workers, device), dim=1)
    val_x = gather_rows(val_x, len(data["val_paths"]))
    log(f"embedded {len(data['paths'])} train + {len(data['val_paths'])} val images in {time.perf_counter() - t0:.1f} s")
    train_y = torch.tensor(data["labels"][start:end], device=device)
    val_y = torch.tensor(data["val_labels"], device=device)
    t0 = time.perf_counter()
    ks = [min(k, len(data["paths"])) for k in args.knn_k]
    if ks != args.knn_k:
        log(f"note: k clamped to the {len(data['paths'])} training images: {args.knn_k} -> {ks}")
    hits = {k: torch.zeros(3, dtype=torch.float64, device=device) for k in ks}
    for q0 in range(0, len(val_x), args.chunk_size):
        scores = knn_class_scores(train_x, train_y, val_x[q0:q0 + args.chunk_size], data["num_classes"], ks,
                                  args.knn_temperature, args.chunk_size)
        for k in ks:
            hits[k] += local_hits(scores[k], val_y[q0:q0 + args.chunk_size])
    results = {}
    for k in ks:  # every rank scored every query: no all_reduce of the counts
        top1, top5, count = hits[k].tolist()
        results[str(k)] = {"top1": 100 * top1 / count, "top5": 100 * top5 / count}
        log(f"kNN k={k} T={args.knn_temperature:g}: top-1 {results[str(k)]['top1']:.2f} "
            f"top-5 {results[str(k)]['top5']:.2f} ({int(count)} val)")
    log(f"voting took {time.perf_counter() - t0:.1f} s")
    first = results[str(ks[0])]
    return {"top1": first["top1"], "top5": first["top5"], "k": ks[0], "results": results,
            "settings": {"k": ks, "temperature": args.knn_temperature, "chunk_size": args.chunk_size}}


@torch.no_grad()
def knn_class_scores(train_x, train_y, queries, num_classes, ks, temperature=0.07, chunk_size=4096):
    """Weighted-kNN class scores {k: [Q, num_classes]} for every k in ks, the same on every rank.

    train_x [n_local, d] / train_y [n_local]: this rank's shard of the L2-normalised training
    features (shards may differ in size, or be empty); queries [Q, d]: L2-normalised, the same on
    every rank. score_c = sum over the k nearest training rows of class c of exp(sim / temperature).
    Each rank keeps a running top-k over chunks of its shard (memory: Q x (k + chunk)), then one
    all_gather of the candidates and a top-k over all of them gives the global neighbours.
    """
    total = len(train_x)
    if dist.is_initialized():
        count = torch.tensor([total], device=queries.device)
        dist.all_reduce(count)
        total = int(count.item())
    kmax = min(max(ks), total)
    values = torch.full((len(queries), kmax), -math.inf, device=queries.device)
    classes = torch.zeros(len(queries), kmax, dtype=torch.long, device=queries.device)
    for c0 in range(0, len(train_x), chunk_size):
        sim = queries @ train_x[c0:c0 + chunk_size].t()
        candidates = torch.cat([values, sim], dim=1)
        values, pick = candidates.topk(kmax, dim=1)
        labels = torch.cat([classes, train_y[c0:c0 + chunk_size].expand(len(queries), -1)], dim=1)
        classes = labels.gather(1, pick)
    if dist.is_initialized() and dsm.get_world_size() > 1:
        values = torch.cat(all_gather(values), dim=1)
        classes = torch.cat(all_gather(classes), dim=1)
        values, pick = values.topk(kmax, dim=1)
        classes = classes.gather(1, pick)
    scores = {}
    for k in ks:
        k = min(k, total)
        weights = (values[:, :k] / temperature).exp()  # padding (-inf) weighs 0
        scores[k] = torch.zeros(len(queries), num_classes, device=queries.device).scatter_add_(1, classes[:, :k], weights)
    return scores


def all_gather(tensor):
    parts = [torch.empty_like(tensor) for _ in range(dsm.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return parts


def gather_rows(local, total):
    """Concatenate the ranks' contiguous shard_range shards [n_r, d] into [total, d] on every rank."""
    world = dsm.get_world_size()
    if world == 1:
        return local
    size = dsm.shard_range(total, 0, world)[1]  # rank 0's shard is the largest
    padded = torch.zeros(size, local.shape[1], dtype=local.dtype, device=local.device)
    padded[:len(local)] = local
    parts = all_gather(padded)
    return torch.cat([part[:e - s] for part, (s, e) in
                      zip(parts, (dsm.shard_range(total, r, world) for r in range(world)))])


# ---------------------------------------------------------------- small helpers

def autocast(device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


@contextlib.contextmanager
def one_cpu_thread(device):
    """On CPU, run the cached probe's many tiny matrix ops on one thread: waking a thread pool for
    each costs more than the op (and far more on a busy machine)."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def to_device(images, device):
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else images




if __name__ == "__main__":
    main()
