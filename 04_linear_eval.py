"""Stage 04: the ImageNet evaluation protocols behind Tables 2-7: linear probe, 1% / 10% labels, and kNN.

The backbone is RUN/backbone.pt (02), --pretrained PATH (a 02 checkpoint.pt, a 01 init.pt, any
torchvision-named ResNet state_dict), or --pretrained random: the random network (seeded by --seed,
BN statistics estimated on the training images), the baseline; its results get a _random suffix.

  linear probe (default)  frozen backbone (BN in eval mode, checked bit-identical at the end), one linear layer on
                          the pooled features; the paper's batch 2048, lr 40 (scaled with the batch), cosine; 100
                          epochs, momentum 0.9, no weight decay, random resized crops + flip: this project's choice.
                          --cached-features: trained on centre-crop features embedded once (no augmentation; minutes,
                          not hours). --standardize: a fixed per-feature standardisation first (off by default).
  --label-fraction F      Table 7 (top-5): fine-tune everything on a fraction F of the labels, backbone lr 0.001,
                          classifier lr 15 (1%) / 10 (10%) as the paper; batch 256 (lr scaled), cosine, 20 epochs (ours)
                          The paper's published 1% / 10% lists: --subset-file; without it a class-balanced draw.
  --knn                   weighted kNN (not in the paper; the usual instance-discrimination check, 02's kNN curve):
                          the k = 20 and 200 most cosine-similar training images vote with weight exp(sim / 0.07)

Results: RUN/<linear_eval|linear_eval_cached|knn|semi_F>[_random].json, per-epoch lines in <name>_log.jsonl; the
trained ones resume (same command, any process count). 05 reuses the backbone loading, model, epochs and evaluation.

Commands (after 01 and 02; --arch and --image-size default to the run's):
  python 04_linear_eval.py --data demo_data --out runs/demo --batch-size 256 --knn
  python 04_linear_eval.py --data demo_data --out runs/demo --batch-size 256 --knn --pretrained random
  torchrun --nproc_per_node=8 04_linear_eval.py --data /datasets/imagenet --out runs/in1k
  torchrun --nnodes=8 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
      04_linear_eval.py --data /datasets/imagenet --out runs/in1k --label-fraction 0.01
ROOT/val: ImageFolder with train/'s class names, or tiny-ImageNet's images/ + val_annotations.txt.
"""
import collections
import contextlib
import hashlib
import importlib
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchvision import transforms

import dist_softmax as dsm

shared = importlib.import_module("01_extract_init")  # 01, and below its banner what every stage shares
fail, log, POSITIVE = shared.fail, shared.log, shared.POSITIVE

parser = shared.Parser(__doc__)
shared.add_common_args(parser, epochs=None, batch_size=None, network_of_run=True)
parser.add_argument("--epochs", type=POSITIVE, default=None, help="linear probe: 100; semi-supervised: 20")
parser.add_argument("--pretrained", default=None, metavar="PATH|random",
                    help="backbone to evaluate (default RUN/backbone.pt); 'random': the random-init baseline")
parser.add_argument("--knn", action="store_true", help="weighted kNN instead of the linear probe")
parser.add_argument("--knn-k", type=lambda text: [POSITIVE(k) for k in text.split(",")], default=[20, 200],
                    help="neighbour counts, comma-separated (the first gives top1/top5)")
parser.add_argument("--knn-temperature", type=shared.RATE, default=0.07)
parser.add_argument("--chunk-size", type=POSITIVE, default=4096,
                    help="kNN: queries and training rows per similarity block (bounds memory)")
parser.add_argument("--label-fraction", type=shared.number(float, 0, 1, open_low=True), default=None, metavar="F",
                    help="semi-supervised fine-tuning on a class-balanced fraction F of the labels (0.01, 0.1)")
parser.add_argument("--subset-file", default=None,
                    help="semi-supervised: the labelled images, one per line (path under train/ or file name)")
parser.add_argument("--cached-features", action="store_true",
                    help="linear probe on features embedded once without augmentation (fast)")
parser.add_argument("--standardize", action="store_true", help="linear probe: standardise each feature with the "
                    "train mean/std (up to 10000 centre crops) first; one lr then fits any backbone's feature scale")
parser.add_argument("--lr", type=shared.RATE, default=None,
                    help="linear layer lr at the reference batch: 40 at 2048 (probe); 15 (1%%) / 10 at 256 (semi)")
parser.add_argument("--backbone-lr", type=shared.NON_NEGATIVE, default=0.001,
                    help="semi-supervised backbone lr at batch 256")
parser.add_argument("--momentum", type=shared.FRACTION, default=0.9)
parser.add_argument("--weight-decay", type=shared.NON_NEGATIVE, default=0.0)
parser.add_argument("--print-freq", type=POSITIVE, default=50, help="steps between progress lines (image training)")

SAMPLE = 10000  # training images behind --standardize and the random baseline's BN statistics
BN_BATCH = 256  # images per batch when the random baseline's BN statistics are estimated
RETRY = "lower --lr and rerun to resume from the last epoch"  # the advice of a non-finite loss


def main(argv=None):
    args = parser.parse_args(argv)
    protocol = "knn" if args.knn else "semi" if args.label_fraction is not None else "linear"
    if args.knn and args.label_fraction is not None:
        fail("--knn and --label-fraction are two protocols; run them one at a time")
    if (args.cached_features or args.standardize) and protocol != "linear":
        fail(f"--{'cached-features' if args.cached_features else 'standardize'} is for the linear probe only; drop it")
    if args.subset_file is not None and args.label_fraction is None:
        fail("--subset-file is for semi-supervised fine-tuning; also pass --label-fraction (0.01 or 0.1)")
    with shared.stage(args) as device:
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        # ---- data ----
        paths, labels, classes = shared.list_images(os.path.join(args.data, "train"))
        val_paths, val_labels = shared.list_val_images(args.data, classes)
        fingerprint = shared.check_data(args.out, paths, args.data)
        args.batch_size = args.batch_size or (256 if protocol == "semi" else 2048)
        args.epochs = args.epochs or (20 if protocol == "semi" else 100)
        local_batch = shared.resolve_rank_batch(args.batch_size, dsm.get_world_size())

        # ---- backbone; --arch / --image-size default to the run's
        source = args.pretrained or os.path.join(args.out, "backbone.pt")
        shared.run_network(args)
        backbone, width, described = load_pretrained_backbone(source, args.arch, args.image_size, args.seed)
        backbone = backbone.to(device,
                               memory_format=torch.channels_last if device.type == "cuda" else torch.preserve_format)
        identity = state_fingerprint(backbone)  # before the random baseline's BN estimate, which rounds per run
        if source == "random":
            estimate_bn_statistics(backbone, paths, args, device)
        name = {"linear": "linear_eval", "knn": "knn"}.get(protocol) or f"semi_{args.label_fraction:g}"
        name += ("_cached" if args.cached_features else "") + ("_random" if source == "random" else "")
        log(f"04_linear_eval: {protocol}{' (cached features)' if args.cached_features else ''} of {described}; "
            f"{args.arch} at {args.image_size} px, {len(paths)} train / {len(val_paths)} val images, "
            f"{len(classes)} classes, {dsm.get_world_size()} process(es) on {device}, batch {args.batch_size} "
            f"({local_batch} per process)")

        # ---- the protocol ----
        train = shared.ImageList(paths, None, labels)
        val = shared.ImageList(val_paths, shared.eval_transform(args.image_size), val_labels)
        if protocol == "knn":
            result = knn_protocol(args, backbone, train, val, len(classes), device)
        else:
            settings = {"stage": "04_linear_eval", "data": fingerprint["sha256"], "backbone": identity, **{
                key: getattr(args, key) for key in ("arch", "image_size", "epochs", "batch_size", "momentum",
                                                    "weight_decay", "seed", "cached_features", "standardize")}}
            result = trained_protocol(args, protocol, name, settings, backbone, width, train, val, len(classes),
                                      local_batch, device)
        # ---- result ----
        result = {"protocol": protocol, "checkpoint": described, "arch": args.arch, "image_size": args.image_size,
                  "train_images": len(paths), "val_images": len(val_paths), "classes": len(classes),
                  "world_size": dsm.get_world_size(), **result}
        if dsm.is_main():
            path = os.path.join(args.out, name + ".json")
            shared.write_json(path, result)
            log(f"{protocol}: top-1 {result['top1']:.2f}  top-5 {result['top5']:.2f}  ({described}); wrote {path}")
    return result


# ---------------------------------------------------------------- the backbone (also 05's)

def load_pretrained_backbone(source, arch, image_size, seed=0, flag="--pretrained"):
    """(backbone, feature width, description). source: 'random' (random init from `seed`), a 02/01 checkpoint
    ({"network": ...}: its backbone.* keys), or a torchvision-named ResNet state_dict (optionally under "state_dict",
    optionally prefixed "module."). Only fc.* may be missing or extra, else one line naming `flag` (05's: --init)."""
    torch.manual_seed(seed)  # the random baseline is the same network on every rank and every run
    backbone, width = shared.build_backbone(arch, image_size)
    if source == "random":
        return backbone, width, f"random init (seed {seed})"
    if not os.path.exists(source):
        fail(f"{source} not found; run 02_pretrain.py first (it writes RUN/backbone.pt), pass {flag} PATH (a 02 "
             f"checkpoint.pt, a torchvision-named state_dict), or {flag} random for the random-init baseline")
    obj = shared.load_run_file(source, fix="it must be a torch.save'd state_dict or checkpoint of tensors",
                               what=f"{flag} {source}")
    if not isinstance(obj, dict):
        fail(f"{flag} {source} holds a {type(obj).__name__}, not a state_dict")
    if isinstance(obj.get("network"), dict):  # 01 init.pt / 02 checkpoint.pt
        made = obj.get("args") or {}
        if made.get("arch", arch) != arch or made.get("image_size", image_size) != image_size:
            fail(f"{source} was trained as {made['arch']} at {made['image_size']} px; "
                 f"pass --arch {made['arch']} --image-size {made['image_size']}")
        state = {k[len("backbone."):]: v for k, v in obj["network"].items() if k.startswith("backbone.")}
    else:
        state = obj["state_dict"] if isinstance(obj.get("state_dict"), dict) else obj
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # the classifier may come or not
    needed = backbone.state_dict()
    problems = [f"unexpected key {k}" for k in state if k not in needed]
    problems += [f"missing key {k}" for k in needed if k not in state]
    problems += [f"{k} has shape {list(v.shape)} but {arch} at {image_size} px needs {list(needed[k].shape)}"
                 for k, v in state.items() if k in needed and (not torch.is_tensor(v) or v.shape != needed[k].shape)]
    if problems:
        hint = ("; conv1 differs: <= 64 px uses the 3x3 small stem, pass the --image-size it was trained at"
                if any(p.startswith("conv1.weight has shape") for p in problems) else "")
        fail(f"{flag} {source} does not fit {arch}: {'; '.join(problems[:3])}"
             f"{f' (+{len(problems) - 3} more)' if len(problems) > 3 else ''}{hint}; only fc.* may differ, "
             f"pass the matching --arch/--image-size or a torchvision-named ResNet state_dict")
    backbone.load_state_dict(state)
    return backbone, width, os.path.abspath(source)


def estimate_bn_statistics(backbone, paths, args, device):
    """Give the random-init baseline BN statistics of the training images, as a trained backbone has (else BN
    normalises with the untouched 0 / 1: not a fair baseline): the average over shuffled batches of BN_BATCH (01's
    prior pass, running BN; a fixed batch: the same on any process count) of up to SAMPLE centre crops."""
    sample = shared.fixed_sample(len(paths), SAMPLE, args.seed)
    shared.set_bn_mode(backbone, "running")
    for _ in shared.prior_pass(backbone, [paths[i] for i in sample], BN_BATCH, args, device):
        pass
    shared.merge_bn_averages(backbone)
    backbone.eval()
    log(f"random-init baseline: BN statistics estimated on {len(sample)} training images "
        f"(centre crops, shuffled batches of {min(BN_BATCH, len(sample))})")


class Probe(nn.Module):
    """backbone -> (features - shift) x scale -> linear classifier. frozen: the backbone runs without gradients
    and stays in eval mode whatever .train() is asked, so BN statistics never move (the linear-probe protocol).
    shift/scale stay 0/1 unless --standardize sets them (a fixed affine map: the probe stays linear)."""

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


def state_fingerprint(module):
    """sha256 of a module's state_dict values (a resumed run must continue on the same backbone)."""
    digest = hashlib.sha256()
    for key, value in module.state_dict().items():
        digest.update(key.encode() + value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------- the protocols

def knn_protocol(args, backbone, train, val, num_classes, device):
    """Embed train (sharded over the ranks) and val (gathered to every rank), vote, score."""
    t0 = time.perf_counter()
    inputs = shared.embed_for_knn(backbone, (train.paths, train.labels), (val.paths, val.labels), args, device)
    log(f"embedded {len(train)} train + {len(val)} val images in {time.perf_counter() - t0:.1f} s")
    ks = list(dict.fromkeys(min(k, len(train)) for k in args.knn_k))
    if ks != args.knn_k:
        log(f"note: k clamped to the {len(train)} training images: {args.knn_k} -> {ks}")
    t0 = time.perf_counter()
    accuracy = shared.knn_accuracy(*inputs, num_classes, ks, args.knn_temperature, args.chunk_size)
    results = {str(k): {"top1": top1, "top5": top5} for k, (top1, top5) in accuracy.items()}
    for k, r in results.items():
        log(f"kNN k={k} T={args.knn_temperature:g}: top-1 {r['top1']:.2f} top-5 {r['top5']:.2f} ({len(val)} val)")
    log(f"voting took {time.perf_counter() - t0:.1f} s")
    return {**results[str(ks[0])], "k": ks[0], "results": results,  # top1, top5 of the first k
            "settings": {"k": ks, "temperature": args.knn_temperature}}


def trained_protocol(args, protocol, name, settings, backbone, width, train, val, num_classes, local_batch, device):
    """The linear probe (frozen; on images or cached features) and semi-supervised fine-tuning."""
    torch.manual_seed(args.seed)  # the same initial linear layer on every rank
    probe = Probe(backbone, width, num_classes, frozen=protocol == "linear").to(device)
    if protocol == "semi":
        train = labelled_subset(args, train, name, settings)
    optimizer = protocol_optimizer(args, protocol, probe, settings)
    snapshot = {k: v.detach().clone() for k, v in backbone.state_dict().items()} if protocol == "linear" else None
    epochs = cached_probe if args.cached_features else image_training  # -> (train one epoch, evaluate)
    history = fit(args, os.path.join(args.out, name), settings, probe if protocol == "semi" else probe.fc, optimizer,
                  *epochs(args, probe, optimizer, train, val, local_batch, device))
    result = {"top1": history[-1]["top1"], "top5": history[-1]["top5"], "settings": settings,
              "best_top1": max(h["top1"] for h in history), "history": history}
    if snapshot is not None:  # the frozen backbone must be exactly what was loaded
        state = backbone.state_dict()
        changed = [k for k, v in snapshot.items() if not torch.equal(state[k], v)]
        if changed:
            fail(f"the frozen backbone changed during the linear probe ({', '.join(changed[:3])}); this is a bug, "
                 f"please report it")
        log(f"backbone unchanged: all {len(snapshot)} tensors bit-identical to the loaded ones")
        result["backbone_unchanged"] = True
    return result


def fit(args, stem, settings, trained, optimizer, train_epoch, evaluate_epoch, after_epoch=None):
    """The epochs of a trained protocol (04's, 05's fine-tuning), resumed from <stem>_checkpoint.pt: train, evaluate,
    log to <stem>_log.jsonl, checkpoint `trained` and the optimizer, after_epoch(history). Returns the history."""
    ckpt_path, log_path = stem + "_checkpoint.pt", stem + "_log.jsonl"
    history = (shared.resume_from(ckpt_path, settings, trained, optimizer) or {}).get("history", [])
    shared.append_log(log_path, None, epochs_done=len(history))  # what a killed epoch logged goes
    t_start, first_epoch = time.perf_counter(), len(history)
    for epoch in range(first_epoch, args.epochs):
        shared.PROGRESS["where"] = (f"in epoch {epoch + 1} of {args.epochs} ({epoch} finished, "
                                    f"in {os.path.basename(ckpt_path)})")
        t0 = time.perf_counter()
        loss, lr_now = train_epoch(epoch)
        top1, top5, count = evaluate_epoch()
        eta = int((time.perf_counter() - t_start) / (epoch + 1 - first_epoch) * (args.epochs - epoch - 1))
        history.append({"epoch": epoch, "loss": loss, "lr": lr_now, "top1": top1, "top5": top5,
                        "val_images": count, "epoch_s": round(time.perf_counter() - t0, 3)})
        log(f"epoch {epoch + 1}/{args.epochs} loss {loss:.4f} lr {lr_now:.4g} top-1 {top1:.2f} top-5 {top5:.2f} "
            f"({count} val) {time.perf_counter() - t0:.1f} s eta {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}")
        shared.append_log(log_path, history[-1])  # before the checkpoint: a resume drops it if need be
        shared.save_for_resume(ckpt_path, settings, trained, optimizer, epoch=epoch, history=history)
        if after_epoch is not None:
            after_epoch(history)
    return history


def labelled_subset(args, train, name, settings):
    """Table 7's labelled images: a class-balanced --label-fraction drawn with --seed, or --subset-file; listed in
    RUN/<name>_subset.txt and fingerprinted in the settings."""
    train_dir = os.path.join(args.data, "train")
    chosen = (read_subset_file(args.subset_file, train.paths, train_dir) if args.subset_file
              else class_balanced_subset(train.labels, args.label_fraction, args.seed))
    subset = shared.ImageList([train.paths[i] for i in chosen], None, [train.labels[i] for i in chosen])
    rel = "\n".join(os.path.relpath(p, train_dir).replace(os.sep, "/") for p in subset.paths)
    settings.update(label_fraction=args.label_fraction, labelled_images=len(subset),
                    subset=hashlib.sha256(rel.encode()).hexdigest())
    listed = os.path.join(args.out, name + "_subset.txt")
    if dsm.is_main():
        shared.atomic_save((rel + "\n").encode(), listed, dump=lambda data, f: f.write(data))
    log(f"labelled subset: {len(subset)} images ({100 * len(subset) / len(train):.2f}% of train, "
        f"{'from ' + args.subset_file if args.subset_file else f'class-balanced, seed {args.seed}'}); "
        f"listed in {listed}")
    return subset


def protocol_optimizer(args, protocol, probe, settings):
    """SGD with the paper's learning rates, scaled linearly with the batch; recorded in `settings`."""
    reference = 2048 if protocol == "linear" else 256
    lr = args.lr if args.lr is not None else (40.0 if protocol == "linear" else
                                              15.0 if args.label_fraction <= 0.01 else 10.0)
    scale = args.batch_size / reference
    groups = [{"params": probe.fc.parameters(), "lr": lr * scale, "base_lr": lr * scale}]
    settings["lr"] = lr
    if protocol == "semi":
        groups.append({"params": probe.backbone.parameters(), "lr": args.backbone_lr * scale,
                       "base_lr": args.backbone_lr * scale})
        settings["backbone_lr"] = args.backbone_lr
    log(f"lr {lr:g} x {args.batch_size}/{reference} = {lr * scale:.6g} (linear layer)"
        + (f", {args.backbone_lr:g} x {args.batch_size}/{reference} = {args.backbone_lr * scale:.6g} (backbone)"
           if protocol == "semi" else "") + f", cosine over {args.epochs} epochs, momentum {args.momentum}, "
        f"weight decay {args.weight_decay:g}")
    return torch.optim.SGD(groups, momentum=args.momentum, weight_decay=args.weight_decay)


def image_training(args, probe, optimizer, train, val, local_batch, device):
    """(train one epoch, evaluate) on augmented images: DDP over the processes, resumable crops."""
    rank, world = dsm.get_rank(), dsm.get_world_size()
    model = dsm.data_parallel(probe, device)
    train.transform = probe_train_transform(args.image_size)
    sampler = torch.utils.data.DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    loader = shared.data_loader(train, args, device, batch_size=local_batch, sampler=sampler)
    if args.standardize:  # on this rank's shard of up to SAMPLE training images drawn with --seed
        sample = shared.fixed_sample(len(train.paths), SAMPLE, args.seed)
        s0, s1 = dsm.shard_range(len(sample), rank, world)
        standardize(probe, shared.embed(probe.backbone, [train.paths[i] for i in sample[s0:s1]], args, device))

    def train_epoch(epoch):
        shared.seed_everything(shared.step_seed(args.seed, epoch, rank))  # resumable crops
        sampler.set_epoch(epoch)
        return image_epoch(model, optimizer, loader, args, epoch, device)

    return train_epoch, lambda: evaluate(probe, val, local_batch, args, device)


def cached_probe(args, probe, optimizer, train, val, local_batch, device):
    """(train one epoch, evaluate) of the linear layer on centre-crop features embedded once, sharded over ranks."""
    rank, world, t0 = dsm.get_rank(), dsm.get_world_size(), time.perf_counter()
    (start, end), (v0, v1) = dsm.shard_range(len(train), rank, world), dsm.shard_range(len(val), rank, world)
    train_x, val_x = (shared.embed(probe.backbone, paths, args, device)
                      for paths in (train.paths[start:end], val.paths[v0:v1]))
    train_y, val_y = (torch.tensor(y, device=device) for y in (train.labels[start:end], val.labels[v0:v1]))
    log(f"cached features: {len(train)} train + {len(val)} val images embedded in {time.perf_counter() - t0:.1f} s")
    if args.standardize:
        standardize(probe, train_x)

    def train_epoch(epoch):
        with one_cpu_thread(device):
            return cached_epoch(probe, optimizer, train_x, train_y, start, len(train), args, epoch)

    def evaluate_epoch():
        with torch.no_grad(), one_cpu_thread(device):
            return sum_hits(local_hits(probe.classify(val_x), val_y))

    return train_epoch, evaluate_epoch


def image_epoch(model, optimizer, loader, args, epoch, device):
    """One epoch on (image, label) batches (also 05's fine-tuning), lr set every step (cosine over args.epochs), rank
    0's BN statistics sent to every rank at the end. Returns (mean loss, last lr)."""
    model.train()
    meter, total, lr, steps = shared.Meter(), 0.0, 0.0, len(loader)
    for i, ((images, targets), wait) in enumerate(shared.timed_batches(loader)):
        lr = set_lr(optimizer, epoch + (i + 0.5) / steps, args.epochs)
        with shared.autocast(device):
            logits = model(shared.to_device(images, device))
        loss = F.cross_entropy(logits.float(), targets.to(device, non_blocking=True))
        value = mean_over_ranks(loss.item(), device)  # the global mean: every rank stops together
        shared.stop_if_not_finite(value, f"epoch {epoch} step {i}", RETRY)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += value
        meter.add(value, wait)
        if (i + 1) % args.print_freq == 0 and i + 1 < steps:
            meter.line(f"epoch {epoch + 1} step {i + 1}/{steps}", lr, args.batch_size, steps - i - 1, device)
    dsm.broadcast_buffers(model)  # one set of BN statistics for the evaluation and the checkpoint
    return total / max(steps, 1), lr


def cached_epoch(probe, optimizer, train_x, train_y, start, num_train, args, epoch):
    """One epoch of the linear layer on cached features. The global batches come from one permutation shared by all
    ranks; each rank takes the batch's members in its feature shard [start, start + len(train_x)), and one all_reduce
    sums gradients and loss: the step equals the single-process one on any process count. Returns (mean loss, lr)."""
    order = torch.randperm(num_train, generator=torch.Generator().manual_seed(args.seed * 1000003 + epoch))
    order, steps, total, lr = order.to(train_x.device), math.ceil(num_train / args.batch_size), 0.0, 0.0
    params = [probe.fc.weight, probe.fc.bias]
    for i in range(steps):
        batch = order[i * args.batch_size:(i + 1) * args.batch_size]
        mine = batch[(batch >= start) & (batch < start + len(train_x))] - start
        lr = set_lr(optimizer, epoch + (i + 0.5) / steps, args.epochs)
        loss_sum = F.cross_entropy(probe.classify(train_x[mine]), train_y[mine], reduction="sum")
        flat = torch.cat([g.flatten() for g in torch.autograd.grad(loss_sum, params)] + [loss_sum.detach().view(1)])
        if dist.is_initialized():
            dist.all_reduce(flat)
        flat /= len(batch)  # the mean over the global batch
        for p, g in zip(params, flat[:-1].split([p.numel() for p in params])):
            p.grad = g.view_as(p)
        optimizer.step()
        shared.stop_if_not_finite(flat[-1].item(), f"epoch {epoch} step {i}", RETRY)
        total += flat[-1].item()
    return total / steps, lr


def standardize(probe, features):
    """Set the probe's shift/scale to the per-dimension mean and 1/std of the features on all ranks (float64 sums)."""
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
        group["lr"] = shared.cosine_lr(group["base_lr"], progress, 0, epochs)
    return optimizer.param_groups[0]["lr"]


# ---------------------------------------------------------------- evaluation (also 05's)

@torch.no_grad()
def evaluate(model, dataset, batch_size, args, device):
    """(top-1 %, top-5 %, images counted) of a classifier over a whole (image, label) dataset. Each process scores a
    contiguous shard (sizes differ by <= 1), the hits are summed: every image counts once, on any process count."""
    model.eval()
    shard = range(*dsm.shard_range(len(dataset), dsm.get_rank(), dsm.get_world_size()))
    loader = shared.data_loader(torch.utils.data.Subset(dataset, shard), args, device, batch_size=batch_size)
    hits = torch.zeros(3, dtype=torch.float64, device=device)
    for images, labels in loader:
        with shared.autocast(device):
            logits = model(shared.to_device(images, device))
        hits += local_hits(logits.float(), labels.to(device))
    return sum_hits(hits)


def local_hits(logits, targets):
    """[top-1 hits, top-5 hits, count] (float64) of one rank's predictions; top-5 clamps to the class count."""
    correct = logits.topk(min(5, logits.shape[1]), dim=1).indices == targets[:, None]
    return torch.stack([correct[:, 0].sum(), correct.any(1).sum(),
                        torch.tensor(len(targets), device=logits.device)]).double()


def sum_hits(hits):
    """(top-1 %, top-5 %, count) of local_hits summed over the ranks."""
    if dist.is_initialized():
        dist.all_reduce(hits)
    top1, top5, count = hits.tolist()
    return 100 * top1 / max(count, 1), 100 * top5 / max(count, 1), int(count)


def mean_over_ranks(value, device):
    """The mean of a float over the processes, the same on every rank (all stop together on a NaN)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dsm.get_world_size()


@contextlib.contextmanager
def one_cpu_thread(device):
    """On CPU, the cached probe's tiny matrix ops on one thread: waking a thread pool costs more (far more if busy)."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------- data of the protocols

def probe_train_transform(image_size):
    """The probe's and fine-tuning's training crops: random resized crop + flip, nothing else."""
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize(shared.IMAGENET_MEAN, shared.IMAGENET_STD)])


def class_balanced_subset(labels, fraction, seed):
    """Sorted indices: round(fraction x n_c) images (at least 1) of every class c, drawn with `seed`."""
    labels, generator, chosen = torch.as_tensor(labels), torch.Generator().manual_seed(seed), []
    for c in range(int(labels.max()) + 1):
        members = (labels == c).nonzero()[:, 0]
        if len(members):
            take = max(1, round(fraction * len(members)))
            chosen.append(members[torch.randperm(len(members), generator=generator)[:take]])
    return sorted(torch.cat(chosen).tolist())


def read_subset_file(path, train_paths, train_dir):
    """Sorted indices of the images a subset file names, one per line: a path under train/ or a file name that
    occurs once (as in the 1% / 10% ImageNet lists)."""
    if not os.path.isfile(path):
        fail(f"--subset-file {path} not found")
    rel = [os.path.relpath(p, train_dir).replace(os.sep, "/") for p in train_paths]
    names = [os.path.basename(r) for r in rel]
    once = {n for n, count in collections.Counter(names).items() if count == 1}
    index = {**{n: i for i, n in enumerate(names) if n in once}, **{r: i for i, r in enumerate(rel)}}
    with open(path) as f:
        wanted = [line.strip() for line in f if line.strip()]
    unknown = [name for name in wanted if name not in index]
    if unknown or not wanted:
        fail(f"--subset-file {path} names {unknown[0]!r}, which is not one image under {train_dir} (give paths "
             "relative to train/ or unique file names)" if unknown else f"--subset-file {path} names no images")
    return sorted({index[name] for name in wanted})


if __name__ == "__main__":
    main()
