"""The model-parallel cosine softmax over N instance classes (the paper's hybrid parallelism).

Every training image is its own class, so the classifier has one row per image: 1.28M rows for
ImageNet-1K, 14.2M for ImageNet-21K. Backbone and head are data-parallel (DDP); the classifier
rows are split evenly over the W processes (model-parallel), and the softmax over all N classes
is computed in pieces that collectives stitch together. Per process and training step (the
paper's Figure 2, steps 1-8):

  1. the backbone embeds this rank's b images                      (the caller)
  2. all_gather the embeddings, labels and hard-class ids -> B = W*b rows
  3. cosine logits of all B rows against the local rows          s = cos(v, w) / tau
  4. exp, then ONE all_reduce of [sum_j exp(s_ij), sum_j y_ij s_ij]  (both sums over classes)
  5. loss_i = log sum_j exp(s_ij) - sum_j y_ij s_ij                 (Eq. 1 / Eq. 3)
  6. backward: the kept exp buffer times the local rows and the gathered embeddings, with
     1/sum_j and the targets y folded into the small operands: dL/ds = (p - y) / B
  7. reduce_scatter the embedding gradients back to their owners
  8. one optimiser step for backbone, head and the local rows      (the caller)

No max all-reduce is needed: |cos| <= 1 bounds |s_ij| by 1/tau <= 40, where exp can neither
overflow nor underflow in fp32 (this is what lets one collective finish the softmax).
The same code runs on gloo (CPU) and NCCL (GPU); without a process group it is the plain
single-process cosine softmax, so `python script.py` works unchanged.

Also here, after the softmax: the row collectives the stages share, saving the classifier rows
(with their SGD momentum) in a form that loads onto any number of processes, and stage(): how
every stage joins the torchrun process group, holds its run folder, writes files atomically and
stops with one line on every rank.
"""
import contextlib
import fcntl
import glob
import json
import os
import signal
import socket
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

# Recent torch deprecates the *_into_tensor / *_tensor names in favour of *_single.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# ---------------------------------------------------------------- the classifier (steps 2-7)

LOG2E = 1.4426950408889634  # exp(u) = 2^(u log2 e)
ROW_BLOCK = 32768  # rows per block of the elementwise passes over the weights (bounds temporaries)


def shard_range(num_classes, rank, world_size):
    """Rows [start, end) of the classifier owned by `rank`: contiguous, sizes differ by at most one."""
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class DistCosineSoftmax(nn.Module):
    """Cosine softmax over `num_classes` classes whose weight rows are sharded over the processes.

    forward(features [b, dim], labels [b], hard_classes [b, k] or None, alpha) returns Eq. 3
    (Eq. 1 when alpha is 0 or there are no hard classes), averaged over the global batch W*b and
    the same on every rank; b, k and alpha must be the same on every rank, and the k hard classes
    of a label other ids than it. Keep this module outside DDP: the gradient it hands the features
    is W x dL/dx (the sum over the W ranks' identical copies of the loss), which DDP's average over
    W turns into exactly dL/dtheta of the global loss (so a gradient check of this module alone on
    W > 1 ranks sees W times dL/dx). The local rows get exactly dL/dw.

    chunk_size bounds the logits buffer at (W*b) x chunk_size by walking the local rows in chunks
    and recomputing each chunk's logits in backward; the result equals the unchunked one up to the
    order of the sums.
    """

    def __init__(self, num_classes, dim, temperature=0.15, chunk_size=None):
        super().__init__()
        if temperature < 0.025:
            # exp(+-1/tau) must stay well inside fp32 (about e^+-87, with room for sums of N terms).
            raise ValueError(f"temperature {temperature} is below 0.025, where the softmax without a "
                             "max all-reduce can overflow fp32; use a temperature >= 0.025")
        self.num_classes, self.dim = num_classes, dim
        self.temperature, self.chunk_size = temperature, chunk_size
        self.rank, self.world_size = get_rank(), get_world_size()
        if num_classes < self.world_size:
            raise ValueError(f"{num_classes} classes cannot be sharded over {self.world_size} processes")
        self.start, self.end = shard_range(num_classes, self.rank, self.world_size)
        # Placeholder rows until load_classifier() fills in those of 01 (its prior, or Figure 4's
        # Gaussian arm); drawn per shard so that no two shards start equal.
        generator = torch.Generator().manual_seed(self.start)
        self.weight = nn.Parameter(torch.randn(self.end - self.start, dim, generator=generator) * 0.01)

    def forward(self, features, labels, hard_classes=None, alpha=0.0):
        if hard_classes is None or alpha == 0:
            hard_classes = labels.new_empty(labels.shape[0], 0)
        return _CosineSoftmax.apply(features, self.weight, labels, hard_classes, float(alpha), self)

    def local_rows(self, ids):
        """Positions in this rank's shard of those of `ids` it owns (the others are dropped)."""
        rows = ids - self.start
        return rows[(rows >= 0) & (rows < self.end - self.start)]

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, dim={self.dim}, rows=[{self.start}, {self.end}), "
                f"temperature={self.temperature}, chunk_size={self.chunk_size}")


class _CosineSoftmax(torch.autograd.Function):
    """Steps 2-7 with an explicit backward; one fp32 [W*b, chunk] buffer is the only large tensor.

    The buffer receives t = log2(e) s from one matrix product, becomes 2^t = exp(s) in place, and
    is the operand of both backward products. The gradient p - y is never written out: the row
    scale 1 / sum_j exp(s_ij) and the sparse targets y are folded into the small operands.
    """

    @staticmethod
    def forward(ctx, features, weight, labels, hard_classes, alpha, module):
        tau, world_size = module.temperature, module.world_size
        device_type = features.device.type
        # Matrix products follow autocast (bf16 on GPU: the logits then carry a relative error of
        # about 2^-9); exp, sums and the loss are fp32 (float64 for float64 inputs, which the
        # exactness tests use). fp16 would underflow the backward's row scale c / (tau S_i).
        dtype = torch.promote_types(features.dtype, torch.float32)
        mm_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else dtype
        if mm_dtype == torch.float16:
            raise ValueError("DistCosineSoftmax under fp16 autocast: its products need bf16's range; "
                             "use torch.autocast(..., dtype=torch.bfloat16)")
        with torch.autocast(device_type, enabled=False):
            # Step 2: gather the global batch B = W*b. Id column 0 is the label, columns 1..k the
            # hard classes, gathered together.
            x = features.to(dtype)
            ids = all_gather_rows(torch.cat([labels[:, None], hard_classes], 1))
            x_norm = F.normalize(all_gather_rows(x), dim=1)
            target_weight = _target_weights(ids.shape, alpha, x)
            local_ids = ids - module.start  # rows of the local shard; other shards' ids fall outside

            w = weight.to(dtype)
            inv_w_norm = w.norm(dim=1).clamp_min(1e-12).reciprocal()
            x_log2 = (x_norm * (LOG2E / tau)).to(mm_dtype)
            sums = x.new_zeros(2, len(x_norm))  # per row: sum_j exp(s_ij), log2(e) sum_j y_ij s_ij
            kept = []
            for c0, c1 in _chunks(len(w), module.chunk_size):
                # Step 3: t = log2(e) cos / tau for this chunk of local rows.
                w_norm = _normalised_rows(w, inv_w_norm, c0, c1, mm_dtype)
                t = (x_log2 @ w_norm.t()).to(dtype)
                # The target term of Eq. 3, read off before t turns into exp.
                in_chunk, cols = _chunk_columns(local_ids, c0, c1)
                sums[1] += (t.gather(1, cols) * target_weight * in_chunk).sum(1)
                # Step 4: exp in place (as exp2, the cheaper instruction) and this shard's row sums.
                # |s| <= 1/tau <= 40, so exp(s) neither overflows nor underflows in fp32: no max.
                sums[0] += t.exp2_().sum(1)
                if module.chunk_size is None:
                    kept = [t, w_norm]  # backward reuses both; a chunked run recomputes them
            if world_size > 1:
                dist.all_reduce(sums)  # Step 4: the one all-reduce, denominators and targets together
            # Step 5: Eq. 3, loss_i = log sum_j exp(s_ij) - sum_j y_ij s_ij (sum_j y_ij = 1).
            loss = (sums[0].log() - sums[1] / LOG2E).mean()

        ctx.module, ctx.mm_dtype, ctx.kept = module, mm_dtype, kept
        ctx.dtypes = features.dtype, weight.dtype
        ctx.save_for_backward(x, x_norm, x_log2, w, inv_w_norm, local_ids, target_weight, sums[0])
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        module, mm_dtype = ctx.module, ctx.mm_dtype
        x, x_norm, x_log2, w, inv_w_norm, local_ids, target_weight, denominators = ctx.saved_tensors
        tau = module.temperature
        with torch.autocast(x.device.type, enabled=False):
            # Step 6. With c = grad / B: dL/ds_ij = c (E_ij / S_i - y_ij), E = exp(s), and
            # s_ij = x_norm_i . w_norm_j / tau. The E/S part goes through two matrix products with
            # the row scale c / (tau S_i) folded into the small operand; the y part touches only the
            # B x (k+1) target pairs.
            c = grad_loss.to(x.dtype) / len(x_norm)
            row_scale = (c / (tau * denominators))[:, None]
            x_scaled = (x_norm * row_scale).to(mm_dtype)
            grad_x_norm = torch.zeros_like(x_norm)
            grad_w = torch.empty_like(w)  # holds dL/d(w/|w|) until _through_row_norm
            for c0, c1 in _chunks(len(w), module.chunk_size):
                if ctx.kept:
                    (exp_t, w_norm), ctx.kept = ctx.kept, None
                else:
                    w_norm = _normalised_rows(w, inv_w_norm, c0, c1, mm_dtype)
                    exp_t = (x_log2 @ w_norm.t()).to(x.dtype).exp2_()
                exp_t = exp_t.to(mm_dtype)
                grad_x_norm += (exp_t @ w_norm).to(x.dtype) * row_scale
                gw = grad_w[c0:c1]
                if mm_dtype == gw.dtype:
                    torch.mm(exp_t.t(), x_scaled, out=gw)
                else:
                    gw.copy_(exp_t.t() @ x_scaled)
                del exp_t
                # The -y part (Eq. 2): the label and hard classes that live in this chunk.
                in_chunk, cols = _chunk_columns(local_ids, c0, c1)
                rows, slots = in_chunk.nonzero(as_tuple=True)
                classes = cols[rows, slots]
                coef = (-c / tau * target_weight[rows, slots])[:, None]
                grad_x_norm.index_add_(0, rows, w_norm[classes].to(x.dtype) * coef)
                gw.index_add_(0, classes, x_norm[rows] * coef)
                del w_norm
                _through_row_norm(gw, w[c0:c1], inv_w_norm[c0:c1])
            # Step 7: sum the shards' parts of the embedding gradient and keep this rank's rows.
            # DDP averages backbone gradients over W ranks; W x dL/dx makes that average exact.
            grad_x_norm_local = reduce_scatter_rows(grad_x_norm).mul_(module.world_size)
            # Back through x / |x|, on the local rows only.
            x_norm_local = F.normalize(x, dim=1)
            radial = (grad_x_norm_local * x_norm_local).sum(1, keepdim=True)
            grad_x = (grad_x_norm_local - radial * x_norm_local) / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return grad_x.to(ctx.dtypes[0]), grad_w.to(ctx.dtypes[1]), None, None, None, None


def _target_weights(shape, alpha, like):
    """Eq. 2 per id column: 1 - alpha for the label, alpha / k for each of the k hard classes (in the
    dtype and on the device of `like`)."""
    k = shape[1] - 1
    weights = torch.full(shape, alpha / max(k, 1), dtype=like.dtype, device=like.device)
    weights[:, 0] = 1.0 - alpha if k else 1.0
    return weights


def _chunks(n, chunk_size):
    step = chunk_size or n
    return [(c0, min(c0 + step, n)) for c0 in range(0, n, step)]


def _normalised_rows(w, inv_w_norm, c0, c1, mm_dtype):
    """w_j / |w_j| for local rows c0..c1, in the dtype of the matrix products."""
    out = w.new_empty(c1 - c0, w.shape[1], dtype=mm_dtype)
    for r0 in range(c0, c1, ROW_BLOCK):
        r1 = min(r0 + ROW_BLOCK, c1)
        out[r0 - c0:r1 - c0] = w[r0:r1] * inv_w_norm[r0:r1, None]
    return out


def _through_row_norm(grad, w, inv_w_norm):
    """In place: dL/d(w/|w|) -> dL/dw = (g - (g . w_norm) w_norm) / |w|, row block by row block."""
    for r0 in range(0, len(w), ROW_BLOCK):
        g, w_norm = grad[r0:r0 + ROW_BLOCK], w[r0:r0 + ROW_BLOCK] * inv_w_norm[r0:r0 + ROW_BLOCK, None]
        g.addcmul_(w_norm, torch.linalg.vecdot(g, w_norm)[:, None], value=-1).mul_(inv_w_norm[r0:r0 + ROW_BLOCK, None])


def _chunk_columns(local_ids, c0, c1):
    """Which target ids fall in local rows [c0, c1), and their columns in the chunk (0 elsewhere)."""
    cols = local_ids - c0
    in_chunk = (cols >= 0) & (cols < c1 - c0)
    return in_chunk, cols.clamp(0, c1 - c0 - 1)


# ---------------------------------------------------------------- collectives on rows

def all_gather_rows(tensor):
    """Every rank's `tensor` stacked along dim 0 in rank order (all ranks pass the same shape)."""
    world_size = get_world_size()
    if world_size == 1:
        return tensor
    out = tensor.new_empty(world_size * tensor.shape[0], *tensor.shape[1:])
    _all_gather(out, tensor.contiguous())
    return out


def reduce_scatter_rows(tensor):
    """Sum `tensor` over the ranks and return this rank's 1/W of the rows (dim 0, rank order)."""
    world_size = get_world_size()
    if world_size == 1:
        return tensor
    out = tensor.new_empty(tensor.shape[0] // world_size, *tensor.shape[1:])
    _reduce_scatter(out, tensor.contiguous())
    return out


def all_gather_shards(local, total):
    """Every rank's contiguous shard_range shard [n_r, ...] of a total-row tensor, concatenated in
    rank order on every rank (shards may differ in size by one, or be empty)."""
    world = get_world_size()
    if world == 1:
        return local
    size = shard_range(total, 0, world)[1]  # rank 0's shard is the largest
    padded = local.new_zeros((size,) + tuple(local.shape[1:]))
    padded[:len(local)] = local
    gathered = all_gather_rows(padded)
    return torch.cat([gathered[r * size:r * size + e - s]
                      for r, (s, e) in enumerate(shard_range(total, r, world) for r in range(world))])


def owner_of(ids, num_rows, world_size):
    """The rank whose shard_range shard holds each id (a tensor of ids)."""
    base, extra = divmod(num_rows, world_size)
    split = extra * (base + 1)  # ids below this sit in the shards of size base + 1
    return torch.where(ids < split, ids // (base + 1), extra + (ids - split) // max(base, 1))


def send_rows_to_owners(ids, rows, num_rows):
    """This rank's shard [end - start, ...] of a num_rows-row table whose rows were computed on any
    ranks in any order: each rank passes the (ids, rows) it holds, every id held by exactly one rank,
    and one all_to_all sends each row to the rank that owns its id. No rank holds all num_rows rows."""
    world = get_world_size()
    start, end = shard_range(num_rows, get_rank(), world)
    if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= num_rows):
        raise ValueError(f"ids must lie in [0, {num_rows})")
    shard = rows.new_empty((end - start,) + tuple(rows.shape[1:]))
    if world > 1:
        owners = owner_of(ids, num_rows, world)
        order = owners.argsort(stable=True)
        ids, rows = ids[order], rows[order].contiguous()
        send_counts = torch.bincount(owners, minlength=world)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts)  # how many rows each rank will send here
        send, recv = send_counts.tolist(), recv_counts.tolist()
        received_ids = ids.new_empty(sum(recv))
        received_rows = rows.new_empty((sum(recv),) + tuple(rows.shape[1:]))
        dist.all_to_all_single(received_ids, ids, recv, send)
        dist.all_to_all_single(received_rows, rows, recv, send)
        ids, rows = received_ids, received_rows
    if len(ids) != end - start or len(torch.unique(ids)) != len(ids):
        raise RuntimeError(f"{len(ids)} rows reached a shard of {end - start}: every id must be sent exactly once")
    shard[ids - start] = rows
    return shard


def gather_shards(local, num_rows):
    """All num_rows rows of a sharded [end - start, ...] tensor (shard_range layout) on rank 0, as a
    CPU tensor; None on the other ranks. Every rank must call it. Shards travel to rank 0 point to
    point, one at a time, so no process holds more than the full CPU copy plus one shard."""
    world, rank = get_world_size(), get_rank()
    if world == 1:
        return local.detach().cpu().clone()
    full = local.new_empty((num_rows,) + tuple(local.shape[1:]), device="cpu") if rank == 0 else None
    for src in range(world):
        s0, s1 = shard_range(num_rows, src, world)
        if rank == 0:
            piece = local.detach() if src == 0 else local.new_empty((s1 - s0,) + tuple(local.shape[1:]))
            if src:
                dist.recv(piece, src=src)
            full[s0:s1] = piece.cpu()
        elif rank == src:
            dist.send(local.detach().contiguous(), dst=0)
    return full


# ---------------------------------------------------------------- checkpoints on any GPU count

def gather_classifier(classifier, optimizer=None):
    """All N rows (and their SGD momentum) on rank 0 as CPU float32; None on the other ranks.

    Every rank must call it. The result loads onto any number of processes (load_classifier).
    """
    momentum = _momentum_buffer(classifier, optimizer)
    if classifier.world_size > 1:
        # Whether momentum exists must agree on every rank before the transfers start.
        has = torch.tensor([int(momentum is not None)], device=classifier.weight.device)
        dist.all_reduce(has, op=dist.ReduceOp.MIN)
        momentum = momentum if has.item() else None
    n = classifier.num_classes
    weight = gather_shards(classifier.weight.float(), n)
    momentum = gather_shards(momentum.float(), n) if momentum is not None else None
    if classifier.rank != 0:
        return None
    return {"weight": weight, "momentum": momentum, "num_classes": n}


def load_classifier(classifier, state, optimizer=None):
    """Copy rows [start, end) of a gather_classifier() dict into this rank's shard, any world size."""
    if state["num_classes"] != classifier.num_classes or state["weight"].shape[1] != classifier.dim:
        raise ValueError(f"checkpoint has {state['num_classes']} x {state['weight'].shape[1]} classifier rows, "
                         f"this run needs {classifier.num_classes} x {classifier.dim}: it comes from other data "
                         "or another --dim; point --out at the right run folder")
    rows = slice(classifier.start, classifier.end)
    with torch.no_grad():
        classifier.weight.copy_(state["weight"][rows])
    if optimizer is not None and state.get("momentum") is not None:
        optimizer.state[classifier.weight]["momentum_buffer"] = (
            state["momentum"][rows].to(classifier.weight.device, classifier.weight.dtype).clone())


def _momentum_buffer(classifier, optimizer):
    if optimizer is None:
        return None
    return optimizer.state.get(classifier.weight, {}).get("momentum_buffer")


# ---------------------------------------------------------------- process group helpers

def get_world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def get_rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main():
    return get_rank() == 0


def init_distributed(device="auto"):
    """Join torchrun's process group when launched by torchrun; return this process's device.

    NCCL on CUDA, gloo on CPU. Without torchrun's environment this is a plain single process.
    """
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return dev


def finish_distributed(owns_group):
    """Leave the process group this script joined: barrier first, as gloo aborts a rank that
    leaves while others still talk. A group the caller created (tests) is left to the caller."""
    if owns_group and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def data_parallel(module, device):
    """`module` in DDP over the process group (one device per process), or as it is in one process."""
    if get_world_size() == 1:
        return module
    return nn.parallel.DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)


# ---------------------------------------------------------------- one stage: a process group, a run folder, one line per rank

PROGRESS = {"where": None}  # set by the training loops: what the line of an interrupted run says
UMASK = os.umask(0o22)  # read once (umask can only be read by setting it), then put back
os.umask(UMASK)


def fail(message, code=2):
    """One line on stderr, then exit with `code` (2: a problem with the input), no traceback."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


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


class Terminated(BaseException):
    """SIGTERM (torchrun stopping the other processes after one failed, or a job scheduler)."""


@contextlib.contextmanager
def stage(args):
    """Run one stage with its parsed arguments and yield the device (--device): join torchrun's
    process group when launched by torchrun, hold the run folder RUN (--out) against a second run
    (rank 0 flocks RUN/.lock; the kernel lets go when the process dies, so no lock outlives its
    run), remove the temporary files a killed run left there, print the arguments, and leave the
    group at the end.

    Every way of stopping ends in one line on stderr: its own error (exit 2); on the other ranks,
    "stopped because process R failed" once that rank's exit breaks a collective (R leaves a mark in
    RUN, so RUN must be shared by the nodes, as the checkpoints already need); on Ctrl-C or SIGTERM,
    where the run stands and that the same command resumes it (exit 130 / 143). On NCCL a rank
    blocked in a collective cannot run Python: there torchrun stops it, and its own summary names
    the process that failed."""
    out, owns_group = args.out, not dist.is_initialized()
    device = init_distributed(args.device)
    previous_handler = signal.signal(signal.SIGTERM, _raise_terminated)
    PROGRESS["where"] = None
    lock, held = None, False
    try:
        lock = _hold_run_folder(out, device)
        held = True  # every rank: rank 0 holds RUN, so failure marks may be written there
        if is_main():
            print("args: " + json.dumps(vars(args), sort_keys=True), flush=True)
        yield device
        finish_distributed(owns_group)
    except (KeyboardInterrupt, Terminated) as e:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one line, even if a second signal follows
        failed = _failed_peer(out) if held and get_world_size() > 1 else None
        if failed is not None:
            fail(f"stopped because process {failed} failed (see its message)")
        what = "interrupted" if isinstance(e, KeyboardInterrupt) else "stopped by SIGTERM"
        where = f" {PROGRESS['where']};" if PROGRESS["where"] else ""
        fail(f"{what};{where} what was saved in {out} is kept, and the same command resumes from it",
             130 if isinstance(e, KeyboardInterrupt) else 143)
    except SystemExit as e:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if e.code not in (0, None) and held and get_world_size() > 1:
            _mark_failed(out)  # before this process exits and breaks the others' collectives
        raise
    except Exception:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        failed = _failed_peer(out) if held and get_world_size() > 1 else None
        if failed is None:
            if held and get_world_size() > 1:
                _mark_failed(out)
            raise  # this rank's own error: a traceback is what a bug should show
        fail(f"stopped because process {failed} failed (see its message)")
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        if lock is not None:
            lock.close()  # lets go of the flock


def _raise_terminated(signum, frame):
    raise Terminated()


def _hold_run_folder(out, device):
    """Rank 0 takes RUN/.lock and clears what a killed run left; every rank learns the outcome.
    Returns rank 0's open lock file (None on the other ranks)."""
    problem, lock = None, None
    if is_main():
        problem, lock = _take_lock(out)
        if lock is not None:  # before the broadcast: no rank has started, so no mark is fresh
            for stale in glob.glob(os.path.join(out, ".tmp-*")) + glob.glob(os.path.join(out, ".failed-rank-*")):
                os.remove(stale)
                if ".tmp-" in stale:
                    print(f"removed {stale}, a half-written file of a killed run", flush=True)
    if get_world_size() > 1:
        ok = torch.tensor([problem is None], dtype=torch.int32, device=device)
        dist.broadcast(ok, src=0)
        if not ok.item() and not is_main():
            fail("stopped because process 0 failed (see its message)")
    if problem:
        fail(problem)
    return lock


def _take_lock(out):
    """(problem or None, the open RUN/.lock flocked by this process, holding "host pid")."""
    if os.path.exists(out) and not os.path.isdir(out):
        return f"--out {out} is a file, not a folder; pass a folder for the run", None
    path = os.path.join(out, ".lock")
    try:
        os.makedirs(out, exist_ok=True)
        lock = open(path, "a+")
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


def _mark_failed(out):
    """RUN/.failed-rank-R: tells the other ranks, whose collectives this rank's exit breaks, who failed."""
    try:
        with open(os.path.join(out, f".failed-rank-{get_rank()}"), "w"):
            pass
    except OSError:
        pass


def _failed_peer(out, wait=2.0):
    """The lowest other rank that marked itself failed (waiting up to `wait` s for its mark), else None."""
    deadline = time.monotonic() + wait
    while True:
        ranks = sorted(int(p.rsplit("-", 1)[1]) for p in glob.glob(os.path.join(out, ".failed-rank-*")))
        ranks = [r for r in ranks if r != get_rank()]
        if ranks or time.monotonic() > deadline:
            return ranks[0] if ranks else None
        time.sleep(0.1)
