"""The model-parallel cosine softmax over N instance classes (the paper's hybrid parallelism).

Every training image is its own class, so the classifier has one row per image: 1.28M rows for
ImageNet-1K, 14.2M for ImageNet-21K. Backbone and head are data-parallel (DDP); the rows are split
evenly over the W processes (model-parallel) and the softmax over all N classes is computed in
pieces that collectives stitch together. Per process and training step (the paper's Figure 2):

  1. the backbone embeds this rank's b views                       (the caller, 02)
  2. all_gather the embeddings, labels and hard-class ids -> B = W*b rows
  3. cosine logits of all B rows against the local rows          s = cos(v, w) / tau
  4. exp, then ONE all_reduce of [sum_j exp(s_ij), sum_j y_ij s_ij]  (both sums over classes)
  5. loss_i = log sum_j exp(s_ij) - sum_j y_ij s_ij   (Eq. 1 / 3; each rank has all B rows' sums: one loss)
  6. backward: the kept exp buffer times the local rows and the gathered embeddings, with
     1/sum_j and the targets y folded into the small operands: dL/ds = (p - y) / B
  7. reduce_scatter the embedding gradients to their owners   (the paper's gather + sum, each rank its part)
  8. one optimiser step for backbone, head and the local rows      (the caller, 02)

No max all-reduce is needed: |cos| <= 1 bounds |s_ij| by 1/tau <= 40, where exp can neither
overflow nor underflow in fp32. The same code runs on gloo (CPU) and NCCL (GPU), and without a
process group as the plain cosine softmax (written plainly, in float64: tests/test_dist_softmax.py's
reference_loss). The file: the classifier (steps 2-7), then the collectives on rows that 01, 03 and
the kNN use, then, behind one banner, what every stage needs from the process group.
"""
import math
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

LOG2E = 1.4426950408889634  # exp(u) = 2^(u log2 e)
ROW_BLOCK = 32768  # rows per block of the elementwise passes over the weights (bounds temporaries)
# Recent torch names these *_single; torch 2.4 knows them as *_into_tensor / *_tensor.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# ---------------------------------------------------------------- the classifier (steps 2-7)

def shard_range(num_classes, rank, world_size):
    """Rows [start, end) of the classifier owned by `rank`: contiguous, sizes differ by at most one."""
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class DistCosineSoftmax(nn.Module):
    """Cosine softmax over `num_classes` classes whose weight rows are sharded over the processes.

    forward(features [b, dim], labels [b], hard_classes [b, k] or None, alpha, sample) returns Eq. 3
    (Eq. 1 when alpha is 0 or there are no hard classes), averaged over the W*b rows (views), the
    same on every rank; b, k, alpha and sample must agree on every rank. Keep this module outside
    DDP: the features get W x dL/dx, which DDP's average over W turns into exactly dL/dtheta of the
    global loss; the local rows get exactly dL/dw. chunk_size bounds the logits buffer at
    (W*b) x chunk_size, recomputing each chunk in backward. sample=(M, seed): Table 3's sampled
    softmax (sampled_rows); the rows then get a sparse gradient, only the drawn ones have one.
    """

    def __init__(self, num_classes, dim, temperature=0.15, chunk_size=None):
        super().__init__()
        if temperature < 0.025:  # exp(+-1/tau) must stay well inside fp32, with room for sums of N terms
            raise ValueError(f"temperature {temperature} is below 0.025, where the softmax without a "
                             "max all-reduce can overflow fp32; use a temperature >= 0.025")
        self.num_classes, self.dim = num_classes, dim
        self.temperature, self.chunk_size = temperature, chunk_size
        self.rank, self.world_size = get_rank(), get_world_size()
        if num_classes < self.world_size:
            raise ValueError(f"{num_classes} classes cannot be sharded over {self.world_size} processes")
        self.start, self.end = shard_range(num_classes, self.rank, self.world_size)
        # Placeholder rows until load_classifier() fills in 01's; drawn per shard so no two start equal.
        generator = torch.Generator().manual_seed(self.start)
        self.weight = nn.Parameter(torch.randn(self.end - self.start, dim, generator=generator) * 0.01)

    def forward(self, features, labels, hard_classes=None, alpha=0.0, sample=None):
        if hard_classes is None or alpha == 0:
            hard_classes = labels.new_empty(labels.shape[0], 0)
        # Step 2 for the ids: column 0 the label, columns 1..k the hard classes, gathered together.
        ids = all_gather_rows(torch.cat([labels[:, None], hard_classes], 1))
        rows = None if sample is None else self.sampled_rows(ids, *sample)
        return _CosineSoftmax.apply(features, self.weight, ids, float(alpha), rows, self)

    def sampled_rows(self, ids, num_sampled, seed):
        """Table 3: the local rows (sorted positions) in this step's softmax: every class a target
        touches, and each other class with probability (M - T) / (N - T), T the targets, drawn from
        blocks seeded by (seed, block): the same classes on any process count, each rank its own."""
        targets = ids.unique()
        rate = max(num_sampled - len(targets), 0) / max(self.num_classes - len(targets), 1)
        drawn = seeded_rows(self.start, self.end, seed, lambda g, n: torch.rand(n, generator=g)) < rate
        drawn[self.local_rows(targets).cpu()] = True
        return drawn.nonzero()[:, 0].to(self.weight.device)

    def local_rows(self, ids):
        """Positions in this rank's shard of those of `ids` it owns (the others are dropped)."""
        rows = ids - self.start
        return rows[(rows >= 0) & (rows < self.end - self.start)]


class _CosineSoftmax(torch.autograd.Function):
    """Steps 2-7 with an explicit backward; one fp32 [W*b, chunk] buffer is the only large tensor:
    it receives t = log2(e) s from one matrix product, becomes 2^t = exp(s) in place, and is the
    operand of both backward products. The gradient p - y is never written out: the row scale
    1 / sum_j exp(s_ij) and the sparse targets y are folded into the small operands."""

    @staticmethod
    def forward(ctx, features, weight, ids, alpha, rows, module):
        tau, device_type = module.temperature, features.device.type
        # Products follow autocast (bf16 on GPU: logits within about 2^-9); exp, sums and the loss are
        # fp32 (float64 for float64 inputs). fp16 would underflow the backward's row scale c / (tau S_i).
        dtype = torch.promote_types(features.dtype, torch.float32)
        mm_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else dtype
        if mm_dtype == torch.float16:
            raise ValueError("DistCosineSoftmax under fp16 autocast: its products need bf16's range; "
                             "use torch.autocast(..., dtype=torch.bfloat16)")
        with torch.autocast(device_type, enabled=False):
            x = features.to(dtype)
            x_norm = F.normalize(all_gather_rows(x), dim=1)  # step 2: the global batch B = W*b
            target_weight = _target_weights(ids.shape, alpha, x)
            w = (weight if rows is None else weight.index_select(0, rows)).to(dtype)
            local_ids = _columns(ids - module.start, rows)  # other shards' ids fall outside [0, len(w))
            inv_w_norm = w.norm(dim=1).clamp_min(1e-12).reciprocal()
            x_log2 = (x_norm * (LOG2E / tau)).to(mm_dtype)  # log2(e) folded in: one exp2_ in place gives exp(s)
            sums = x.new_zeros(2, len(x_norm))  # per row: sum_j exp(s_ij), log2(e) sum_j y_ij s_ij
            kept = []
            for c0, c1 in _chunks(len(w), module.chunk_size):
                w_norm = _normalised_rows(w, inv_w_norm, c0, c1, mm_dtype)
                t = (x_log2 @ w_norm.t()).to(dtype)  # step 3: t = log2(e) cos / tau
                in_chunk, cols = _chunk_columns(local_ids, c0, c1)  # Eq. 3's target term, before exp
                sums[1] += (t.gather(1, cols) * target_weight * in_chunk).sum(1)
                sums[0] += t.exp2_().sum(1)  # step 4: exp in place (as exp2) and this shard's row sums
                if module.chunk_size is None:
                    kept = [t, w_norm]  # backward reuses both; a chunked run recomputes them
            if module.world_size > 1:
                dist.all_reduce(sums)  # step 4: the one all-reduce, denominators and targets together
            loss = (sums[0].log() - sums[1] / LOG2E).mean()  # step 5: Eq. 3 (sum_j y_ij = 1)
        ctx.module, ctx.mm_dtype, ctx.kept, ctx.rows = module, mm_dtype, kept, rows
        ctx.dtypes, ctx.weight_shape = (features.dtype, weight.dtype), weight.shape
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
                in_chunk, cols = _chunk_columns(local_ids, c0, c1)  # the -y part (Eq. 2) in this chunk
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
            x_norm_local = F.normalize(x, dim=1)  # back through x / |x|, on the local rows only
            radial = (grad_x_norm_local * x_norm_local).sum(1, keepdim=True)
            grad_x = (grad_x_norm_local - radial * x_norm_local) / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
        grad_w = grad_w.to(ctx.dtypes[1])
        if ctx.rows is not None:  # Table 3: only the drawn rows have a gradient
            grad_w = torch.sparse_coo_tensor(ctx.rows[None], grad_w, ctx.weight_shape, is_coalesced=True,
                                             check_invariants=False)
        return grad_x.to(ctx.dtypes[0]), grad_w, None, None, None, None


def _target_weights(shape, alpha, like):
    """Eq. 2 per id column: 1 - alpha for the label, alpha / k for each of the k hard classes."""
    k = shape[1] - 1
    weights = torch.full(shape, alpha / max(k, 1), dtype=like.dtype, device=like.device)
    weights[:, 0] = 1.0 - alpha if k else 1.0
    return weights


def _columns(shard_ids, rows):
    """Columns of the target ids among the local rows in the softmax (all, or the sampled `rows`); else -1."""
    if rows is None:
        return shard_ids
    if len(rows) == 0:
        return torch.full_like(shard_ids, -1)
    pos = torch.searchsorted(rows, shard_ids).clamp_max(len(rows) - 1)
    return torch.where(rows[pos] == shard_ids, pos, -1)


def _chunks(n, chunk_size):
    step = chunk_size or max(n, 1)
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
    return in_chunk, cols.clamp(0, max(c1 - c0 - 1, 0))


# ---------------------------------------------------------------- collectives on rows

def all_gather_rows(tensor):
    """Every rank's `tensor` stacked along dim 0 in rank order (all ranks pass the same shape)."""
    if get_world_size() == 1:
        return tensor
    out = tensor.new_empty(get_world_size() * tensor.shape[0], *tensor.shape[1:])
    _all_gather(out, tensor.contiguous())
    return out


def reduce_scatter_rows(tensor):
    """Sum `tensor` over the ranks and return this rank's 1/W of the rows (dim 0, rank order)."""
    if get_world_size() == 1:
        return tensor
    out = tensor.new_empty(tensor.shape[0] // get_world_size(), *tensor.shape[1:])
    _reduce_scatter(out, tensor.contiguous())
    return out


def each_shard(local, num_rows, spare=0):
    """Yield (start, end, rows) for every rank's shard of a num_rows-row table, on every rank: each
    owner broadcasts its shard in turn into one reused buffer (with `spare` zero rows beyond it)."""
    world = get_world_size()
    buffer = local.new_zeros((shard_range(num_rows, 0, world)[1] + spare,) + tuple(local.shape[1:]))
    for owner in range(world):
        start, end = shard_range(num_rows, owner, world)
        if owner == get_rank():
            buffer[:end - start] = local
        buffer[end - start:] = 0
        if world > 1 and end > start:
            dist.broadcast(buffer[:end - start], src=owner)
        yield start, end, buffer


def all_gather_shards(local, num_rows):
    """All num_rows rows of a sharded [end - start, ...] tensor (shard_range layout) on every rank."""
    return torch.cat([rows[:e - s].clone() for s, e, rows in each_shard(local, num_rows)])


def gather_shards(local, num_rows):
    """All num_rows rows of a sharded [end - start, ...] tensor on rank 0 as a CPU tensor (None on
    the others), one shard at a time. Every rank must call it."""
    full = local.new_empty((num_rows,) + tuple(local.shape[1:]), device="cpu") if is_main() else None
    for start, end, rows in each_shard(local.detach(), num_rows):
        if full is not None:
            full[start:end] = rows[:end - start].cpu()
    return full


def owner_of(ids, num_rows, world_size):
    """The rank whose shard_range shard holds each id (a tensor of ids)."""
    base, extra = divmod(num_rows, world_size)
    split = extra * (base + 1)  # ids below this sit in the shards of size base + 1
    return torch.where(ids < split, ids // (base + 1), extra + (ids - split) // max(base, 1))


def send_rows_to_owners(ids, rows, num_rows):
    """This rank's shard [end - start, ...] of a num_rows-row table whose rows were computed on any
    ranks in any order (each id on exactly one rank): one all_to_all sends each row to its owner."""
    world = get_world_size()
    start, end = shard_range(num_rows, get_rank(), world)
    if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= num_rows):
        raise ValueError(f"ids must lie in [0, {num_rows})")
    if world > 1:
        owners = owner_of(ids, num_rows, world)
        order = owners.argsort(stable=True)
        ids, rows = ids[order], rows[order].contiguous()
        send_counts = torch.bincount(owners, minlength=world)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts)  # how many rows each rank will send here
        send, recv = send_counts.tolist(), recv_counts.tolist()
        received_ids, received_rows = ids.new_empty(sum(recv)), rows.new_empty((sum(recv),) + tuple(rows.shape[1:]))
        dist.all_to_all_single(received_ids, ids, recv, send)
        dist.all_to_all_single(received_rows, rows, recv, send)
        ids, rows = received_ids, received_rows
    if len(ids) != end - start or len(torch.unique(ids)) != len(ids):
        raise RuntimeError(f"{len(ids)} rows reached a shard of {end - start}: every id must be sent exactly once")
    shard = rows.new_empty((end - start,) + tuple(rows.shape[1:]))
    shard[ids - start] = rows
    return shard


@torch.no_grad()
def nearest_rows(queries, rows, k, start=0, exclude=None, chunk_size=4096, sharded=True):
    """(similarities, ids) [Q, k] of the k rows most similar to each query (dot products, most
    similar first) over every rank's shard of `rows` (`start`: the id of this rank's first row): a
    running top-k over chunks of the local rows, then one all_gather of every rank's candidates
    (sharded=False: `rows` is the whole table). Fewer than k rows leave padding (id -1, -inf);
    `exclude`: one id per query that is not its own neighbour (the query itself)."""
    values = torch.full((len(queries), k), -math.inf, device=queries.device)
    ids = torch.full((len(queries), k), -1, dtype=torch.long, device=queries.device)
    for c0 in range(0, len(rows), chunk_size):
        scores = queries @ rows[c0:c0 + chunk_size].t()
        block_ids = torch.arange(start + c0, start + c0 + scores.shape[1], device=queries.device)
        if exclude is not None:
            scores[block_ids[None] == exclude.to(queries.device)[:, None]] = -math.inf
        values, ids = merge_top_k(values, ids, scores, block_ids.expand_as(scores), k)
    if sharded and get_world_size() > 1:  # [W*Q, k] -> [Q, W*k]: every rank's candidates of each query
        values, ids = (all_gather_rows(t).view(-1, *t.shape).transpose(0, 1).flatten(1) for t in (values, ids))
        values, ids = merge_top_k(values[:, :0], ids[:, :0], values, ids, k)
    return values, ids


def merge_top_k(values, ids, new_values, new_ids, k, sorted=True):
    """The k largest of [values, new_values] per row, with their ids: the running top-k of every
    search (kNN, 01's retrieval, 03's hard classes)."""
    values, pick = torch.cat([values, new_values], 1).topk(k, dim=1, sorted=sorted)
    return values, torch.cat([ids, new_ids], 1).gather(1, pick)


def seeded_rows(start, end, seed, draw, block=4096):
    """Rows [start, end) of a table drawn block by block, draw(generator, block) with a generator
    seeded by (seed, block index): the same rows whatever shards they are cut into."""
    parts = []
    for b in range(start // block, (end - 1) // block + 1):
        values = draw(torch.Generator().manual_seed((seed * 1000003 + b) % 2**63), block)
        parts.append(values[max(start, b * block) - b * block:min(end, (b + 1) * block) - b * block])
    return torch.cat(parts)


# ================================================================ what every stage needs from the process group

def get_world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def get_rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main():
    return get_rank() == 0


def join_process_group(device="auto"):
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU; none without torchrun); this process's device."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return dev


def data_parallel(module, device):
    """`module` in DDP over the process group (one device per process), or as it is in one process."""
    if get_world_size() == 1:
        return module
    return nn.parallel.DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)


def broadcast_buffers(module):
    """Rank 0's buffers (BN statistics) on every rank. DDP does this at the start of each training
    forward; evaluations and saved files call it, so that one network has one set of statistics."""
    for buffer in module.buffers() if get_world_size() > 1 else ():
        dist.broadcast(buffer, src=0)


def gather_classifier(classifier, optimizer=None):
    """All N rows (and their SGD momentum) on rank 0 as CPU float32; None on the other ranks. Every
    rank must call it. The result loads onto any number of processes (load_classifier)."""
    momentum = optimizer.state.get(classifier.weight, {}).get("momentum_buffer") if optimizer else None
    has = torch.tensor([int(momentum is not None)], device=classifier.weight.device)
    if classifier.world_size > 1:  # whether momentum exists must agree before the transfers start
        dist.all_reduce(has, op=dist.ReduceOp.MIN)
    n = classifier.num_classes
    weight = gather_shards(classifier.weight.float(), n)
    momentum = gather_shards(momentum.float(), n) if has.item() else None
    return {"weight": weight, "momentum": momentum, "num_classes": n} if is_main() else None


def load_classifier(classifier, state, optimizer=None):
    """Copy rows [start, end) of a gather_classifier() dict into this rank's shard, any world size."""
    if state["num_classes"] != classifier.num_classes or state["weight"].shape[1] != classifier.dim:
        raise ValueError(f"checkpoint has {state['num_classes']} x {state['weight'].shape[1]} rows, this run needs "
                         f"{classifier.num_classes} x {classifier.dim}: other data or another --dim")
    rows = slice(classifier.start, classifier.end)
    with torch.no_grad():
        classifier.weight.copy_(state["weight"][rows])
    if optimizer is not None and state.get("momentum") is not None:
        optimizer.state[classifier.weight]["momentum_buffer"] = (
            state["momentum"][rows].to(classifier.weight.device, classifier.weight.dtype).clone())
