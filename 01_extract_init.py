"""Stage 01: the contrastive prior, i.e. raw-feature initialisation of the N instance-class rows.

The paper's second technique ("A Contrastive Prior", Figure 4): build the network from --seed
(ResNet + 2-layer MLP head to D = 128), pass once over the training set with no parameter changing,
and use each instance's embedding as its classifier row, stored at unit length (cosine logits ignore
length; a row's SGD step scales with 1 / |w|^2). --bn reads the paper's "running BNs": running (the
default) normalises each batch by its own statistics (BN in training mode); ema by the running
averages the batch has just updated ("a weighted average of ... features extracted in previous
iterations"); fixed is eval mode. --init random: Table 4's Gaussian rows (Figure 4's random init), no pass.

BN subtracts what a batch shares, so the pass draws its batches from a seeded permutation of all N
instances (prior_batches), never a run of one class folder. A BN batch is one process's share,
--batch-size / W; process r embeds the centre crops of batches r, r + W, ..., and one all_to_all
sends every row to its owner. It writes RUN/init.pt ({"network", "classifier": {"weight" [N, 128],
"momentum": None, "num_classes"}, "args", "fingerprint"}; any process count) and RUN/data.json, and
prints the rows' same-class top-1 retrieval against chance (loosely, the paper's 3% against 0.1% with a random
ResNet-50 on ImageNet) and Figure 4's gap (two views of one instance against two instances). Below the banner
"What every stage shares": the conventions of all stages, defined here as 01 needs them first.

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
import fcntl
import hashlib
import io
import json
import math
import os
import random
import resource
import signal
import socket
import sys
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn
from torchvision import transforms

import dist_softmax as dsm


def arguments():
    """01's flags, after those every stage shares (add_common_args)."""
    parser = Parser(__doc__)
    add_common_args(parser, epochs=None, batch_size=4096)
    parser.add_argument("--bn", default="running", choices=["running", "ema", "fixed"],
                        help="running (a reading of the paper's running BNs): BN in training mode, each batch by its "
                             "own statistics; ema: by the running averages it has just updated; fixed: eval mode")
    parser.add_argument("--init", default="raw", choices=["raw", "random"],
                        help="raw: rows = embeddings from the pass; random: Gaussian rows, no pass")
    parser.add_argument("--dim", type=POSITIVE, default=128, help="embedding size D")
    parser.add_argument("--head", default="mlp", choices=["mlp", "linear"],
                        help="the 2-layer MLP head, or one linear layer (Table 2's 'no MLP head' row)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the init.pt of a run folder that 02 has already trained in (RUN/checkpoint.pt)")
    parser.add_argument("--diagnostic-samples", type=POSITIVE, default=1000,
                        help="queries for the retrieval check and instances for the cosine gap")
    return parser


def main(argv=None):
    args = arguments().parse_args(argv)
    with stage(args) as device:
        world = dsm.get_world_size()

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
        # 01 defines the run's data: an earlier 01 that stopped before writing init.pt does not bind it.
        fingerprint = check_data(args.out, paths, args.data, replace=not os.path.isfile(f"{args.out}/init.pt"))
        local_batch = resolve_rank_batch(args.batch_size, world)
        if args.init == "raw" and len(prior_batches(n, local_batch, args.seed)) < world:
            fail(f"--batch-size {args.batch_size} leaves some of the {world} processes without a batch of the "
                 f"{n} images; use a smaller --batch-size")
        if args.init == "raw" and args.bn != "fixed" and local_batch < 2:
            fail(f"--batch-size {args.batch_size} gives each process batches of 1, which BN cannot normalise by "
                 f"their statistics; use --batch-size {2 * world} or more")
        log(f"01_extract_init: {n} instances, {len(classes)} folder classes, {world} process(es) on {device}, "
            f"batch {args.batch_size} ({local_batch} per process), init {args.init}, BN {args.bn}")

        # ---- network ----
        torch.manual_seed(args.seed)  # the same initial network on every rank
        net = EmbeddingNet(args.arch, args.image_size, args.dim, args.head).to(device)
        if device.type == "cuda":
            net = net.to(memory_format=torch.channels_last)
        net.requires_grad_(False)  # no parameter changes; only BN's statistics move
        classifier = dsm.DistCosineSoftmax(n, args.dim).to(device)  # here only the rows' shard layout

        # ---- the pass: shuffled batches, each row sent to the rank that owns it ----
        t0 = time.perf_counter()
        if args.init == "raw":
            hooks = set_bn_mode(net, args.bn)
            ids, embeddings = zip(*prior_pass(net, paths, local_batch, args, device))
            rows = dsm.send_rows_to_owners(torch.cat(ids), torch.cat(embeddings), n)
            for hook in hooks:
                hook.remove()
            if args.bn != "fixed":
                merge_bn_averages(net)  # one network state for the run
        else:  # Table 4's Gaussian rows (Figure 4's random init), the same on any process count
            rows = dsm.seeded_rows(classifier.start, classifier.end, args.seed,
                                   lambda g, block: torch.randn(block, args.dim, generator=g)).to(device)
        with torch.no_grad():  # unit rows: every arm starts at the same scale whatever the embeddings' norm
            classifier.weight.copy_(F.normalize(rows.float(), dim=1))
        log(f"rows ready in {time.perf_counter() - t0:.1f} s")

        # ---- save ----
        state = dsm.gather_classifier(classifier)  # collective
        if dsm.is_main():
            path = os.path.join(args.out, "init.pt")
            atomic_save({"network": cpu_state(net), "classifier": state, "args": vars(args),
                         "fingerprint": fingerprint}, path)
            log(f"wrote {path}: network + {n} x {args.dim} classifier rows")

            # ---- diagnostics (rank 0, on the assembled rows) ----
            if len(classes) > 1:
                hits, chance, queries = retrieval_top1(state["weight"], labels, args.diagnostic_samples, args.seed)
                log(f"same-class top-1 retrieval of the {args.init} rows: {100 * hits:.1f}% over {queries} queries "
                    f"(chance {100 * chance:.1f}%)")
            same, other = view_cosine_gap(net, paths, args, device)
            log(f"mean cosine, two views of one instance: {same:.4f}; of two instances: {other:.4f}; "
                f"gap {same - other:.4f} (BN {args.bn})")


# ---------------------------------------------------------------- the pass and its diagnostics

def prior_batches(num_instances, batch_size, seed):
    """The batches of the prior pass: a seeded permutation of all instances cut into batches of
    batch_size, the same for any process count. A last batch of one joins the one before."""
    order = torch.randperm(num_instances, generator=torch.Generator().manual_seed(seed))
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


@torch.no_grad()
def prior_pass(net, paths, batch_size, args, device):
    """Yield (instance ids, embeddings of the centre crops) for this process's share of
    prior_batches: batches r, r + W, r + 2W, ... on rank r. The network runs in the mode it is in."""
    rank, world = dsm.get_rank(), dsm.get_world_size()
    batches = [b.tolist() for b in prior_batches(len(paths), batch_size, args.seed)[rank::world]]
    dataset = ImageList(paths, eval_transform(args.image_size))
    for images, index in data_loader(dataset, args, device, batch_sampler=batches):
        with autocast(device):
            yield index.to(device), net(to_device(images, device)).float()


def set_bn_mode(net, mode):
    """Every BN for one of Figure 4's readings; returns hooks to remove after the pass. running:
    training mode, saving the plain average over the pass; ema: eval mode, each batch first updating
    the running averages (momentum 0.1, from the first batch's statistics); fixed: eval mode."""
    net.train(mode == "running")
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None if mode == "running" else 0.1
    return [bn.register_forward_pre_hook(_update_running_stats) for bn in norms] if mode == "ema" else []


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
    for bn in (m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
        if dsm.get_world_size() > 1:
            count = bn.num_batches_tracked.to(bn.running_mean)
            totals = torch.cat([bn.running_mean * count, bn.running_var * count, count.view(1)])
            dist.all_reduce(totals)
            width = len(bn.running_mean)
            bn.running_mean.copy_(totals[:width] / totals[-1].clamp_min(1))
            bn.running_var.copy_(totals[width:2 * width] / totals[-1].clamp_min(1))
            bn.num_batches_tracked.fill_(int(totals[-1]))
        bn.momentum = 0.1


@torch.no_grad()
def retrieval_top1(rows, labels, samples, seed):
    """Share of queries whose most cosine-similar other row has the same folder class, the chance
    of that for a random other row (sum_c n_c (n_c - 1) / N (N - 1)), and the number of queries."""
    labels, n = torch.as_tensor(labels), rows.shape[0]
    query = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))[:samples]  # not prior_batches' draw
    rows = F.normalize(rows.float(), dim=1)
    _, nearest = dsm.nearest_rows(rows[query], rows, 1, exclude=query, sharded=False)  # rank 0 holds all rows
    hits = (labels[nearest[:, 0]] == labels[query]).double().mean().item()
    sizes = torch.bincount(labels).double()
    return hits, ((sizes * (sizes - 1)).sum() / (n * (n - 1))).item(), len(query)


@torch.no_grad()
def view_cosine_gap(net, paths, args, device, batch_size=64):
    """Figure 4's gap: mean cosine of two augmented views of one instance, and of two instances, on a
    fixed sample, with BN as in the pass (ema: its final averages), on a copy of the network."""
    net = copy.deepcopy(net).train(args.bn == "running")
    sample = torch.randperm(len(paths), generator=torch.Generator().manual_seed(args.seed + 2))
    sample = sample[:args.diagnostic_samples].tolist()
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
    other = (first * second.roll(1, dims=0)).sum(1).mean().item()  # instance i against i - 1
    return (first * second).sum(1).mean().item(), other


# ================================================================ What every stage shares
# Arguments; a stage's harness (stage, fail, log, InputError); run-folder files (atomic_save, load_run_file,
# resume_from, save_for_resume, append_log); data (list_images, check_data, list_val_images, ImageList,
# data_loader); transforms; the network (EmbeddingNet, build_backbone); loop pieces (step_seed, Meter); kNN.
# ---------------------------------------------------------------- arguments

class Parser(argparse.ArgumentParser):
    """argparse with every stage's conventions: the docstring as --help, and a bad argument stopping
    with one line (no usage block), exit code 2."""

    def __init__(self, doc):
        super().__init__(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)

    def error(self, message):
        fail(f"{message}; see --help")


def number(kind, low=None, high=None, open_low=False, open_high=False):
    """An argparse type: a finite int or float in [low, high] (open ends on request), else one line."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        too_low = low is not None and (value <= low if open_low else value < low) if value is not None else True
        too_high = high is not None and (value >= high if open_high else value > high) if value is not None else True
        if value is None or not math.isfinite(value) or too_low or too_high:
            bounds = [f"{'>' if open_low else '>='} {low}" if low is not None else "",
                      f"{'<' if open_high else '<='} {high}" if high is not None else ""]
            shape = "a whole number" if kind is int else "a finite number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {shape} {' and '.join(b for b in bounds if b)}".strip())
        return value
    return parse


POSITIVE, COUNT = number(int, 1), number(int, 0)  # --epochs, --batch-size...; --workers
RATE, NON_NEGATIVE, FRACTION = number(float, 0, open_low=True), number(float, 0), number(float, 0, 1, open_high=True)


def add_common_args(parser, epochs, batch_size, data_required=True, network_of_run=False):
    """The flags every stage shares (see the README's conventions). epochs=None: no --epochs.
    network_of_run: --arch and --image-size default to the run's (run_network fills them in)."""
    parser.add_argument("--data", required=data_required, metavar="ROOT",
                        help="dataset root holding train/ (and val/ for evaluation), ImageFolder layout")
    parser.add_argument("--out", default="run", metavar="RUN", help="run folder shared by all stages")
    arch, image_size = (None, None) if network_of_run else ("resnet50", 224)
    parser.add_argument("--arch", default=arch, choices=["resnet18", "resnet34", "resnet50"])
    parser.add_argument("--image-size", type=number(int, 8), default=image_size,
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


# ---------------------------------------------------------------- a stage: the run folder, one line on every stop

class InputError(Exception):
    """Bad input found where fail() cannot end the run (a loader worker); stage() prints its line."""


class Terminated(BaseException):
    """SIGTERM (torchrun stopping the processes after one failed, or a job scheduler)."""


def fail(message, code=2):
    """One line on stderr, then exit with `code` (2: a problem with the input), no traceback."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def log(*parts):
    if dsm.is_main():  # rank 0 speaks for all
        print(*parts, flush=True)


PROGRESS = {"where": None}  # set by the training loops: what the line of an interrupted run says


@contextlib.contextmanager
def stage(args):
    """Run one stage and yield its device: join torchrun's process group, hold the run folder --out
    against a second run (rank 0 flocks RUN/.lock; the kernel lets go when the process dies),
    remove what a killed run left, print the arguments, leave the group at the end."""
    local_rank, gpus = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
    if (args.device == "cuda" or gpus) and args.device != "cpu" and gpus <= local_rank:  # a GPU for each process
        fail(f"--device {args.device}: process {local_rank} of this node has no GPU of its own ({gpus} visible); "
             "start one process per GPU (--nproc_per_node) or pass --device cpu")
    owns_group = not dist.is_initialized()
    device = dsm.join_process_group(args.device)
    previous_handler = signal.signal(signal.SIGTERM, _raise_terminated)
    PROGRESS["where"], lock = None, None
    try:
        lock = _hold_run_folder(args.out, device)
        log("args: " + json.dumps(vars(args), sort_keys=True))
        yield device
        if owns_group and dist.is_initialized():
            dist.barrier()  # gloo aborts a rank that leaves while others still talk
            dist.destroy_process_group()
    except BaseException as e:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one line, even if a second signal follows
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # nor a loader's report of a dead worker
        one_line_stop(e, args.out)
        raise  # a bug of this process: the traceback is what it should show
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        if lock is not None:
            lock.close()  # lets go of the flock


def one_line_stop(e, out):
    """fail() with `e`'s line when it is not a bug: Ctrl-C / SIGTERM (exit 130 / 143), a bad input (also
    from a loader worker), a peer process that failed, a loader that stopped (dead worker, timeout)."""
    kept = f"what was saved in {out} is kept, and the same command resumes from it"
    if isinstance(e, (KeyboardInterrupt, Terminated)):
        what = "interrupted" if isinstance(e, KeyboardInterrupt) else "stopped by SIGTERM"
        if isinstance(e, Terminated) and dsm.get_world_size() > 1:
            what += " (torchrun sends it to every process when another process failed: see its message)"
        where = f" {PROGRESS['where']};" if PROGRESS["where"] else ""
        fail(f"{what};{where} {kept}", 130 if isinstance(e, KeyboardInterrupt) else 143)
    if isinstance(e, InputError):  # from a loader worker its text ends with "InputError: <message>"
        fail(str(e).strip().splitlines()[-1].split("InputError: ")[-1])
    if isinstance(e, dist.DistBackendError) or (isinstance(e, RuntimeError) and "closed by peer" in str(e)):
        fail(f"stopped because another process failed (see its message; torchrun's summary names it); {kept}")
    if isinstance(e, (EOFError, ConnectionError)) or (isinstance(e, RuntimeError) and str(e).startswith("DataLoader")):
        reason = str(e).splitlines()[0].rstrip(". ") if str(e) else "a worker died while handing over a batch"
        fail(f"the data loader stopped delivering batches ({reason}): a loader worker "
             "died (out of memory?) or a read hung; rerun the same command to resume, with fewer --workers, "
             "--workers 0, or a longer --loader-timeout")


def _raise_terminated(signum, frame):
    raise Terminated()


def _hold_run_folder(out, device):
    """Rank 0 takes RUN/.lock and clears what a killed run left; every rank learns the outcome."""
    problem, lock = None, None
    if dsm.is_main():
        problem, lock = _take_lock(out)
        for stale in [os.path.join(out, f) for f in os.listdir(out) if f.startswith(".tmp-")] if lock else ():
            os.remove(stale)
            print(f"removed {stale}, a half-written file of a killed run", flush=True)
    if dsm.get_world_size() > 1:
        ok = torch.tensor([problem is None], dtype=torch.int32, device=device)
        dist.broadcast(ok, src=0)
        if not ok.item() and not dsm.is_main():
            fail("stopped because process 0 failed (see its message)")
    if problem:
        fail(problem)
    return lock


def _take_lock(out):
    """(problem or None, the open RUN/.lock flocked by this process, holding "host pid")."""
    if os.path.exists(out) and not os.path.isdir(out):
        return f"--out {out} is a file, not a folder; pass a folder for the run", None
    try:
        os.makedirs(out, exist_ok=True)
        lock = open(os.path.join(out, ".lock"), "a+")
    except OSError as e:
        return f"cannot write to the run folder {out} ({e.strerror}); pass an --out you can write to", None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = (lock.read().strip().splitlines() or ["another process"])[0]
        lock.close()
        return f"{out} is in use by another run ({holder}); wait for it to end or pass another --out", None
    lock.seek(0)
    lock.truncate()
    lock.write(f"process {os.getpid()} on {socket.gethostname()}\n")
    lock.flush()
    return None, lock


# ---------------------------------------------------------------- files in the run folder

UMASK = os.umask(0o22)  # read once (umask can only be read by setting it), then put back
os.umask(UMASK)


def atomic_save(obj, path, dump=torch.save):
    """dump(obj, file) (torch.save by default) to a temporary file beside `path`, then rename: a crash
    never leaves half a file, a full disk keeps the previous one (one line). The umask's mode."""
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


def write_json(path, obj):
    """JSON written atomically: a reader never sees half a file."""
    atomic_save(json.dumps(obj, indent=2).encode(), path, dump=lambda data, f: f.write(data))


def append_log(path, record, epochs_done=None):
    """One JSON line per record (rank 0). With epochs_done (at a stage's start): first drop the
    lines of unfinished epochs, so that a resumed or restarted run logs every step and epoch once."""
    if not dsm.is_main():
        return
    if epochs_done is not None:
        lines = open(path).readlines() if os.path.isfile(path) else []
        kept = [line for line in lines if json.loads(line).get("epoch", 0) < epochs_done]
        atomic_save("".join(kept).encode(), path, dump=lambda data, f: f.write(data))
    if record is not None:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def load_run_file(path, needs=(), fix="rerun the stage that writes it", what=None):
    """torch.load(path, weights_only=True) as a dict holding the keys `needs`; a folder, anything
    unreadable, truncated or of another shape: one line naming the file (as `what`) and `fix`."""
    what = what or path
    if os.path.isdir(path):
        fail(f"{what} is a folder, not a checkpoint file; {fix}")
    try:
        obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # noqa: BLE001 - every way of being unreadable gets the same answer
        reason = " ".join(str(e).split())[:80] if isinstance(e, OSError) else "not a torch checkpoint"
        fail(f"cannot read {what} ({reason}); {fix}")
    missing = [key for key in needs if not isinstance(obj, dict) or key not in obj]
    if missing:
        fail(f"{what} is not a file this stage reads (no {', '.join(missing)}); {fix}")
    return obj


def resume_from(path, settings, network=None, optimizer=None):
    """The resume contract of every training stage (02, 04, 05): the checkpoint at `path` (its states
    loaded into `network` and `optimizer`), or None. One written by another stage or with other
    `settings` ("stage", "data", flag values) is refused with one line: it would train something else."""
    if not os.path.isfile(path):
        return None
    ckpt = load_run_file(path, ("settings",), "delete it to start over")
    saved = ckpt["settings"]
    if saved.get("stage") != settings["stage"]:
        fail(f"{path} was written by {saved.get('stage')}, not {settings['stage']}; pass another --out or delete it")
    changed = [key for key in sorted(set(saved) | set(settings)) if saved.get(key) != settings.get(key)]
    if changed:
        names = {"data": "other training images", "backbone": "another backbone"}
        was = ", ".join(names.get(key) or f"--{key.replace('_', '-')} {saved.get(key)}" for key in changed)
        fail(f"{path} was written with other settings ({was}); rerun with those to resume, or delete it to start over")
    if network is not None:
        network.load_state_dict(ckpt["network"])
    if optimizer is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    log(f"resuming from {path} (saved by {ckpt['world_size']} process(es), now {dsm.get_world_size()})")
    return ckpt


def save_for_resume(path, settings, network, optimizer, **progress):
    """What resume_from reads, written atomically by rank 0, with the stage's progress (epoch, ...)."""
    if dsm.is_main():
        atomic_save({"settings": settings, "network": cpu_state(network), "optimizer": optimizer.state_dict(),
                     "world_size": dsm.get_world_size(), **progress}, path)


def cpu_state(module):
    return {key: value.detach().cpu() for key, value in module.state_dict().items()}


# ---------------------------------------------------------------- data

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff")


def list_images(folder):
    """(paths, labels, classes) of every image below `folder`, recursively, sorted by relative path:
    label = the index of its top-level subfolder (files directly in `folder`: class ""); the
    position in `paths` is the instance id."""
    if not os.path.isdir(folder):
        fail(f"{folder} is not a folder; --data ROOT must hold train/ with one subfolder per class")

    def unreadable(error):
        fail(f"cannot read {error.filename} ({error.strerror}); make it readable or move it out of {folder}")

    found, seen, skipped = [], set(), 0
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True, onerror=unreadable):
        info = os.stat(dirpath)
        if (info.st_dev, info.st_ino) in seen:  # a symbolic link back to a folder already listed
            dirnames[:], skipped = [], skipped + 1
            continue
        seen.add((info.st_dev, info.st_ino))
        dirnames.sort()  # the first path to a folder wins, the same one every time
        found += [os.path.relpath(os.path.join(dirpath, name), folder).replace(os.sep, "/")
                  for name in filenames if name.lower().endswith(IMAGE_EXTENSIONS)]
    if skipped:
        log(f"note: {skipped} folder(s) below {folder} reached again through symbolic links were listed once")
    if not found:
        fail(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found below {folder}")
    found.sort()
    tops = [rel.split("/")[0] if "/" in rel else "" for rel in found]
    classes = sorted(set(tops))
    index = {c: i for i, c in enumerate(classes)}
    return [os.path.join(folder, rel) for rel in found], [index[t] for t in tops], classes


def check_data(run_dir, paths, data_root, replace=False):
    """The training list's fingerprint {"count", "sha256" of the relative paths}, checked against
    RUN/data.json, or written there (first use, or `replace`: 01 before its init.pt exists). Another
    list stops every stage; so do (rank 0) files whose sizes or modification times changed."""
    rel = [os.path.relpath(p, data_root).replace(os.sep, "/") for p in paths]
    found = {"count": len(rel), "sha256": hashlib.sha256("\n".join(rel).encode()).hexdigest()}
    path, identity = os.path.join(run_dir, "data.json"), dict(found)
    if not dsm.is_main():
        return identity
    found["files"] = hashlib.sha256(" ".join(file_stamp(p) for p in paths).encode()).hexdigest()
    if replace or not os.path.isfile(path):
        write_json(path, {**found, "root": os.path.abspath(data_root)})
        return identity
    try:
        saved = json.load(open(path))
        saved["count"], saved["sha256"]
    except (OSError, ValueError, TypeError, KeyError) as e:
        fail(f"{path} is not a data fingerprint ({type(e).__name__}: {e}); delete it and rerun with the "
             f"--data this run was made from")
    if (saved["count"], saved["sha256"]) != (found["count"], found["sha256"]):
        fail(f"{run_dir} was made from {saved['count']} training images ({saved.get('root', '?')}) but "
             f"--data {data_root} lists {found['count']} different ones; pass the original --data or a new --out")
    if saved.get("files", found["files"]) != found["files"]:
        fail(f"images under {data_root}/train changed in place since this run's 01 (same names, other sizes or "
             "modification times): its rows belong to the old images; restore them, or rerun 01 with a new --out")
    return identity


def file_stamp(path):
    try:
        info = os.stat(path)
    except OSError as e:  # a broken link, a file gone since the listing
        fail(bad_image(path, e))
    return f"{info.st_size}:{info.st_mtime_ns}"


def list_val_images(data_root, classes):
    """(paths, labels) of ROOT/val with labels indexing `classes` (train's order). Two layouts:
    ImageFolder (val/<class>/..., class folders named as in train/, any subset of them) or
    tiny-ImageNet's val/images/ + val/val_annotations.txt ("file<TAB>class<TAB>box...")."""
    val_dir = os.path.join(data_root, "val")
    index = {c: i for i, c in enumerate(classes)}
    annotations = os.path.join(val_dir, "val_annotations.txt")
    if os.path.isfile(annotations):
        named = {}
        for number, name, cls in read_annotations(annotations):
            if os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
                fail(f"{annotations} line {number} names {name}, outside val/images/; name files under val/images/")
            if name in named:
                fail(f"{annotations} line {number} lists {name} " + ("again" if named[name] == cls else
                     f"as {cls}, an earlier line as {named[name]}") + "; keep one line per image")
            if cls not in index:
                fail(f"{annotations} labels {name} as class {cls}, which train/ does not have; "
                     f"use the train/ that belongs to this val/")
            if not os.path.isfile(os.path.join(val_dir, "images", name)):
                fail(f"{os.path.join(val_dir, 'images', name)} is listed in {annotations} but missing; restore it")
            named[name] = cls
        if not named:
            fail(f"{annotations} lists no images")
        return [os.path.join(val_dir, "images", n) for n in sorted(named)], [index[named[n]] for n in sorted(named)]
    if not os.path.isdir(val_dir):
        fail(f"{val_dir} not found; the evaluation needs ROOT/val/ (ImageFolder, or tiny-ImageNet's "
             f"images/ + val_annotations.txt)")
    paths, folder_labels, folders = list_images(val_dir)
    unknown = [c for c in folders if c not in index]
    if unknown:
        fail(f"{val_dir} has class folder(s) {unknown[:3]} that train/ lacks; name val/ folders as in train/")
    return paths, [index[folders[label]] for label in folder_labels]


def read_annotations(path):
    """(line number, file, class) per line of tiny-ImageNet's val_annotations.txt (UTF-8, a BOM allowed)."""
    try:
        lines = open(path, encoding="utf-8-sig").read().splitlines()
    except UnicodeDecodeError as e:
        fail(f"{path} is not UTF-8 text (byte {e.start} is not); save it as UTF-8")
    found = []
    for number, line in enumerate(lines, 1):
        fields = line.strip().split("\t")
        if fields[0] and len(fields) < 2:
            fail(f"{path} line {number} has no class column; expected 'file<TAB>class<TAB>...'")
        found += [(number, fields[0], fields[1])] if fields[0] else []
    return found


class ImageList(torch.utils.data.Dataset):
    """paths -> (transform(image), instance id = position in `paths`), or (transform(image), class
    label) when `labels` are given: the one data convention of every stage."""

    def __init__(self, paths, transform, labels=None):
        self.paths, self.transform, self.labels = paths, transform, labels

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return self.transform(load_rgb(self.paths[index])), index if self.labels is None else self.labels[index]


def load_rgb(path, data=None):
    """The image at `path` (or its bytes `data`) as 8-bit RGB; 16/32-bit and float images scaled by
    their range, not clipped to white. A file PIL cannot decode (or a decompression bomb) is an
    InputError naming it; decoder warnings (a corrupt JPEG's extra bytes) stay silent."""
    try:
        with Image.open(path if data is None else io.BytesIO(data)) as image:
            if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                pixels = np.asarray(image, dtype=np.float64)
                top = 65535.0 if image.mode != "F" and pixels.max() <= 65535 else max(pixels.max(), 1e-12)
                return Image.fromarray(np.clip(pixels / top * 255, 0, 255).astype(np.uint8)).convert("RGB")
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise InputError(bad_image(path, e)) from None


def bad_image(path, error):
    """The one line for an image that cannot be read, on every data path."""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"cannot read image {path} ({reason}); remove or replace that file"


def data_loader(dataset, args, device, **kwargs):
    """torch's DataLoader with --workers, pinned memory on CUDA and a --loader-timeout a batch: a
    loader that stops delivering ends the run with one line, never a silent wait."""
    return torch.utils.data.DataLoader(dataset, num_workers=args.workers, pin_memory=device.type == "cuda",
                                       timeout=args.loader_timeout if args.workers else 0, **kwargs)


def timed_batches(loader):
    """One epoch of (batch, seconds spent waiting for it): the data-wait share of the progress lines."""
    batches, t0 = iter(loader), time.perf_counter()  # workers start in iter(): not a wait for data
    for batch in batches:
        yield batch, time.perf_counter() - t0
        t0 = time.perf_counter()  # the consumer's work is done: the wait for the next batch starts


def collate_lists(items):
    """A batch as lists (of file bytes, of boxes...), for items that cannot be stacked."""
    return tuple(list(column) for column in zip(*items))


def fixed_sample(count, limit, seed):
    """Sorted indices of at most `limit` of `count` items, drawn with `seed` (all of them if count <= limit)."""
    return sorted(torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:limit].tolist())


# ---------------------------------------------------------------- transforms

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# SimCLR's augmentation of the training views (the paper cites it), for train_transform and 02's
# device path. Colour jitter (brightness, contrast, saturation, hue): SimCLR's strength 1, or MoCo v2's half.
CROP_SCALE, CROP_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)
JITTER = {"simclr": (0.8, 0.8, 0.8, 0.2), "mocov2": (0.4, 0.4, 0.4, 0.1)}
P_JITTER, P_GRAY, P_BLUR, BLUR_SIGMA = 0.8, 0.2, 0.5, (0.1, 2.0)


def blur_kernel(image_size):
    return max(3, int(0.1 * image_size) // 2 * 2 + 1)  # about 10% of the side, odd


def eval_transform(image_size):
    """Resize the short side to 256/224 x size, centre crop, ImageNet normalisation."""
    return transforms.Compose([transforms.Resize(round(image_size * 256 / 224)), transforms.CenterCrop(image_size),
                               transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


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


class TwoViews:
    """Two independent draws of a random transform, stacked: [2, C, H, W]."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image):
        return torch.stack([self.transform(image), self.transform(image)])


# ---------------------------------------------------------------- the network

def build_backbone(arch, image_size):
    """(torchvision ResNet with fc = Identity, feature width). Key names stay torchvision's.
    At image_size <= 64 the usual small-image stem replaces conv1 (3x3, stride 1) and drops the
    max-pool; such a state_dict loads into build_backbone(arch, size) or a torchvision ResNet whose
    conv1 was swapped likewise; larger ones into torchvision.models.<arch>() with only fc.* missing."""
    model = getattr(torchvision.models, arch)(weights=None)
    feature_dim = model.fc.in_features
    model.fc = nn.Identity()
    if image_size <= 64:
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
        log(f"{arch} at {image_size} px: small-image stem (3x3 stride-1 conv1, no max-pool)")
    return model, feature_dim


class EmbeddingNet(nn.Module):
    """Backbone + a 2-layer MLP head to D dims: Linear(F, F) + BN + ReLU + Linear(F, D). The paper
    says "2-layer MLP" and no more: the hidden width equals the backbone's (2048 for ResNet-50) and
    BN sits in the hidden layer, as in SimCLR's head. The output is not normalised (the cosine
    classifier does that). head="linear": one Linear(F, D), Table 2's row without the MLP head."""

    def __init__(self, arch, image_size, dim=128, head="mlp"):
        super().__init__()
        self.backbone, width = build_backbone(arch, image_size)
        if head == "mlp":
            self.head = nn.Sequential(nn.Linear(width, width, bias=False), nn.BatchNorm1d(width),
                                      nn.ReLU(inplace=True), nn.Linear(width, dim))
        else:
            self.head = nn.Sequential(nn.Linear(width, dim))

    def forward(self, x):
        return self.head(self.backbone(x))


def autocast(device):
    """bf16 autocast on CUDA (the matrix products of every stage), nothing on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def to_device(images, device):
    """A batch of images on `device` in the default dtype (float32 unless a test asks for float64),
    channels_last on CUDA (faster convolutions under autocast)."""
    images = images.to(device, torch.get_default_dtype(), non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else images


def run_network(args):
    """--arch / --image-size not given: those of RUN/init.pt (what the run trained), else resnet50 at 224 px."""
    init = os.path.join(args.out, "init.pt")
    made = (load_run_file(init).get("args") or {}) if os.path.isfile(init) else {}
    args.arch = args.arch or made.get("arch", "resnet50")
    args.image_size = args.image_size or made.get("image_size", 224)
    log(f"network: {args.arch} at {args.image_size} px ({'as in ' + init if made else 'the defaults'})")


def resolve_rank_batch(global_batch, world_size):
    """This process's share of the global --batch-size; it must split evenly."""
    if global_batch < world_size or global_batch % world_size:
        fail(f"--batch-size {global_batch} does not split evenly over {world_size} processes; "
             f"use a multiple of {world_size}")
    return global_batch // world_size


# ---------------------------------------------------------------- the training loops' small pieces

def step_seed(seed, position, rank=0):
    """One seed per (--seed, epoch or iteration, rank): reseeding with it makes a resumed run draw
    what an uninterrupted one draws, without storing generator states in checkpoints."""
    return seed * 1000003 + position * 1009 + rank


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cosine_lr(base_lr, progress, warmup_epochs, epochs):
    """Linear warm-up over warmup_epochs, then cosine to 0 at `epochs`; progress in epochs."""
    if progress < warmup_epochs:
        return base_lr * progress / warmup_epochs
    t = min(1.0, (progress - warmup_epochs) / max(epochs - warmup_epochs, 1e-12))
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * t))


def stop_if_not_finite(loss, where, kept):
    if not math.isfinite(loss):
        fail(f"loss is {loss} at {where}; stopped, {kept}")


class Meter:
    """Loss and timing over the steps since the last progress line; line() prints it (rank 0) and
    returns its record: loss, lr, images/s, data-wait share, ETA, peak memory."""

    def __init__(self):
        self.steps, self.loss, self.wait, self.start = 0, 0.0, 0.0, time.perf_counter()

    def add(self, loss, wait):
        self.steps, self.loss, self.wait = self.steps + 1, self.loss + loss, self.wait + wait

    def line(self, head, lr, images, steps_left, device, detail="", **record):
        elapsed = time.perf_counter() - self.start
        per_step = elapsed / max(self.steps, 1)
        peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30  # peak RSS on CPU
        record.update(loss=self.loss / max(self.steps, 1), lr=lr, images_per_s=images / per_step,
                      data_wait=self.wait / max(elapsed, 1e-12), eta_s=per_step * steps_left, peak_mem_gib=peak)
        eta = int(record["eta_s"])
        log(f"{head} loss {record['loss']:.4f}{detail} lr {lr:.4g} img/s {record['images_per_s']:.0f} data "
            f"{100 * record['data_wait']:.0f}% eta {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d} mem {peak:.2f}G")
        self.__init__()
        return record


# ---------------------------------------------------------------- kNN: 02's curve, 04's protocol

EMBED_BATCH = 256  # images per process and batch when embedding for an evaluation (the same in every stage)


@torch.no_grad()
def embed(backbone, paths, args, device):
    """Pooled backbone features [len(paths), width] (float32, on `device`) of the centre crops, BN
    in eval mode, in the order of `paths`."""
    was_training = backbone.training
    backbone.eval()
    loader = data_loader(ImageList(paths, eval_transform(args.image_size)), args, device, batch_size=EMBED_BATCH)
    features = []
    for images, _ in loader:
        with autocast(device):
            features.append(backbone(to_device(images, device)).float())
    backbone.train(was_training)
    return torch.cat(features) if features else torch.empty(0, backbone.inplanes, device=device)


def embed_for_knn(backbone, bank, queries, args, device):
    """knn_accuracy's inputs from (paths, labels) pairs: this rank's shard of the normalised bank
    features and its first id, every bank label, and all queries' features and labels."""
    def shard(paths):
        start, end = dsm.shard_range(len(paths), dsm.get_rank(), dsm.get_world_size())
        return F.normalize(embed(backbone, paths[start:end], args, device), dim=1), start
    (bank_x, start), (query_x, _) = shard(bank[0]), shard(queries[0])
    labels = [torch.tensor(labels, device=device) for labels in (bank[1], queries[1])]
    return bank_x, start, labels[0], dsm.all_gather_shards(query_x, len(queries[0])), labels[1]


def knn_accuracy(bank_x, bank_start, bank_labels, queries, query_labels, num_classes, ks, temperature=0.07,
                 chunk_size=4096):
    """{k: (top-1 %, top-5 %)} of weighted kNN: the k bank rows most similar to a query (over every
    rank's shard) vote for their class with weight exp(sim / temperature); the same on every rank."""
    hits = {k: torch.zeros(2, dtype=torch.float64, device=queries.device) for k in ks}
    for q0 in range(0, len(queries), chunk_size):
        values, ids = dsm.nearest_rows(queries[q0:q0 + chunk_size], bank_x, max(ks), bank_start, chunk_size=chunk_size)
        for k in ks:  # padding (fewer than k rows: id -1, similarity -inf) weighs 0
            scores = torch.zeros(len(values), num_classes, device=queries.device).scatter_add_(
                1, bank_labels[ids[:, :k]], (values[:, :k] / temperature).exp())
            top = scores.topk(min(5, num_classes), dim=1).indices == query_labels[q0:q0 + chunk_size, None]
            hits[k] += torch.stack([top[:, 0].sum(), top.any(1).sum()]).double()
    return {k: tuple((100 * hits[k] / max(len(queries), 1)).tolist()) for k in ks}


if __name__ == "__main__":
    main()
