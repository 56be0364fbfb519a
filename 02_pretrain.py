"""Stage 02: unsupervised pretraining as an N-way instance classifier (hybrid parallelism).

The paper's training (Eq. 1-3, steps 1-8 of Figure 2): every training image is its own class.
Backbone + MLP head are data-parallel (DDP); the N x 128 cosine classifier is split by rows over the
processes (dist_softmax.DistCosineSoftmax, outside DDP with its own SGD; steps 2-7 live there). Each
instance of the global batch gives two views under SimCLR's augmentation (--jitter mocov2: MoCo v2's
weaker colour jitter). The rows start from RUN/init.pt (01: the contrastive prior). With --alpha > 0
each view's target is smoothed onto its k hardest classes (Eq. 2-3), mined every epoch by 03.
--sample-classes M runs Table 3's sampled softmax instead of the full one.

SGD, momentum 0.9, weight decay 1e-4 on every parameter (the rows included: their decay sets how
fast a row turns, which depends on N; the log shows it), lr = --lr x batch / 4096 (printed), linear
warm-up for --warmup-epochs then cosine, set every step. Defaults are the paper's (--epochs 200:
its ablations; 1000 for its headline result).

Writes to RUN (--out):
  checkpoint.pt       every epoch, atomically: network, rows + momentum, optimiser, epoch, step;
                      loads on any process count. The same command resumes from it (01's
                      resume_from refuses other settings): bit-identically with the same process
                      count, --workers and --data-path, with other crops otherwise. A larger
                      --epochs continues the run with its cosine stretched to the new length.
  pretrain_log.jsonl  a JSON line per progress line and per epoch (mean row norm |w|, the angle a
                      row turns per visit, the kNN curve); each step and epoch once after any stop
  backbone.pt         at the end: the backbone under torchvision's key names (loads into
                      torchvision.models.<arch>() with only fc.* missing; <= 64 px: the small stem)

The kNN curve: when ROOT/val exists, every --knn-every epochs and after the last, 01's weighted
kNN top-1 (k = 20, 04's protocol) of the backbone on val, with at most 10,000 training images as the
bank; by default the interval keeps its cost under 5% of training. Rank 0's BN statistics are
broadcast first, so the curve scores exactly the network backbone.pt holds.

The views come from loader workers running 01's train_transform (--data-path pil, the default), or
from the device path: workers read file bytes, the device decodes and augments a whole batch
(DeviceViews; tested on CPU, not yet run on a GPU). The progress line's "data" share is the time the
loop waits for a batch, including the device path's decoding and augmentation.

Commands:
  python 02_pretrain.py --data demo_data --out runs/demo --arch resnet18 --image-size 64 \\
      --batch-size 256 --epochs 50 --warmup-epochs 5 --hard-k 10
  torchrun --nproc_per_node=8 02_pretrain.py --data /datasets/imagenet --out runs/in1k
  torchrun --nnodes=8 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
      02_pretrain.py --data /datasets/imagenet --out runs/in1k
Run 01_extract_init.py with the same --data, --out, --arch and --image-size first.
"""
import importlib
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision

import dist_softmax as dsm

shared = importlib.import_module("01_extract_init")  # 01, and below its banner what every stage shares
hard_classes = importlib.import_module("03_hard_classes")  # Eq. 2's hard classes, refreshed every epoch
fail, log, POSITIVE = shared.fail, shared.log, shared.POSITIVE

parser = shared.Parser(__doc__)
shared.add_common_args(parser, epochs=200, batch_size=4096)
parser.add_argument("--lr", type=shared.RATE, default=0.48, help="learning rate at batch 4096 (scaled linearly)")
parser.add_argument("--momentum", type=shared.FRACTION, default=0.9)
parser.add_argument("--weight-decay", type=shared.NON_NEGATIVE, default=1e-4)
parser.add_argument("--warmup-epochs", type=shared.NON_NEGATIVE, default=10)
parser.add_argument("--temperature", type=shared.number(float, 0.025), default=0.15,
                    help="tau of Eq. 1; >= 0.025 keeps exp(1 / tau) inside fp32 without a max (see dist_softmax)")
parser.add_argument("--alpha", type=shared.FRACTION, default=0.2, help="smoothing of Eq. 2-3 (0: plain Eq. 1)")
parser.add_argument("--hard-k", type=POSITIVE, default=100, help="hard classes per instance, k of Eq. 2")
parser.add_argument("--sample-classes", type=POSITIVE, default=None, metavar="M",
                    help="Table 3: each step's softmax over about M classes (the batch's targets plus classes "
                         "drawn uniformly from the rest) instead of all N")
parser.add_argument("--jitter", default="simclr", choices=["simclr", "mocov2"],
                    help="colour jitter of the views: SimCLR's strength 1 (the paper cites SimCLR), or MoCo v2's half")
parser.add_argument("--chunk-size", type=POSITIVE, default=None,
                    help="classifier rows per logits block (bounds memory; default: all local rows)")
parser.add_argument("--print-freq", type=POSITIVE, default=10, help="steps between progress lines")
parser.add_argument("--data-path", default="pil", choices=["pil", "device"],
                    help="pil: decode and augment in loader workers (01's train_transform); device: workers only "
                         "read the files, decoding (JPEG on the GPU) and the same augmentation run batched on the "
                         "device (not yet run on a GPU, so not the default)")
parser.add_argument("--cache-images", action="store_true",
                    help="device path: decode every training image once and keep it (uint8) in device memory")
parser.add_argument("--knn-every", type=shared.COUNT, default=None, metavar="E",
                    help="kNN top-1 on ROOT/val every E epochs and after the last (default: the interval that "
                         "keeps its cost under 5%% of training; 0: never)")

# A resumed run must continue the same optimisation; --epochs may grow, these may not change.
RESUME_SETTINGS = ("arch", "image_size", "batch_size", "lr", "momentum", "weight_decay", "warmup_epochs",
                   "temperature", "alpha", "hard_k", "seed", "jitter", "sample_classes")
KNN_SAMPLE = 10000  # at most this many training images (the bank) and val images (scored) in the kNN curve


def main(argv=None):
    args = parser.parse_args(argv)
    with shared.stage(args) as device:
        world = dsm.get_world_size()
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True

        # ---- data: instance i is image i of the sorted training list; two views each ----
        paths, labels, classes = shared.list_images(os.path.join(args.data, "train"))
        fingerprint = shared.check_data(args.out, paths, args.data)
        settings = {"stage": "02_pretrain", "data": fingerprint["sha256"],
                    **{key: getattr(args, key) for key in RESUME_SETTINGS}}
        init = load_init(args, fingerprint)
        local_batch = shared.resolve_rank_batch(args.batch_size, world)
        batches, sampler, steps = training_batches(paths, args, local_batch, device)

        # ---- networks: backbone + head in DDP (step 1), the sharded classifier outside it (steps 2-7) ----
        made = init["args"]
        net = shared.EmbeddingNet(made["arch"], made["image_size"], made["dim"], made["head"])  # as 01 built it
        net.load_state_dict(init["network"])
        net = net.to(device, memory_format=torch.channels_last if device.type == "cuda" else torch.preserve_format)
        model = dsm.data_parallel(net, device)
        classifier = dsm.DistCosineSoftmax(len(paths), made["dim"], args.temperature, args.chunk_size).to(device)
        dsm.load_classifier(classifier, init["classifier"])
        del init

        # ---- optimisers (step 8): one for the network, one for this rank's rows ----
        base_lr = args.lr * args.batch_size / 4096
        sgd = dict(lr=base_lr, momentum=args.momentum, weight_decay=args.weight_decay)
        optimizers = [torch.optim.SGD(net.parameters(), **sgd), torch.optim.SGD(classifier.parameters(), **sgd)]
        log(f"02_pretrain: {len(paths)} instances, {world} process(es) on {device}, batch {args.batch_size} "
            f"instances = {2 * args.batch_size} views ({local_batch} instances per process), {steps} steps/epoch, "
            f"lr {args.lr} x {args.batch_size}/4096 = {base_lr:.6g}")
        if args.warmup_epochs >= args.epochs:
            log(f"note: --warmup-epochs {args.warmup_epochs} >= --epochs {args.epochs}: lr never reaches {base_lr:.6g}")
        k = min(args.hard_k, len(paths) - 1) if args.alpha > 0 else 0
        if 0 < k < args.hard_k:
            log(f"note: --hard-k {args.hard_k} clamped to {k} (N - 1 other classes exist)")
        knn = KnnCurve(args, paths, labels, classes, device)
        start_epoch, global_step = resume(args, settings, net, classifier, optimizers)
        train_seconds = 0.0

        # ---- the training loop ----
        for epoch in range(start_epoch, args.epochs):
            # The RNG state is a function of (--seed, epoch, rank): a resumed epoch draws exactly the
            # crops of an uninterrupted one, with no generator in the checkpoint.
            shared.seed_everything(shared.step_seed(args.seed, epoch, dsm.get_rank()))
            shared.PROGRESS["where"] = f"in epoch {epoch + 1} of {args.epochs} ({epoch} finished, in checkpoint.pt)"
            sampler.set_epoch(epoch)
            table = None
            if k:  # Eq. 2's H_k(i), refreshed every epoch from the current rows (epoch 0: the prior's)
                t0 = time.perf_counter()
                table, _ = hard_classes.mine_hard_classes(classifier, k)
                log(f"epoch {epoch}: {k} hard classes per instance mined in {time.perf_counter() - t0:.1f} s")
            record = train_one_epoch(model, classifier, optimizers, batches(epoch), steps, table, args, epoch,
                                     base_lr, global_step, device)
            global_step, train_seconds = record["global_step"], train_seconds + record["epoch_s"]
            dsm.broadcast_buffers(net)  # rank 0's BN statistics: for the kNN curve, the files and the next epoch
            if knn.due(epoch):
                record["knn_top1"] = knn.measure(net.backbone, epoch)
            rows = dsm.gather_classifier(classifier, optimizers[1])  # every rank takes part
            shared.save_for_resume(os.path.join(args.out, "checkpoint.pt"), settings, net, optimizers[0],
                                   classifier=rows, epoch=epoch, step=global_step, args=vars(args))
            shared.append_log(os.path.join(args.out, "pretrain_log.jsonl"), record)
            log(f"epoch {epoch} done in {record['epoch_s']:.1f} s, mean loss {record['epoch_loss']:.4f}, "
                f"rows |w| {record['row_norm']:.4f} turning {record['row_turn_deg']:.3f} deg per visit"
                + (f", kNN top-1 {record['knn_top1']:.2f}" if "knn_top1" in record else "")
                + f"; wrote {os.path.join(args.out, 'checkpoint.pt')}")

        # ---- the pretrained backbone, under torchvision's key names ----
        knn.summary(train_seconds)
        if dsm.is_main():
            shared.atomic_save(shared.cpu_state(net.backbone), os.path.join(args.out, "backbone.pt"))
            log(f"wrote {os.path.join(args.out, 'backbone.pt')} ({args.arch}, {args.image_size} px)")


# ---------------------------------------------------------------- setup

def load_init(args, fingerprint):
    """RUN/init.pt of 01 (network + rows), checked against this run's data, --arch and --image-size."""
    init_path = os.path.join(args.out, "init.pt")
    if not os.path.isfile(init_path):
        fail(f"{init_path} not found; run 01_extract_init.py --data {args.data} --out {args.out} first")
    rerun = f"rerun 01_extract_init.py --data {args.data} --out {args.out} --overwrite"
    init = shared.load_run_file(init_path, ("network", "classifier", "args", "fingerprint"), rerun)
    if init["fingerprint"] != fingerprint:
        fail(f"{init_path} was made from other training images than {args.data}/train lists; {rerun}")
    made = init["args"]
    if (made["arch"], made["image_size"]) != (args.arch, args.image_size):
        fail(f"{init_path} was made for {made['arch']} at {made['image_size']} px; "
             f"pass --arch {made['arch']} --image-size {made['image_size']}")
    return init


def training_batches(paths, args, local_batch, device):
    """(batches, sampler, steps per epoch): batches(epoch) yields ((views [2b, 3, S, S] on `device`,
    the two views of instance i side by side, instance ids [b]), seconds spent waiting for them),
    for this rank's share of a new order every epoch (sampler.set_epoch). pil: 01's train_transform
    in loader workers, seeded from the epoch's reseeded RNG; device: DeviceViews, its parameters
    drawn from a generator seeded by (--seed, epoch, rank)."""
    world, rank = dsm.get_world_size(), dsm.get_rank()
    if len(paths) // world < local_batch:
        fail(f"--batch-size {args.batch_size} exceeds the {len(paths)} training images "
             f"({len(paths) // world} per process); use a smaller --batch-size")
    if args.cache_images and args.data_path != "device":
        fail("--cache-images keeps decoded images for the device data path; add --data-path device")
    if args.data_path == "device":
        source = DeviceViews(paths, args, device)
    else:
        source = shared.ImageList(paths, shared.TwoViews(shared.train_transform(args.image_size, args.jitter)))
    sampler = torch.utils.data.DistributedSampler(source, num_replicas=world, rank=rank, shuffle=True,
                                                  seed=args.seed, drop_last=True)
    if args.data_path == "device":
        return (lambda epoch: source.batches(sampler, local_batch, epoch)), sampler, len(sampler) // local_batch
    loader = shared.data_loader(source, args, device, batch_size=local_batch, sampler=sampler, drop_last=True)

    def batches(epoch):
        for (views, ids), wait in shared.timed_batches(loader):
            yield (shared.to_device(views.flatten(0, 1), device), ids.to(device, non_blocking=True)), wait
    return batches, sampler, len(loader)


def resume(args, settings, net, classifier, optimizers):
    """Continue from RUN/checkpoint.pt when it exists (written with the same settings); drop the
    log lines of an epoch that did not finish. Returns (first epoch to train, global step)."""
    ckpt = shared.resume_from(os.path.join(args.out, "checkpoint.pt"), settings, net, optimizers[0])
    done = 0 if ckpt is None else ckpt["epoch"] + 1
    shared.append_log(os.path.join(args.out, "pretrain_log.jsonl"), None, epochs_done=done)
    if ckpt is None:
        return 0, 0
    dsm.load_classifier(classifier, ckpt["classifier"], optimizers[1])
    log(f"resumed: {done} epoch(s) done, step {ckpt['step']}")
    if ckpt["args"]["epochs"] != args.epochs:
        log(f"note: --epochs {args.epochs} where the run had {ckpt['args']['epochs']}: the cosine schedule is "
            "stretched to the new length from here on")
    return done, ckpt["step"]


# ---------------------------------------------------------------- one epoch (steps 1-8)

def train_one_epoch(model, classifier, optimizers, batches, steps, table, args, epoch, base_lr, global_step, device):
    """One pass over the data: per step the lr of the schedule, the two views of each local instance
    (label = its instance id, Eq. 2's hard classes from `table`), train_step. Returns the epoch's
    record: mean loss, the rows' mean norm and turn per visit, time and the global step reached."""
    model.train()
    start = time.perf_counter()
    meter, total_loss, turn = shared.Meter(), 0.0, torch.zeros(2, dtype=torch.float64, device=device)
    for i, ((images, ids), wait) in enumerate(batches):
        lr = shared.cosine_lr(base_lr, epoch + (i + 0.5) / steps, args.warmup_epochs, args.epochs)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = lr
        labels = ids.repeat_interleave(2)  # images [2b, C, H, W]: both views of instance i have class i
        hard = None if table is None else hard_classes.lookup_hard_classes(table, ids, classifier)
        hard = None if hard is None else hard.repeat_interleave(2, 0)  # both views share their instance's
        visited = classifier.local_rows(dsm.all_gather_rows(ids))  # this batch's rows that live here
        before = classifier.weight.detach()[visited]
        sample = (args.sample_classes, shared.step_seed(args.seed, global_step)) if args.sample_classes else None
        loss = train_step(model, classifier, optimizers, images, labels, hard, args.alpha, sample, device)
        checkpoint = os.path.join(args.out, "checkpoint.pt")
        shared.stop_if_not_finite(loss, f"epoch {epoch} step {i}", (
            f"{checkpoint} holds the last good epoch" if os.path.isfile(checkpoint) else "no checkpoint yet")
            + "; rerunning resumes with the same settings: for a lower --lr or longer --warmup-epochs, use a new --out")
        turn += torch.stack([row_turn_degrees(before, classifier.weight.detach()[visited]).sum(),
                             torch.tensor(float(len(visited)), device=device)]).double()
        global_step, total_loss = global_step + 1, total_loss + loss
        meter.add(loss, wait)
        if (i + 1) % args.print_freq == 0 or i + 1 == steps:
            record = meter.line(f"epoch {epoch} step {i + 1}/{steps}", lr, 2 * args.batch_size,
                                (args.epochs - epoch) * steps - i - 1, device, epoch=epoch, step=i + 1, steps=steps,
                                global_step=global_step)
            shared.append_log(os.path.join(args.out, "pretrain_log.jsonl"), record)
    row_norm = classifier.weight.detach().norm(dim=1).sum().double().view(1)
    if classifier.world_size > 1:
        dist.all_reduce(turn)
        dist.all_reduce(row_norm)
    return {"epoch": epoch, "epoch_loss": total_loss / steps, "epoch_s": round(time.perf_counter() - start, 3),
            "global_step": global_step, "row_norm": row_norm.item() / classifier.num_classes,
            "row_turn_deg": (turn[0] / turn[1].clamp_min(1)).item()}


def train_step(model, classifier, optimizers, images, labels, hard, alpha, sample, device):
    """One step of the paper's Figure 2. Returns the loss; a non-finite one changes nothing (the
    caller stops, and the last checkpoint stays the run's state)."""
    with shared.autocast(device):  # bf16 products on CUDA; the softmax stays fp32 (dist_softmax)
        features = model(images)  # step 1: this rank's views through backbone + head (DDP)
        # Steps 2-7 inside dist_softmax.DistCosineSoftmax: gather the global batch, cosine logits
        # against the local rows, one all_reduce for Eq. 1 / Eq. 3, the loss on every rank.
        loss = classifier(features, labels, hard, alpha, sample)
    value = loss.item()  # the same on every rank: the classifier all-reduces it
    if not math.isfinite(value):
        return value
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    # Backward: the classifier hands each rank's features W x dL/dx, so DDP's average of the
    # backbone gradients over W ranks is the exact gradient of the global loss.
    loss.backward()
    optimizers[0].step()  # step 8: SGD on the network (DDP synchronised) and on this rank's rows
    if classifier.weight.grad.is_sparse:
        step_sampled_rows(optimizers[1], classifier.weight)
    else:
        optimizers[1].step()
    return value


@torch.no_grad()
def step_sampled_rows(optimizer, weight):
    """Table 3: SGD on the rows this step drew, and only on them: a row not drawn gets no gradient,
    no weight decay, and its momentum waits for its next draw (Partial FC keeps per-class momentum
    and updates only the sampled centres). For the drawn rows this is torch's SGD step."""
    group, grad = optimizer.param_groups[0], weight.grad.coalesce()
    rows, g = grad.indices()[0], grad.values() + group["weight_decay"] * weight[grad.indices()[0]]
    momentum = optimizer.state[weight].get("momentum_buffer")
    if momentum is None:  # the first sampled step (a shard-sized buffer, made once)
        momentum = optimizer.state[weight]["momentum_buffer"] = torch.zeros_like(weight)
    momentum[rows] = momentum[rows].mul_(group["momentum"]).add_(g)
    weight[rows] -= group["lr"] * momentum[rows]


def row_turn_degrees(before, after):
    """The angle in degrees between each row before and after a step (2 atan2(|a - b|, |a + b|) of
    the unit rows: accurate for the small angles of slow rows, where acos is not)."""
    a, b = F.normalize(before.float(), dim=1), F.normalize(after.float(), dim=1)
    return torch.rad2deg(2 * torch.atan2((a - b).norm(dim=1), (a + b).norm(dim=1)))


# ---------------------------------------------------------------- the kNN curve

class KnnCurve:
    """01's weighted kNN top-1 (k = 20) of the backbone on ROOT/val during training (see the
    docstring); the bank and the scored val images are fixed samples of at most KNN_SAMPLE."""

    def __init__(self, args, paths, labels, classes, device):
        self.args, self.device, self.seconds, self.every = args, device, 0.0, 0
        has_val = any(name.lower().endswith(shared.IMAGE_EXTENSIONS)
                      for _, _, files in os.walk(os.path.join(args.data, "val")) for name in files)
        if args.knn_every and not has_val:
            fail(f"--knn-every {args.knn_every} needs {os.path.join(args.data, 'val')}; add it or pass --knn-every 0")
        if args.knn_every == 0 or not has_val:
            return
        val_paths, val_labels = shared.list_val_images(args.data, classes)
        bank = shared.fixed_sample(len(paths), KNN_SAMPLE, args.seed)
        val = shared.fixed_sample(len(val_paths), KNN_SAMPLE, args.seed)
        self.bank = [paths[i] for i in bank], [labels[i] for i in bank]
        self.val = [val_paths[i] for i in val], [val_labels[i] for i in val]
        self.num_classes = len(classes)
        cost = (len(bank) + len(val)) / (6 * len(paths))  # a round's passes per epoch's (2 views x ~3 for backward)
        self.every = args.knn_every or max(1, math.ceil(cost / 0.05))
        log(f"kNN curve: every {self.every} epoch(s) and after the last, {len(bank)} training images as "
            f"the bank, {len(val)} val images (about {100 * cost / self.every:.1f}% of the training time)")

    def due(self, epoch):
        return self.every != 0 and ((epoch + 1) % self.every == 0 or epoch + 1 == self.args.epochs)

    def measure(self, backbone, epoch):
        t0 = time.perf_counter()
        inputs = shared.embed_for_knn(backbone, self.bank, self.val, self.args, self.device)
        top1 = shared.knn_accuracy(*inputs, self.num_classes, [20])[20][0]
        self.seconds += time.perf_counter() - t0
        log(f"epoch {epoch}: kNN top-1 (k=20) {top1:.2f} on {len(self.val[0])} val images")
        return top1

    def summary(self, train_seconds):
        if self.seconds:
            log(f"kNN curve: {self.seconds:.1f} s in all, {100 * self.seconds / max(train_seconds, 1e-9):.1f}% "
                f"of the {train_seconds:.1f} s of training")


# ---------------------------------------------------------------- the device data path

class DeviceViews(torch.utils.data.Dataset):
    """--data-path device: loader workers only read file bytes; the device decodes a batch (JPEG on the
    GPU) and SimCLRViews makes the two views there. --cache-images decodes every image once and keeps
    it (uint8) on the device (tiny-ImageNet: 1.2 GB)."""

    def __init__(self, paths, args, device):
        self.paths, self.args, self.device = paths, args, device
        self.augment = SimCLRViews(args.image_size, args.jitter)
        self.cache = None
        if args.cache_images:
            loader = self.loader([list(range(i, min(i + 256, len(paths)))) for i in range(0, len(paths), 256)])
            self.cache = [image for encoded, ids in loader for image in self.decode(encoded, ids)]

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        try:  # a plain tensor of the file's bytes (torchvision's read_file gives one that workers cannot send)
            with open(self.paths[index], "rb") as f:
                data = bytearray(f.read())
            return (torch.frombuffer(data, dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)), index
        except OSError as e:  # missing, a broken link, unreadable
            raise shared.InputError(shared.bad_image(self.paths[index], e)) from None

    def loader(self, batches):
        return shared.data_loader(self, self.args, self.device, batch_sampler=batches, collate_fn=shared.collate_lists)

    def decode(self, encoded, ids):
        """uint8 [3, H, W] images on the device: a batch of JPEGs by the GPU's decoder on CUDA, else
        each image by 01's load_rgb (every format; a broken file gets the PIL path's one line)."""
        if self.device.type == "cuda" and all(e[:2].tolist() == [0xFF, 0xD8] for e in encoded):  # JPEG
            try:
                return torchvision.io.decode_jpeg(list(encoded), mode=torchvision.io.ImageReadMode.RGB,
                                                  device=self.device)
            except RuntimeError:
                pass  # a JPEG the GPU decoder refuses (CMYK, broken...): one by one below
        return [torch.from_numpy(np.asarray(shared.load_rgb(self.paths[i], data.numpy().tobytes())).copy())
                .permute(2, 0, 1).to(self.device, non_blocking=True) for data, i in zip(encoded, ids)]

    def batches(self, sampler, local_batch, epoch):
        """One epoch of ((views [2b, 3, S, S], ids [b]) on the device, seconds spent on them)."""
        # A stream of its own (not the global RNG's seed), a function of (--seed, epoch, rank): resumable.
        generator = torch.Generator().manual_seed(shared.step_seed(self.args.seed, epoch, dsm.get_rank()) + (1 << 40))
        order = list(sampler)
        batches = [order[i:i + local_batch] for i in range(0, len(order) - local_batch + 1, local_batch)]
        source = ((None, batch) for batch in batches) if self.cache is not None else self.loader(batches)
        source = iter(source)
        while True:
            t0 = time.perf_counter()
            encoded, ids = next(source, (None, None))
            if ids is None:
                return
            images = [self.cache[i] for i in ids] if encoded is None else self.decode(encoded, ids)
            views = torch.stack([self.augment(images, generator), self.augment(images, generator)], 1)
            views = views.contiguous(memory_format=torch.channels_last) if self.device.type == "cuda" else views
            yield (views.flatten(0, 1), torch.tensor(ids, device=self.device)), time.perf_counter() - t0


class SimCLRViews:
    """01's train_transform as batched tensor operations on the device (crop, flip, the four jitters
    in a random order per image, grayscale, blur, normalisation), every parameter drawn per image
    from torchvision's distribution (sample()) on a CPU generator: the same views on CPU and GPU, and
    after a resume. The pixels differ slightly from the PIL path's (resize filter, float steps)."""

    def __init__(self, size, jitter="simclr"):
        self.size, self.kernel, self.jitter = size, shared.blur_kernel(size), shared.JITTER[jitter]
        self.mean = torch.tensor(shared.IMAGENET_MEAN)[:, None, None]
        self.std = torch.tensor(shared.IMAGENET_STD)[:, None, None]

    def __call__(self, images, generator):
        """uint8 [3, H, W] images (a list; sizes may differ) -> one view each, float [n, 3, S, S]."""
        heights = torch.tensor([image.shape[1] for image in images])
        widths = torch.tensor([image.shape[2] for image in images])
        p = {key: value.to(images[0].device) for key, value in self.sample(heights, widths, generator).items()}
        x = resized_crops(images, p["box"], self.size)
        x = torch.where(p["flip"][:, None, None, None], x.flip(-1), x)
        for position in range(4):  # jitter: brightness, contrast, saturation, hue in each image's order
            for op in range(4):
                pick = (p["jitter"] & (p["order"][:, position] == op)).nonzero()[:, 0]
                if len(pick):
                    x[pick] = COLOUR_OPS[op](x[pick], p["factor"][pick, op]).clamp(0, 1)
        x = torch.where(p["gray"][:, None, None, None], grayscale(x).expand_as(x), x)
        pick = p["blur"].nonzero()[:, 0]
        if len(pick):
            x[pick] = gaussian_blur(x[pick], p["sigma"][pick], self.kernel)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def sample(self, heights, widths, generator, attempts=10):
        """Per-image parameters, as RandomResizedCrop.get_params (10 tries at a uniform area share and a
        log-uniform aspect, then a centre crop) and RandomApply / ColorJitter.get_params draw them."""
        n, (s0, s1), (r0, r1) = len(heights), shared.CROP_SCALE, shared.CROP_RATIO
        uniform = lambda *shape: torch.rand(*shape, generator=generator, dtype=torch.float64)  # noqa: E731
        area = (heights * widths).double()[:, None] * (s0 + (s1 - s0) * uniform(n, attempts))
        aspect = torch.exp(math.log(r0) + (math.log(r1) - math.log(r0)) * uniform(n, attempts))
        w, h = (area * aspect).sqrt().round(), (area / aspect).sqrt().round()
        fits = (w > 0) & (w <= widths[:, None]) & (h > 0) & (h <= heights[:, None])
        first = fits.double().argmax(1, keepdim=True)  # the first try that fits
        w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
        i, j = (uniform(n) * (heights - h + 1)).floor(), (uniform(n) * (widths - w + 1)).floor()
        ratio = widths.double() / heights
        w_centre = torch.where(ratio > r1, (heights * r1).round(), widths.double())
        h_centre = torch.where(ratio < r0, (widths / r0).round(), heights.double())
        found = fits.any(1)
        h, w = torch.where(found, h, h_centre), torch.where(found, w, w_centre)
        i = torch.where(found, i, ((heights - h) / 2).floor())
        j = torch.where(found, j, ((widths - w) / 2).floor())
        (b, c, s, hue), (sigma0, sigma1) = self.jitter, shared.BLUR_SIGMA
        factor = torch.stack([1 - b + 2 * b * uniform(n), 1 - c + 2 * c * uniform(n), 1 - s + 2 * s * uniform(n),
                              -hue + 2 * hue * uniform(n)], 1).float()
        return {"box": torch.stack([i, j, h, w], 1).long(), "flip": uniform(n) < 0.5,
                "jitter": uniform(n) < shared.P_JITTER, "order": uniform(n, 4).argsort(1), "factor": factor,
                "gray": uniform(n) < shared.P_GRAY, "blur": uniform(n) < shared.P_BLUR,
                "sigma": (sigma0 + (sigma1 - sigma0) * uniform(n)).float()}


def resized_crops(images, box, size):
    """Crops (top, left, height, width) of uint8 images, resized to size x size: float [n, 3, size,
    size] in [0, 1]. Images of one shape go through one roi_align; others one by one."""
    if all(image.shape == images[0].shape for image in images):
        x = torch.stack(images).float() / 255
        top, left, height, width = box.to(x).unbind(1)
        index = torch.arange(len(x), device=x.device, dtype=x.dtype)
        rois = torch.stack([index, left, top, left + width, top + height], 1)
        return torchvision.ops.roi_align(x, rois, size, aligned=True)
    return torch.cat([F.interpolate(image[None, :, i:i + h, j:j + w].float() / 255, size=(size, size), mode="bilinear",
                                    antialias=True, align_corners=False)
                      for image, (i, j, h, w) in zip(images, box.tolist())])


def grayscale(x):
    """ITU-R 601 luma of float RGB images [n, 3, H, W] -> [n, 1, H, W] (torchvision's weights)."""
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]


def shift_hue(x, shift):
    """Rotate the hue of float RGB images [n, 3, H, W] by `shift` [n] turns, in HSV as torchvision does."""
    value, top = x.max(1)
    delta = value - x.min(1).values
    r, g, b = x.unbind(1)
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    hue = torch.where(top == 0, (g - b) / safe, torch.where(top == 1, 2 + (b - r) / safe, 4 + (r - g) / safe))
    hue = (hue / 6 + shift[:, None, None]) % 1
    saturation = delta / torch.where(value > 0, value, torch.ones_like(value))
    k = (torch.tensor([5.0, 3.0, 1.0], device=x.device)[None, :, None, None] + 6 * hue[:, None]) % 6
    return value[:, None] * (1 - saturation[:, None] * torch.minimum(k, 4 - k).clamp(0, 1))


def blend(x, f, other):
    """f x + (1 - f) other, per image: torchvision's adjust_* blends."""
    f = f[:, None, None, None]
    return f * x + (1 - f) * other


COLOUR_OPS = (lambda x, f: x * f[:, None, None, None],  # brightness: blend with black
              lambda x, f: blend(x, f, grayscale(x).mean((1, 2, 3), keepdim=True)),  # contrast: with the mean grey
              lambda x, f: blend(x, f, grayscale(x)),  # saturation: with the grey image
              shift_hue)


def gaussian_blur(x, sigma, kernel):
    """Each image of x [n, 3, H, W] blurred by its own sigma [n]: a separable kernel x kernel Gaussian
    with reflected borders, as torchvision's GaussianBlur."""
    n, c, height, width = x.shape
    taps = torch.arange(kernel, device=x.device, dtype=x.dtype) - (kernel - 1) / 2
    weights = torch.exp(-0.5 * (taps[None] / sigma[:, None]) ** 2)
    weights = (weights / weights.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [n * c, kernel]
    pad = kernel // 2
    y = F.pad(x.reshape(1, n * c, height, width), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, weights[:, None, :, None], groups=n * c)
    return F.conv2d(y, weights[:, None, None, :], groups=n * c).view(n, c, height, width)


if __name__ == "__main__":
    main()
