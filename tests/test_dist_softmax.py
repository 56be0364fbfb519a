"""dist_softmax.py against a plain float64 single-process reference, on 1-3 gloo processes."""
import itertools
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from helpers import run_distributed

import dist_softmax
from dist_softmax import DistCosineSoftmax, shard_range

NUM_CLASSES, DIM, LOCAL_BATCH, TAU, K = 23, 8, 4, 0.15, 5


def reference_loss(features, weight, labels, hard_classes, alpha, tau=TAU, classes=None):
    """Eq. 3 written out with a dense target matrix y (Eq. 2), in float64; with `classes` (Table 3's
    sampled softmax) the sum over classes runs over those only."""
    logits = F.normalize(features, dim=1) @ F.normalize(weight, dim=1).t() / tau
    if classes is not None:
        logits = logits.masked_fill(~torch.isin(torch.arange(len(weight)), classes), float("-inf"))
    y = torch.zeros_like(logits)
    rows = torch.arange(len(labels))
    if hard_classes is not None and alpha > 0:
        y[rows[:, None], hard_classes] = alpha / hard_classes.shape[1]
        y[rows, labels] = 1 - alpha
    else:
        y[rows, labels] = 1.0
    return -torch.where(y > 0, y * logits.log_softmax(1), 0).sum(1).mean()  # 0 log 0 = 0 off the sample


def make_problem(world_size, seed=0):
    """A global batch of two views per instance (every label twice), hard classes on any shard."""
    g = torch.Generator().manual_seed(seed)
    global_batch = world_size * LOCAL_BATCH
    inputs = torch.randn(global_batch, 6, generator=g, dtype=torch.float64)
    instances = torch.randperm(NUM_CLASSES, generator=g)[: global_batch // 2]
    labels = torch.cat([instances, instances])  # the two views of each instance
    hard = torch.stack([torch.randperm(NUM_CLASSES, generator=g)[:K + 1] for _ in labels])
    hard = torch.stack([row[row != label][:K] for row, label in zip(hard, labels)])
    weight = torch.randn(NUM_CLASSES, DIM, generator=g, dtype=torch.float64) * 3
    backbone = torch.randn(DIM, 6, generator=g, dtype=torch.float64)
    return inputs, labels, hard, weight, backbone


def reference_gradients(inputs, labels, hard, weight, backbone, alpha, classes=None):
    weight = weight.clone().requires_grad_()
    backbone = backbone.clone().requires_grad_()
    features = inputs @ backbone.t()
    features.retain_grad()
    loss = reference_loss(features, weight, labels, hard, alpha, classes=classes)
    loss.backward()
    return loss.detach(), features.grad, weight.grad, backbone.grad


CASES = [(alpha, chunk) for alpha in (0.0, 0.2) for chunk in (None, 3)]


def check_against_reference(rank, world_size):
    """Loss, feature, classifier-row and DDP-backbone gradients equal the float64 reference: computed
    in fp32 (what training uses) to fp32 accuracy, and in float64 (float64 inputs) to 1e-10."""
    inputs, labels, hard, weight, backbone_weight = make_problem(world_size)
    mine = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    for (alpha, chunk), (dtype, rtol, atol) in itertools.product(
            CASES, [(torch.float32, 1e-4, 1e-6), (torch.float64, 1e-10, 1e-12)]):
        ref_loss, ref_feat_grad, ref_w_grad, ref_backbone_grad = reference_gradients(
            inputs, labels, hard, weight, backbone_weight, alpha)
        classifier = DistCosineSoftmax(NUM_CLASSES, DIM, TAU, chunk_size=chunk).to(dtype)
        assert (classifier.start, classifier.end) == shard_range(NUM_CLASSES, rank, world_size)
        with torch.no_grad():
            classifier.weight.copy_(weight[classifier.start:classifier.end])
        backbone = nn.Linear(6, DIM, bias=False).to(dtype)
        with torch.no_grad():
            backbone.weight.copy_(backbone_weight)
        if world_size > 1:
            backbone = DistributedDataParallel(backbone)
        features = backbone(inputs[mine].to(dtype))
        features.retain_grad()
        loss = classifier(features, labels[mine], hard[mine], alpha=alpha)
        loss.backward()
        assert loss.dtype == dtype
        where = f"rank {rank}/{world_size}, alpha {alpha}, chunk {chunk}, {dtype}"
        close = dict(rtol=rtol, atol=atol, msg=lambda m: where + "\n" + m)
        torch.testing.assert_close(loss.double(), ref_loss, **close)
        # Gradient contract: exact backbone gradients after DDP's average ...
        torch.testing.assert_close((backbone.weight.grad if world_size == 1 else backbone.module.weight.grad).double(),
                                   ref_backbone_grad, **close)
        # ... because the features receive W x dL/dx, and each local row exactly dL/dw.
        torch.testing.assert_close(features.grad.double(), world_size * ref_feat_grad[mine], **close)
        torch.testing.assert_close(classifier.weight.grad.double(), ref_w_grad[classifier.start:classifier.end], **close)


def test_shard_range_is_contiguous_and_balanced():
    for n in (1, 7, 23, 1_281_167):
        for world_size in (1, 2, 3, 8, 64):
            if n < world_size:
                continue
            ranges = [shard_range(n, r, world_size) for r in range(world_size)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            sizes = [e - s for s, e in ranges]
            assert max(sizes) - min(sizes) <= 1


def test_owner_of_inverts_shard_range():
    for n, world_size in ((7, 3), (23, 4), (64, 64), (1_281_167, 64), (10, 1)):
        owners = dist_softmax.owner_of(torch.arange(n), n, world_size)
        expected = torch.cat([torch.full((e - s,), r) for r in range(world_size)
                              for s, e in [shard_range(n, r, world_size)]])
        assert torch.equal(owners, expected)


def send_rows_and_compare(rank, world_size):
    """Every rank holds an uneven, shuffled share of a 23-row table; each gets back its own shard."""
    table = torch.randn(NUM_CLASSES, DIM, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    order = torch.randperm(NUM_CLASSES, generator=torch.Generator().manual_seed(2))
    cuts = [0, 3, 12, NUM_CLASSES][:world_size] + [NUM_CLASSES]  # rank 0 holds 3 rows, rank 1 nine, ...
    mine = order[cuts[rank]:cuts[rank + 1]]
    shard = dist_softmax.send_rows_to_owners(mine, table[mine], NUM_CLASSES)
    start, end = shard_range(NUM_CLASSES, rank, world_size)
    assert torch.equal(shard, table[start:end])


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_rows_sent_to_owners_form_each_ranks_shard(world_size):
    if world_size == 1:
        send_rows_and_compare(0, 1)
    else:
        run_distributed(send_rows_and_compare, world_size)


def test_matches_reference_without_process_group():
    assert not dist.is_initialized()
    check_against_reference(rank=0, world_size=1)


@pytest.mark.parametrize("world_size", [2, 3])
def test_matches_reference_on_uneven_shards(world_size):
    assert NUM_CLASSES % world_size != 0
    run_distributed(check_against_reference, world_size)


def test_smoothing_changes_the_loss():
    # Hard classes on other shards are covered by the multi-process tests above.
    inputs, labels, hard, weight, backbone = make_problem(1)
    features = (inputs @ backbone.t()).float()
    classifier = DistCosineSoftmax(NUM_CLASSES, DIM, TAU)
    with torch.no_grad():
        classifier.weight.copy_(weight)
    plain = classifier(features, labels)
    smoothed = classifier(features, labels, hard, alpha=0.2)
    assert abs(plain.item() - smoothed.item()) > 1e-3


def test_chunked_equals_unchunked_for_every_chunk_size():
    torch.manual_seed(0)
    features = torch.randn(10, DIM, requires_grad=True)
    labels = torch.randint(0, NUM_CLASSES, (10,))
    results = []
    for chunk in (None, 1, 5, NUM_CLASSES, 100):
        classifier = DistCosineSoftmax(NUM_CLASSES, DIM, TAU, chunk_size=chunk)
        with torch.no_grad():
            classifier.weight.copy_(torch.arange(NUM_CLASSES * DIM).view(NUM_CLASSES, DIM).float().sin())
        features.grad = None
        loss = classifier(features, labels)
        loss.backward()
        results.append((loss.detach(), features.grad.clone(), classifier.weight.grad.clone()))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_softmax_stays_fp32_under_bf16_autocast():
    inputs, labels, hard, weight, backbone = make_problem(1)
    features = (inputs @ backbone.t()).float()
    ref = reference_loss(features.double(), weight, labels, hard, 0.2)
    classifier = DistCosineSoftmax(NUM_CLASSES, DIM, TAU)
    with torch.no_grad():
        classifier.weight.copy_(weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = classifier(features, labels, hard, alpha=0.2)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("alpha", [0.0, 0.2])
def test_cuda_matches_reference_in_fp32_and_bf16(alpha):
    """The same module on one GPU, fp32 and under bf16 autocast, against the float64 CPU reference
    at ImageNet-like shapes (D 128, chunked and not); hard classes are distinct, as mined ones are."""
    g = torch.Generator().manual_seed(0)
    num_classes, dim, batch, k = 5003, 128, 256, 10
    features = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    weight = torch.randn(num_classes, dim, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, num_classes, (batch,), generator=g)
    hard = torch.stack([torch.randperm(num_classes, generator=g)[:k + 1] for _ in labels])
    hard = torch.stack([row[row != label][:k] for row, label in zip(hard, labels)])
    ref_features, ref_weight = features.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = reference_loss(ref_features, ref_weight, labels, hard, alpha)
    ref.backward()
    for chunk_size in (None, 1000):
        for bf16, tolerance in ((False, 1e-4), (True, 3e-2)):
            classifier = DistCosineSoftmax(num_classes, dim, TAU, chunk_size).cuda()
            with torch.no_grad():
                classifier.weight.copy_(weight)
            x = features.float().cuda().requires_grad_()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                loss = classifier(x, labels.cuda(), hard.cuda(), alpha)
            loss.backward()
            assert abs(loss.item() - ref.item()) < tolerance
            for ours, theirs in ((x.grad, ref_features.grad), (classifier.weight.grad, ref_weight.grad)):
                assert ((ours.double().cpu() - theirs).norm() / theirs.norm()).item() < tolerance


def test_temperature_below_the_safe_bound_is_refused():
    with pytest.raises(ValueError, match="temperature"):
        DistCosineSoftmax(10, 4, temperature=0.01)


def save_and_read_back(classifier, optimizer, path):
    """gather_classifier on every rank, torch.save on rank 0 (only rank 0 gets the dict), then every rank reads it."""
    state = dist_softmax.gather_classifier(classifier, optimizer)
    if classifier.rank == 0:
        torch.save(state, path)
    else:
        assert state is None
    if classifier.world_size > 1:
        dist.barrier()
    return torch.load(path, weights_only=True)


def save_after_one_step(rank, world_size, path):
    inputs, labels, hard, weight, backbone = make_problem(world_size)
    classifier = DistCosineSoftmax(NUM_CLASSES, DIM, TAU)
    with torch.no_grad():
        classifier.weight.copy_(weight[classifier.start:classifier.end])
    optimizer = torch.optim.SGD(classifier.parameters(), lr=0.5, momentum=0.9)
    mine = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    classifier((inputs[mine] @ backbone.t()).float(), labels[mine], hard[mine], 0.2).backward()
    optimizer.step()
    saved = save_and_read_back(classifier, optimizer, path)
    # Every row of the file is this rank's row where it owns it.
    torch.testing.assert_close(saved["weight"][classifier.start:classifier.end], classifier.weight.detach())
    momentum = optimizer.state[classifier.weight]["momentum_buffer"]
    torch.testing.assert_close(saved["momentum"][classifier.start:classifier.end], momentum)


def load_and_compare(rank, world_size, path):
    saved = torch.load(path, mmap=True, weights_only=True)
    classifier = DistCosineSoftmax(NUM_CLASSES, DIM, TAU)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=0.5, momentum=0.9)
    dist_softmax.load_classifier(classifier, saved, optimizer)
    torch.testing.assert_close(classifier.weight.detach(), saved["weight"][classifier.start:classifier.end])
    torch.testing.assert_close(optimizer.state[classifier.weight]["momentum_buffer"],
                               saved["momentum"][classifier.start:classifier.end])
    # And gathering again on the new world size gives the same file contents.
    again = dist_softmax.gather_classifier(classifier, optimizer)
    if rank == 0:
        torch.testing.assert_close(again["weight"], saved["weight"])
        torch.testing.assert_close(again["momentum"], saved["momentum"])


def test_classifier_saved_on_three_processes_loads_on_two(tmp_path):
    path = str(tmp_path / "classifier.pt")
    run_distributed(save_after_one_step, 3, path)
    run_distributed(load_and_compare, 2, path)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_load_refuses_rows_of_another_class_count():
    classifier = DistCosineSoftmax(NUM_CLASSES, DIM, TAU)
    state = {"weight": torch.zeros(NUM_CLASSES + 1, DIM), "momentum": None, "num_classes": NUM_CLASSES + 1}
    with pytest.raises(ValueError, match="other data"):
        dist_softmax.load_classifier(classifier, state)


# ---------------------------------------------------------------- Table 3: the sampled softmax

SAMPLED_CLASSES, SAMPLED_BATCH, SAMPLED_K = 101, 2, 2  # 4 instances on 4 ranks: few targets, many drawn


def sampled_problem(world_size):
    g = torch.Generator().manual_seed(7)
    inputs = torch.randn(world_size * SAMPLED_BATCH, 6, generator=g, dtype=torch.float64)
    instances = torch.randperm(SAMPLED_CLASSES, generator=g)[:world_size * SAMPLED_BATCH // 2]
    labels = torch.cat([instances, instances])
    hard = torch.stack([torch.randperm(SAMPLED_CLASSES, generator=g)[:SAMPLED_K + 1] for _ in labels])
    hard = torch.stack([row[row != label][:SAMPLED_K] for row, label in zip(hard, labels)])
    weight = torch.randn(SAMPLED_CLASSES, DIM, generator=g, dtype=torch.float64) * 3
    backbone = torch.randn(DIM, 6, generator=g, dtype=torch.float64)
    return inputs, labels, hard, weight, backbone


def drawn_classes(classifier, labels, hard, alpha, sample):
    """The global ids of the classes in the step's softmax, from every rank's local draw."""
    ids = torch.cat([labels[:, None], hard if alpha else hard[:, :0]], 1)
    local = classifier.sampled_rows(dist_softmax.all_gather_rows(ids), *sample) + classifier.start
    parts = [None] * classifier.world_size
    if classifier.world_size > 1:
        dist.all_gather_object(parts, local)
    else:
        parts = [local]
    return torch.cat(parts)


def check_sampled_against_reference(rank, world_size):
    """Loss and every gradient of the sampled softmax equal the float64 reference restricted to
    the drawn classes; the drawn classes are the one-process draw and hold every target; rows not
    drawn get no gradient."""
    inputs, labels, hard, weight, backbone_weight = sampled_problem(world_size)
    mine = slice(rank * SAMPLED_BATCH, (rank + 1) * SAMPLED_BATCH)
    for alpha, chunk, m, dtype, rtol in itertools.product((0.0, 0.2), (None, 3), (12, 40),
                                                          (torch.float32, torch.float64), (None,)):
        sample = (m, 1234 + m)
        classifier = DistCosineSoftmax(SAMPLED_CLASSES, DIM, TAU, chunk_size=chunk).to(dtype)
        with torch.no_grad():
            classifier.weight.copy_(weight[classifier.start:classifier.end])
        classes = drawn_classes(classifier, labels[mine], hard[mine], alpha, sample)
        one_process = DistCosineSoftmax.sampled_rows(
            type("One", (), {"start": 0, "end": SAMPLED_CLASSES, "num_classes": SAMPLED_CLASSES,
                             "weight": classifier.weight, "local_rows": lambda self, ids: ids})(),
            torch.cat([labels[:, None], hard if alpha else hard[:, :0]], 1), *sample)
        assert torch.equal(classes, one_process), "the draw depends on the process count"
        assert torch.isin(labels, classes).all() and (not alpha or torch.isin(hard, classes).all())
        ref_loss, ref_feat_grad, ref_w_grad, ref_backbone_grad = reference_gradients(
            inputs, labels, hard, weight, backbone_weight, alpha, classes)
        backbone = nn.Linear(6, DIM, bias=False).to(dtype)
        with torch.no_grad():
            backbone.weight.copy_(backbone_weight)
        model = DistributedDataParallel(backbone) if world_size > 1 else backbone
        features = model(inputs[mine].to(dtype))
        features.retain_grad()
        loss = classifier(features, labels[mine], hard[mine], alpha, sample)
        loss.backward()
        tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-6)
        where = f"rank {rank}/{world_size}, alpha {alpha}, chunk {chunk}, M {m}, {dtype}"
        close = dict(**tol, msg=lambda msg: where + "\n" + msg)
        torch.testing.assert_close(loss.double(), ref_loss, **close)
        torch.testing.assert_close(backbone.weight.grad.double(), ref_backbone_grad, **close)
        torch.testing.assert_close(features.grad.double(), world_size * ref_feat_grad[mine], **close)
        assert classifier.weight.grad.is_sparse
        torch.testing.assert_close(classifier.weight.grad.to_dense().double(),
                                   ref_w_grad[classifier.start:classifier.end], **close)
        undrawn = ~torch.isin(torch.arange(classifier.start, classifier.end), classes)
        assert undrawn.any() and (classifier.weight.grad.to_dense()[undrawn] == 0).all()


def test_sampled_softmax_matches_reference_on_one_process():
    check_sampled_against_reference(0, 1)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_sampled_softmax_matches_reference_on_uneven_shards(world_size):
    assert SAMPLED_CLASSES % world_size != 0
    run_distributed(check_sampled_against_reference, world_size)


def test_sampled_softmax_draws_about_m_classes_uniformly():
    classifier = DistCosineSoftmax(20000, DIM, TAU)
    ids = torch.arange(0, 40).view(20, 2)
    counts, hits = [], torch.zeros(20000)
    for seed in range(40):
        rows = classifier.sampled_rows(ids, 2000, seed)
        counts.append(len(rows))
        hits[rows] += 1
    assert abs(sum(counts) / len(counts) - 2000) < 15  # the binomial's spread over 40 draws is about 5
    assert (hits[:40] == 40).all()  # the targets every time
    others = hits[40:].view(-1, 998).sum(1) / (40 * 998)  # share of draws, by blocks of 998 classes
    assert ((others - 1960 / 19960).abs() < 0.01).all()
