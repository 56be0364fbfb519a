"""Stage 02: unsupervised pretraining as an N-way instance classifier (hybrid parallelism).

Implements the paper's training (Eq. 1-3 and steps 1-8 of the distributed step): every training
image is its own class. Backbone + MLP head are data-parallel (DDP); the N x 128 cosine
classifier is split by rows over the processes (dist_softmax.DistCosineSoftmax, kept outside
DDP with its own SGD). Each instance of the global batch contributes two augmented views
(SimCLR-style). The rows start from RUN/init.pt (01_extract_init.py: the contrastive prior).
With --alpha > 0 the target of each view is smoothed onto its k hardest classes (Eq. 2-3),
mined once per epoch by 03_hard_classes.mine_hard_classes.

SGD, momentum 0.9, weight decay 1e-4, lr = --lr x batch / 4096 (the scaled value is printed),
linear warm-up for --warmup-epochs then cosine decay, set every step. Defaults are the paper's.

Writes to RUN (--out):
  checkpoint.pt       every epoch, atomically: network, classifier rows + momentum, optimiser,
                      epoch, step; loads on any process count. A rerun of the same command
                      resumes from it automatically (also with another process count).
  pretrain_log.jsonl  one JSON line per progress line and per epoch
  backbone.pt         at the end: the backbone state_dict under torchvision's key names
                      (loads into torchvision.models.<arch>() with only fc.* missing; at
                      <= 64 px into one with the same small stem, see 01's build_backbone)

Commands:
  python 02_pretrain.py --data demo_data --out runs/demo --arch resnet18 --image-size 64 \\
      --batch-size 256 --epochs 50 --warmup-epochs 5 --hard-k 10
  torchrun --nproc_per_node=8 02_pretrain.py --data /datasets/imagenet --out runs/in1k
  torchrun --nnodes=8 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
      02_pretrain.py --data /datasets/imagenet --out runs/in1k
Run 01_extract_init.py with the same --data, --out, --arch and --image-size first.
"""
import argparse
import contextlib
import glob
import importlib
import json
import math
import os
import random
import resource
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import dist_softmax as dsm

extract = importlib.import_module("01_extract_init")

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
extract.add_common_args(parser, epochs=200, batch_size=4096)
parser.add_argument("--lr", type=float, default=0.48, help="learning rate at batch 4096 (scaled linearly)")
parser.add_argument("--momentum", type=float, default=0.9)
parser.add_argument("--weight-decay", type=float, default=1e-4)
parser.add_argument("--warmup-epochs", type=float, default=10)
parser.add_argument("--temperature", type=float, default=0.15, help="tau of Eq. 1")
parser.add_argument("--alpha", type=float, default=0.2, help="smoothing of Eq. 2-3 (0: plain Eq. 1)")
parser.add_argument("--hard-k", type=int, default=100, help="hard classes per instance, k of Eq. 2")
parser.add_argument("--chunk-size", type=int, default=None,
                    help="classifier rows per logits block (bounds memory; default: all local rows)")
parser.add_argument("--print-freq", type=int, default=10, help="steps between progress lines")


# A resumed run must continue the same optimisation; --epochs may grow, these may not change.
RESUME_SETTINGS = ("arch", "image_size", "batch_size", "lr", "momentum", "weight_decay", "warmup_epochs",
                   "temperature", "alpha", "hard_k", "seed")


def main(argv=None):
    args = parser.parse_args(argv)
    if not 0 <= args.alpha < 1:
        extract.fail(f"--alpha {args.alpha} is outside [0, 1): it is the target mass moved to the hard classes (Eq. 2)")
    if args.temperature < 0.025:
        extract.fail(f"--temperature {args.temperature} is below 0.025, where fp32 exp of the cosine logits "
                     "overflows; the paper uses 0.15")
    if args.hard_k < 1 or args.print_freq < 1:
        extract.fail("--hard-k and --print-freq must be at least 1")
    owns_group = not dist.is_initialized()  # a caller's group is left to the caller
    device = dsm.init_distributed(args.device)
    rank, world = dsm.get_rank(), dsm.get_world_size()
    log = print if dsm.is_main() else (lambda *a, **k: None)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True

    # ---- data ----
    paths, _, _ = extract.list_images(os.path.join(args.data, "train"))
    num_classes = len(paths)
    extract.check_data_fingerprint(args.out, paths, args.data)
    init_path = os.path.join(args.out, "init.pt")
    if not os.path.isfile(init_path):
        extract.fail(f"{init_path} not found; run 01_extract_init.py --data {args.data} --out {args.out} first")
    init = torch.load(init_path, map_location="cpu", mmap=True, weights_only=True)
    made = init["args"]
    if (made["arch"], made["image_size"]) != (args.arch, args.image_size):
        extract.fail(f"{init_path} was made for {made['arch']} at {made['image_size']} px; "
                     f"pass --arch {made['arch']} --image-size {made['image_size']}")
    local_batch = extract.resolve_rank_batch(args.batch_size, world)
    if num_classes // world < local_batch:
        extract.fail(f"--batch-size {args.batch_size} exceeds the {num_classes} training images "
                     f"({num_classes // world} per process); use a smaller --batch-size")
    dataset = extract.ImageList(paths, extract.TwoViews(extract.train_transform(args.image_size)))
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                                  seed=args.seed, drop_last=True)
    # No persistent workers: each epoch's workers are seeded from that epoch's reseeded RNG.
    loader = torch.utils.data.DataLoader(dataset, batch_size=local_batch, sampler=sampler,
                                         num_workers=args.workers, pin_memory=cuda, drop_last=True)
    steps = len(loader)

    # ---- networks: backbone + head in DDP, the classifier rows outside it ----
    net = extract.EmbeddingNet(made["arch"], made["image_size"], made["dim"], made.get("head", "mlp")).to(device)
    net.load_state_dict(init["network"])
    if cuda:
        net = net.to(memory_format=torch.channels_last)
    model = DistributedDataParallel(net, device_ids=[device] if cuda else None) if world > 1 else net
    classifier = dsm.DistCosineSoftmax(num_classes, made["dim"], args.temperature, args.chunk_size).to(device)
    dsm.load_classifier(classifier, init["classifier"])
    del init

    # ---- optimisers: one for the network, one for this rank's rows (saved independently of W) ----
    base_lr = args.lr * args.batch_size / 4096
    sgd = dict(lr=base_lr, momentum=args.momentum, weight_decay=args.weight_decay)
    optimizers = [torch.optim.SGD(net.parameters(), **sgd), torch.optim.SGD(classifier.parameters(), **sgd)]
    log(f"02_pretrain: {num_classes} instances, {world} process(es) on {device}, batch {args.batch_size} "
        f"instances = {2 * args.batch_size} views ({local_batch} instances per process), {steps} steps/epoch, "
        f"lr {args.lr} x {args.batch_size}/4096 = {base_lr:.6g}")
    log("args: " + json.dumps(vars(args), sort_keys=True))
    if args.warmup_epochs >= args.epochs:
        log(f"note: --warmup-epochs {args.warmup_epochs} >= --epochs {args.epochs}: the lr never reaches {base_lr:.6g}")

    # ---- hard classes (Eq. 2-3) ----
    hard, k = None, 0
    if args.alpha > 0:
        hard = importlib.import_module("03_hard_classes")
        k = min(args.hard_k, num_classes - 1)
        if k < args.hard_k:
            log(f"note: --hard-k {args.hard_k} clamped to {k} (N - 1 other classes exist)")

    # ---- resume ----
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    log_path = os.path.join(args.out, "pretrain_log.jsonl")
    start_epoch, global_step = 0, 0
    if dsm.is_main():  # a run killed inside atomic_save leaves its temporary file; it is never resumed from
        for stale in glob.glob(os.path.join(args.out, ".tmp-checkpoint.pt*")):
            os.remove(stale)
            log(f"removed {stale}, a half-written checkpoint of a killed run")
    if os.path.isfile(ckpt_path):
        ckpt = torch.load(ckpt_path, map_location="cpu", mmap=True, weights_only=True)
        refuse_changed_settings(ckpt_path, ckpt["args"], vars(args), RESUME_SETTINGS)
        if ckpt["classifier"]["num_classes"] != num_classes:
            extract.fail(f"{ckpt_path} holds {ckpt['classifier']['num_classes']} classifier rows but {args.data} has "
                         f"{num_classes} training images: it belongs to another run; delete it or pass another --out")
        net.load_state_dict(ckpt["network"])
        optimizers[0].load_state_dict(ckpt["optimizer"])
        dsm.load_classifier(classifier, ckpt["classifier"], optimizers[1])
        start_epoch, global_step = ckpt["epoch"] + 1, ckpt["step"]
        log(f"resumed from {ckpt_path}: {start_epoch} epoch(s) done, step {global_step} "
            f"(saved by {ckpt['world_size']} process(es), now {world})")
        del ckpt

    # ---- training loop ----
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    total_steps_left = (args.epochs - start_epoch) * steps
    for epoch in range(start_epoch, args.epochs):
        # The RNG state is a function of (--seed, epoch, rank): reseeding here makes a resumed epoch
        # draw exactly the crops of an uninterrupted one, and needs no generator in the checkpoint.
        seed_everything(step_seed(args.seed, epoch, rank))
        sampler.set_epoch(epoch)
        table = None
        if hard is not None:
            # Refreshed at the start of every epoch from the current rows; epoch 0 mines the
            # raw-feature rows of the prior (01), so smoothing is on from the first step.
            t0 = time.perf_counter()
            table = hard.mine_hard_classes(classifier, k)
            log(f"epoch {epoch}: {k} hard classes per instance mined in {time.perf_counter() - t0:.1f} s")
        model.train()
        meter = Meter()
        epoch_loss, epoch_start = 0.0, time.perf_counter()
        for i, ((views, ids), wait) in enumerate(timed_batches(loader)):
            meter.wait += wait
            lr = learning_rate(base_lr, epoch + (i + 0.5) / steps, args.warmup_epochs, args.epochs)
            for opt in optimizers:
                for group in opt.param_groups:
                    group["lr"] = lr
            images = views.flatten(0, 1).to(device, non_blocking=True)  # [2b, C, H, W]
            if cuda:
                images = images.contiguous(memory_format=torch.channels_last)
            ids = ids.to(device, non_blocking=True)
            labels = ids.repeat_interleave(2)  # both views of instance i have class i
            hard_classes = None
            if table is not None:
                hard_classes = hard.lookup_hard_classes(table, ids, classifier).repeat_interleave(2, 0)
            loss = train_step(model, classifier, optimizers, images, labels, hard_classes, args.alpha, amp)
            if not math.isfinite(loss):
                kept = (f"{ckpt_path} holds the last good epoch" if os.path.isfile(ckpt_path)
                        else "no checkpoint was written yet")
                extract.fail(f"loss is {loss} at epoch {epoch} step {i}; stopped, {kept}; lower --lr or "
                             "raise --warmup-epochs and rerun the command to resume")
            global_step += 1
            epoch_loss += loss
            meter.add(loss)
            if (i + 1) % args.print_freq == 0 or i + 1 == steps:
                total_steps_left -= meter.steps
                record = meter.report(epoch, i + 1, steps, global_step, lr, 2 * args.batch_size,
                                      args.batch_size, total_steps_left, device)
                if dsm.is_main():
                    print(f"epoch {epoch} step {i + 1}/{steps} loss {record['loss']:.4f} lr {lr:.4g} "
                          f"img/s {record['images_per_s']:.0f} data {100 * record['data_wait']:.0f}% "
                          f"eta {format_seconds(record['eta_s'])} mem {record['peak_mem_gib']:.2f}G", flush=True)
                    write_log(log_path, record)
                meter = Meter()

        # ---- end of epoch: checkpoint (every rank takes part in gathering the rows) ----
        state = dsm.gather_classifier(classifier, optimizers[1])
        seconds = time.perf_counter() - epoch_start
        if dsm.is_main():
            network = {key: value.detach().cpu() for key, value in net.state_dict().items()}
            dsm.atomic_save({"network": network, "classifier": state, "optimizer": optimizers[0].state_dict(),
                             "epoch": epoch, "step": global_step, "world_size": world,
                             "rng": {"seed": args.seed, "scheme": "reseeded every epoch from (seed, epoch, rank)"},
                             "args": vars(args)}, ckpt_path)
            write_log(log_path, {"epoch": epoch, "epoch_loss": epoch_loss / steps, "epoch_s": round(seconds, 3),
                                 "global_step": global_step})
            log(f"epoch {epoch} done in {seconds:.1f} s, mean loss {epoch_loss / steps:.4f}, wrote {ckpt_path}")
        del state

    # ---- the pretrained backbone, under torchvision's key names ----
    if dsm.is_main():
        backbone_path = os.path.join(args.out, "backbone.pt")
        dsm.atomic_save({key: value.detach().cpu() for key, value in net.backbone.state_dict().items()},
                        backbone_path)
        log(f"wrote {backbone_path} ({args.arch}, {args.image_size} px)")
    dsm.finish_distributed(owns_group)


# ---------------------------------------------------------------- helpers of this stage

def train_step(model, classifier, optimizers, images, labels, hard_classes, alpha, amp):
    """One step (steps 1-8): embed the local views, the sharded softmax loss (Eq. 1 or 3),
    backward, SGD on network and rows. Returns the loss; a non-finite one skips the update."""
    with amp:  # bf16 products on CUDA; the classifier keeps its softmax in fp32 (dist_softmax)
        features = model(images)
        loss = classifier(features, labels, hard_classes, alpha)
    value = loss.item()  # the same on every rank: the classifier all-reduces it
    if not math.isfinite(value):
        return value
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    loss.backward()
    for opt in optimizers:
        opt.step()
    return value


def timed_batches(loader):
    """One epoch of (batch, seconds spent waiting for it), for the data-wait share of the progress
    lines; a bad image, also in a loader worker, stops with 01's one-line error."""
    batches = iter(loader)
    while True:
        t0 = time.perf_counter()
        with extract.bad_images_fail():
            batch = next(batches, None)
        if batch is None:
            return
        yield batch, time.perf_counter() - t0


def refuse_changed_settings(path, saved, current, keys):
    """fail() with the differing values when `path` was written with other settings than this run's."""
    changed = [key for key in keys if saved.get(key) != current.get(key)]
    if changed:
        was = ", ".join(f"--{key.replace('_', '-')} {saved.get(key)}" for key in changed)
        extract.fail(f"{path} was written with other settings ({was}); rerun with those to resume, "
                     "or delete it to start over")


def learning_rate(base_lr, progress, warmup_epochs, epochs):
    """Linear warm-up over warmup_epochs, then cosine to 0 at `epochs`; progress in epochs."""
    if progress < warmup_epochs:
        return base_lr * progress / warmup_epochs
    t = min(1.0, (progress - warmup_epochs) / max(epochs - warmup_epochs, 1e-12))
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * t))


def step_seed(seed, position, rank):
    """One seed per (--seed, epoch or iteration, rank): reseeding with it makes a resumed run draw
    what an uninterrupted one draws, without storing generator states in checkpoints."""
    return seed * 1000003 + position * 1009 + rank


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Meter:
    """Loss and timing over the steps since the last progress line."""

    def __init__(self):
        self.steps, self.loss, self.wait = 0, 0.0, 0.0
        self.start = time.perf_counter()

    def add(self, loss):
        self.steps += 1
        self.loss += loss

    def report(self, epoch, step, steps, global_step, lr, images, instances, steps_left, device):
        elapsed = time.perf_counter() - self.start
        per_step = elapsed / max(self.steps, 1)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) / 2**30
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (peak RSS)
        return {"epoch": epoch, "step": step, "steps": steps, "global_step": global_step,
                "loss": self.loss / max(self.steps, 1), "lr": lr,
                "images_per_s": images / per_step, "instances_per_s": instances / per_step,
                "data_wait": self.wait / max(elapsed, 1e-12), "eta_s": per_step * steps_left,
                "peak_mem_gib": peak}


def write_log(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def format_seconds(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


if __name__ == "__main__":
    main()
