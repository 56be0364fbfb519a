"""dist_softmax at W = 64 ranks, simulated by threads of one process.

The ranks are threads on PyTorch's threaded process group (the one PyTorch's own distributed
tests use: torch.testing._internal.distributed.multi_threaded_pg, installed as
common_distributed.spawn_threads_and_init_comms installs it); run_threads below runs
fn(rank, world_size, *args) on W threads and re-raises the first failure. The checks:

  (a) DistCosineSoftmax (1001 classes: shards of 15 and 16 rows; one instance x two views per
      rank): loss, the features' gradient (W x dL/dx) and the rows' gradient equal a float64
      single-process reference to 1e-10 relative, alpha 0 and 0.2 (hard classes on other shards),
      chunked and not; and the sampled softmax (sample=(M, seed)): the classes drawn on 64 ranks
      are the one-process draw, and loss and gradients equal the reference restricted to them;
  (b) mine_hard_classes equals a brute-force float64 top-k, ids and similarities bit for bit
      (integer rows of norm 4096: every cosine is exact in float32; no ties in any row's top-k+1);
  (c) send_rows_to_owners from an uneven, shuffled split (some ranks hold no row) gives every rank
      exactly its shard;
  (d) gather_classifier (rows + SGD momentum after one step) written at W = 64, loaded at W = 1
      and W = 3: every rank gets its rows and momentum exactly.

Where the threaded group is missing (no torch.testing._internal, or it cannot start) the tests
skip. Where it serves but not some collective a check needs (probed once, at W = 4), that check
falls back to 8 gloo processes (helpers.run_distributed) with the same code (slower: process
start-up dominates, about a minute per check on 2 busy cores). On torch 2.14 every
collective these checks use (all_gather_single / all_gather_into_tensor, reduce_scatter_single /
reduce_scatter_tensor, all_reduce SUM and MIN, broadcast, all_to_all_single with uneven splits,
all_gather_object, barrier) serves at W = 64, and no check falls back.
"""
import functools
import sys
import threading

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from helpers import run_distributed, stage
from test_dist_softmax import reference_loss, save_and_read_back

import dist_softmax
from dist_softmax import DistCosineSoftmax, shard_range

hard_classes = stage("03_hard_classes")

WORLD, FALLBACK_WORLD = 64, 8
N, DIM, TAU, K = 1001, 8, 0.15, 5  # 1001 = 64 x 15 + 41: ranks 0-40 own 16 rows, 41-63 own 15 (W = 8: 126, 125)
THREAD_TIMEOUT = 300  # seconds for one threaded run before it is reported as hung


# ---------------------------------------------------------------- W ranks on threads

@functools.lru_cache(maxsize=None)
def threaded_group():
    """(None, served collectives) where the threaded group runs, else (why not, empty set)."""
    try:
        from torch.testing._internal.distributed import multi_threaded_pg  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import problem means: not available here
        return f"torch.testing._internal.distributed.multi_threaded_pg cannot be imported ({e!r})", frozenset()
    served = set()
    for name in PROBES:
        try:
            run_threads(_probe, 4, name)
            served.add(name)
        except Exception:  # noqa: BLE001 - a collective the threaded group does not serve
            pass
    if not served:
        return "the threaded process group serves none of the collectives these checks use", frozenset()
    return None, frozenset(served)


def run_threads(fn, world_size, *args):
    """fn(rank, world_size, *args) on world_size threads, each its own rank of a threaded process
    group; the first failure (an assertion on any rank) is re-raised here, naming its rank."""
    from torch.testing._internal.distributed.multi_threaded_pg import (
        ProcessLocalGroup, _install_threaded_pg, _uninstall_threaded_pg)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    isolation = getattr(torch._C._distributed_c10d, "_set_thread_isolation_mode", None)
    ProcessLocalGroup.reset()
    world = _install_threaded_pg()
    store = dist.HashStore()
    failures = []  # (rank, exception) in the order they happened

    def worker(rank):
        torch.set_num_threads(1)
        try:
            dist.init_process_group(backend="threaded", rank=rank, world_size=world_size, store=store)
            fn(rank, world_size, *args)
        except BaseException as e:  # noqa: BLE001 - reported below; the others are woken up
            failures.append((rank, e))
            ProcessLocalGroup.exception_handle(e)  # ranks waiting in a collective leave (SystemExit)
        finally:
            if dist.distributed_c10d._world is world and dist.is_initialized():
                dist.destroy_process_group()

    if isolation is not None:
        isolation(True)
    try:
        threads = [threading.Thread(target=worker, args=(rank,), daemon=True) for rank in range(world_size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(THREAD_TIMEOUT)
        hung = [rank for rank, t in enumerate(threads) if t.is_alive()]
    finally:
        if isolation is not None:
            isolation(False)
        _uninstall_threaded_pg()
        ProcessLocalGroup.reset()
        torch.set_num_threads(threads_before)
    first = next((f for f in failures if not isinstance(f[1], SystemExit)), failures[0] if failures else None)
    if first is not None:
        rank, error = first
        if hasattr(error, "add_note"):
            error.add_note(f"(on rank {rank} of {world_size} threads)")
        raise error
    if hung:
        raise TimeoutError(f"ranks {hung} of {world_size} threads still running after {THREAD_TIMEOUT} s")


def runner(needs):
    """(run, W): run(fn, world_size, *args) on threaded ranks and W = 64 where the threaded group
    serves every collective in `needs`; on gloo processes (helpers.run_distributed) and W = 8 where
    it serves some but not these. Skips where there is no threaded group."""
    why_not, served = threaded_group()
    if why_not:
        pytest.skip(f"no threaded process group: {why_not}")
    if set(needs) <= served:
        return run_threads, WORLD
    print(f"note: the threaded group does not serve {sorted(set(needs) - served)}; "
          f"{FALLBACK_WORLD} gloo processes instead", file=sys.stderr)
    return run_distributed, FALLBACK_WORLD


def _probe(rank, world_size, name):
    """One collective as the product calls it, checked for the right answer."""
    w = world_size
    if name == "all_gather":
        out = torch.empty(w * 2, 3, dtype=torch.float64)
        dist_softmax._all_gather(out, torch.full((2, 3), float(rank), dtype=torch.float64))
        assert torch.equal(out[:, 0], torch.arange(w).repeat_interleave(2).double())
    elif name == "reduce_scatter":
        out = torch.empty(2, 3, dtype=torch.long)
        dist_softmax._reduce_scatter(out, torch.arange(w * 6).view(w * 2, 3))
        assert torch.equal(out, w * torch.arange(w * 6).view(w * 2, 3)[2 * rank:2 * rank + 2])
    elif name == "all_reduce":
        t = torch.tensor([float(rank)], dtype=torch.float64)
        m = torch.tensor([rank + 1])
        dist.all_reduce(t)
        dist.all_reduce(m, op=dist.ReduceOp.MIN)
        assert t.item() == w * (w - 1) / 2 and m.item() == 1
    elif name == "broadcast":
        t = torch.full((3,), rank)
        dist.broadcast(t[:2], src=w - 1)
        assert t.tolist() == [w - 1, w - 1, rank]
    elif name == "all_to_all_single":
        send = [(rank + d) % 3 for d in range(w)]
        recv = [(s + rank) % 3 for s in range(w)]
        out = torch.empty(sum(recv), dtype=torch.long)
        dist.all_to_all_single(out, torch.cat([torch.full((n,), rank * 1000 + d) for d, n in enumerate(send)]),
                               recv, send)
        assert torch.equal(out, torch.cat([torch.full((n,), s * 1000 + rank) for s, n in enumerate(recv)]))
    elif name == "all_gather_object":
        parts = [None] * w
        dist.all_gather_object(parts, rank)
        assert parts == list(range(w))
    elif name == "barrier":
        dist.barrier()


PROBES = ("all_gather", "reduce_scatter", "all_reduce", "broadcast", "all_to_all_single", "all_gather_object",
          "barrier")


def close(actual, expected, where, rtol=1e-10):
    """Equal to `rtol` relative to the larger entries of `expected` (entries near 0 get that
    absolute tolerance)."""
    expected = expected.double()
    atol = rtol * max(float(expected.abs().max()), 1e-300)
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol, msg=lambda m: f"{where}\n{m}")


# ---------------------------------------------------------------- (a) the softmax against float64

def softmax_problem(world_size, local_batch=2, seed=0):
    """One instance x two views per rank (labels: the instance id twice), float64 features and rows,
    K distinct hard classes per view, never the label; many of them live on other ranks' shards."""
    g = torch.Generator().manual_seed(seed)
    instances = torch.randperm(N, generator=g)[:world_size * local_batch // 2]
    labels = instances.repeat_interleave(2)
    features = torch.randn(len(labels), DIM, generator=g, dtype=torch.float64)
    weight = torch.randn(N, DIM, generator=g, dtype=torch.float64) * 3
    hard = torch.stack([torch.randperm(N, generator=g)[:K + 1] for _ in labels])
    hard = torch.stack([row[row != label][:K] for row, label in zip(hard, labels)])
    return features, labels, hard, weight


def reference(features, weight, labels, hard, alpha, classes=None):
    """(loss, dL/dfeatures, dL/dweight) of the float64 reference (test_dist_softmax.reference_loss)."""
    f, w = features.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = reference_loss(f, w, labels, hard, alpha, tau=TAU, classes=classes)
    loss.backward()
    return loss.detach(), f.grad, w.grad


SOFTMAX_CASES = [(alpha, chunk) for alpha in (0.0, 0.2) for chunk in (None, 7)]
# M: alpha 0 has 64 target classes, alpha 0.2 about 500 (labels and hard classes): M leaves room for draws.
SAMPLED_CASES = [(alpha, chunk, (650 if alpha else 150, 11 + i)) for i, (alpha, chunk) in enumerate(SOFTMAX_CASES)]


def softmax_expectations(world_size):
    """The problem, the reference of every dense case, and for every sampled case the one-process
    draw with the reference restricted to it (computed here once, read by every rank)."""
    features, labels, hard, weight = softmax_problem(world_size)
    dense = {(alpha, chunk): reference(features, weight, labels, hard, alpha) for alpha, chunk in SOFTMAX_CASES}
    one_process = DistCosineSoftmax(N, DIM, TAU)  # no process group here: start 0, end N
    assert (one_process.start, one_process.end, one_process.world_size) == (0, N, 1)
    sampled = {}
    for alpha, chunk, sample in SAMPLED_CASES:
        ids = torch.cat([labels[:, None], hard if alpha else hard[:, :0]], 1)
        classes = one_process.sampled_rows(ids, *sample)
        assert torch.isin(ids, classes).all() and len(ids.unique()) + 20 < len(classes) < N - 200
        sampled[alpha, chunk, sample] = (classes, reference(features, weight, labels, hard, alpha, classes))
    return (features, labels, hard, weight), dense, sampled


def check_softmax(rank, world_size, problem, dense, sampled):
    features, labels, hard, weight = problem
    b = len(labels) // world_size
    mine = slice(rank * b, (rank + 1) * b)
    start, end = shard_range(N, rank, world_size)
    # The hard classes of this rank's views reach other shards than its own and its labels' owners'.
    owners = dist_softmax.owner_of(hard[mine], N, world_size)
    assert ((owners != rank) & (owners != dist_softmax.owner_of(labels[mine], N, world_size)[:, None])).any()
    for alpha, chunk in SOFTMAX_CASES:
        where = f"rank {rank}/{world_size}, alpha {alpha}, chunk {chunk}"
        classifier = DistCosineSoftmax(N, DIM, TAU, chunk_size=chunk).double()
        assert (classifier.start, classifier.end) == (start, end)
        with torch.no_grad():
            classifier.weight.copy_(weight[start:end])
        x = features[mine].clone().requires_grad_()
        loss = classifier(x, labels[mine], hard[mine], alpha=alpha)
        loss.backward()
        ref_loss, ref_x_grad, ref_w_grad = dense[alpha, chunk]
        close(loss, ref_loss, where + ": loss")
        close(x.grad, world_size * ref_x_grad[mine], where + ": W x dL/dx")
        close(classifier.weight.grad, ref_w_grad[start:end], where + ": dL/dw")
    for alpha, chunk, sample in SAMPLED_CASES:
        where = f"rank {rank}/{world_size}, sampled {sample}, alpha {alpha}, chunk {chunk}"
        classes, (ref_loss, ref_x_grad, ref_w_grad) = sampled[alpha, chunk, sample]
        classifier = DistCosineSoftmax(N, DIM, TAU, chunk_size=chunk).double()
        with torch.no_grad():
            classifier.weight.copy_(weight[start:end])
        ids = torch.cat([labels[mine, None], hard[mine] if alpha else hard[mine, :0]], 1)
        drawn = classifier.sampled_rows(dist_softmax.all_gather_rows(ids), *sample) + start
        parts = [None] * world_size
        dist.all_gather_object(parts, drawn)
        assert torch.equal(torch.cat(parts), classes), where + ": the draw depends on the process count"
        x = features[mine].clone().requires_grad_()
        loss = classifier(x, labels[mine], hard[mine], alpha, sample)
        loss.backward()
        close(loss, ref_loss, where + ": loss")
        close(x.grad, world_size * ref_x_grad[mine], where + ": W x dL/dx")
        grad = classifier.weight.grad
        assert grad.is_sparse
        close(grad.to_dense(), ref_w_grad[start:end], where + ": dL/dw")
        undrawn = ~torch.isin(torch.arange(start, end), classes)
        assert (grad.to_dense()[undrawn] == 0).all(), where + ": a row not drawn has a gradient"


def test_softmax_matches_float64_reference_at_64_ranks():
    run, world_size = runner(["all_gather", "all_reduce", "reduce_scatter", "all_gather_object"])
    problem, dense, sampled = softmax_expectations(world_size)
    assert len({e - s for s, e in (shard_range(N, r, world_size) for r in range(world_size))}) == 2  # uneven
    run(check_softmax, world_size, problem, dense, sampled)


# ---------------------------------------------------------------- (b) hard classes against brute force

def integer_unit_rows(n, dim, seed, norm=4096):
    """n integer rows of Euclidean norm exactly `norm` (a power of two): normalising divides by it
    exactly, and every cosine is (integer <= 2^24) / 2^24, exact in float32 in any summation order."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    while sum(len(r) for r in rows) < n:
        x = torch.randn(1 << 18, dim, generator=g, dtype=torch.float64)
        head = (x[:, 1:] / x.norm(dim=1, keepdim=True) * norm).round()
        rest = norm * norm - head.pow(2).sum(1)
        last = rest.clamp_min(0).sqrt().round()
        keep = (rest >= 0) & (last * last == rest)
        sign = torch.where(x[keep, :1] < 0, -1.0, 1.0)
        rows.append(torch.cat([sign * last[keep, None], head[keep]], 1))
    return torch.cat(rows)[:n]


def hard_class_expectations(k=K, seed=3):
    rows = integer_unit_rows(N, DIM, seed)
    unit = rows / 4096
    similarity = unit @ unit.t()
    similarity.fill_diagonal_(float("-inf"))
    values, ids = similarity.topk(k + 1, dim=1)
    assert (values[:, 1:] < values[:, :-1]).all(), "a tie in some row's top k+1: pick another seed"
    return rows, ids[:, :k], values[:, :k]


def check_hard_classes(rank, world_size, rows, ids, values, k):
    classifier = DistCosineSoftmax(N, DIM, TAU)
    start, end = classifier.start, classifier.end
    with torch.no_grad():
        classifier.weight.copy_(rows[start:end])
    got_ids, got_values = hard_classes.mine_hard_classes(classifier, k)
    assert got_ids.shape == (end - start, k) and got_values.dtype == torch.float32
    assert torch.equal(got_ids, ids[start:end]), f"rank {rank}: hard class ids differ"
    assert torch.equal(got_values.double(), values[start:end]), f"rank {rank}: similarities differ"


def test_mined_hard_classes_equal_brute_force_at_64_ranks():
    run, world_size = runner(["broadcast"])
    rows, ids, values = hard_class_expectations()
    assert torch.equal(F.normalize(rows.float(), dim=1) * 4096, rows.float()), "normalising is not exact"
    owners = dist_softmax.owner_of(ids, N, world_size)
    assert (owners != dist_softmax.owner_of(torch.arange(N), N, world_size)[:, None]).float().mean() > 0.9
    run(check_hard_classes, world_size, rows, ids, values, K)


# ---------------------------------------------------------------- (c) rows sent to their owners

def check_send_rows(rank, world_size, table, order, cuts):
    mine = order[cuts[rank]:cuts[rank + 1]]
    shard = dist_softmax.send_rows_to_owners(mine, table[mine], N)
    start, end = shard_range(N, rank, world_size)
    assert torch.equal(shard, table[start:end]), f"rank {rank} holds {len(mine)} rows; its shard differs"


def test_rows_sent_to_owners_at_64_ranks():
    run, world_size = runner(["all_to_all_single"])
    g = torch.Generator().manual_seed(5)
    table = torch.randn(N, DIM, generator=g, dtype=torch.float64)
    order = torch.randperm(N, generator=g)
    inner = sorted(torch.randint(0, N + 1, (world_size - 2,), generator=g).tolist())
    cuts = [0, 0] + inner + [N]  # rank 0 holds no row; the others anything from 0 to hundreds
    sizes = [b - a for a, b in zip(cuts, cuts[1:])]
    assert len(sizes) == world_size and sizes[0] == 0 and max(sizes) > N // world_size
    run(check_send_rows, world_size, table, order, cuts)


# ---------------------------------------------------------------- (d) row checkpoints across world sizes

def save_after_one_step(rank, world_size, path):
    features, labels, hard, weight = softmax_problem(world_size, seed=9)
    b = len(labels) // world_size
    mine = slice(rank * b, (rank + 1) * b)
    classifier = DistCosineSoftmax(N, DIM, TAU)
    with torch.no_grad():
        classifier.weight.copy_(weight[classifier.start:classifier.end])
    optimizer = torch.optim.SGD(classifier.parameters(), lr=0.5, momentum=0.9)
    classifier(features[mine].float(), labels[mine], hard[mine], 0.2).backward()
    optimizer.step()
    momentum = optimizer.state[classifier.weight]["momentum_buffer"]
    assert momentum.abs().sum() > 0
    saved = save_and_read_back(classifier, optimizer, path)
    assert saved["num_classes"] == N and saved["weight"].shape == saved["momentum"].shape == (N, DIM)
    assert torch.equal(saved["weight"][classifier.start:classifier.end], classifier.weight.detach()), f"rank {rank}"
    assert torch.equal(saved["momentum"][classifier.start:classifier.end], momentum), f"rank {rank}"


def load_and_compare(rank, world_size, path):
    saved = torch.load(path, weights_only=True)
    classifier = DistCosineSoftmax(N, DIM, TAU)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=0.5, momentum=0.9)
    dist_softmax.load_classifier(classifier, saved, optimizer)
    rows = slice(*shard_range(N, rank, world_size))
    assert torch.equal(classifier.weight.detach(), saved["weight"][rows]), f"rank {rank}/{world_size}: rows"
    assert torch.equal(optimizer.state[classifier.weight]["momentum_buffer"], saved["momentum"][rows]), \
        f"rank {rank}/{world_size}: momentum"
    again = dist_softmax.gather_classifier(classifier, optimizer)  # and back into one file, the same
    if rank == 0:
        assert torch.equal(again["weight"], saved["weight"]) and torch.equal(again["momentum"], saved["momentum"])


def test_rows_saved_on_64_ranks_load_on_1_and_3(tmp_path):
    run, world_size = runner(["all_gather", "all_reduce", "reduce_scatter", "broadcast", "barrier"])
    path = str(tmp_path / "classifier.pt")
    run(save_after_one_step, world_size, path)
    load_and_compare(0, 1, path)  # W = 1: this process, no process group
    run(load_and_compare, 3, path)
