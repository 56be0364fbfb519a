"""03_hard_classes.py: hard-class mining (Eq. 2-3) equals a float64 brute force at any process count."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import demo_data
from helpers import ROOT, run_distributed, stage

import dist_softmax

hard = stage("03_hard_classes")
extract = stage("01_extract_init")
torch.set_num_threads(1)


def weights(n, dim, seed=0):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def reference_similarity(w, k):
    """float64 brute force: the k largest cosines of each row with the other rows, decreasing."""
    wn = F.normalize(w.double(), dim=1)
    s = wn @ wn.t()
    s.fill_diagonal_(float("-inf"))
    return s.topk(k, dim=1).values


def similarity_of(w, rows, table):
    """float64 cosine of each row with the ids the table gives it."""
    wn = F.normalize(w.double(), dim=1)
    return (wn[rows, None, :] * wn[table]).sum(-1)


def classifier_with(w):
    classifier = dist_softmax.DistCosineSoftmax(*w.shape)
    dist_softmax.load_classifier(classifier, {"weight": w, "momentum": None, "num_classes": w.shape[0]})
    return classifier


def check_table(w, table, start, end, k):
    """Same similarities as the brute force (ties may pick other ids), never self, no repeats."""
    rows = torch.arange(start, end)
    assert table.shape == (end - start, k) and table.dtype == torch.long
    assert not (table == rows[:, None]).any()
    assert all(len(set(r)) == k for r in table.tolist())
    torch.testing.assert_close(similarity_of(w, rows, table), reference_similarity(w, k)[start:end],
                               atol=1e-5, rtol=0)


# ---------------------------------------------------------------- mining

def test_single_process_equals_float64_brute_force_top_k():
    w = weights(23, 8)
    check_table(w, hard.mine_hard_classes(classifier_with(w), 5)[0], 0, 23, 5)


def test_filtered_multi_block_stream_equals_brute_force():
    # 1500 rows in 128 x 128 blocks: the dense start, the strided group filter and the merges all run.
    w = weights(1500, 16, seed=1)
    check_table(w, hard.mine_hard_classes(classifier_with(w), 20, chunk_size=128)[0], 0, 1500, 20)


def test_many_exact_ties_still_give_the_brute_force_similarities():
    w = weights(12, 8, seed=2)[torch.arange(600) % 12]  # 50 identical copies of each of 12 rows
    w = w * torch.rand(600, 1, generator=torch.Generator().manual_seed(3)).add(0.5)  # rescaled copies
    check_table(w, hard.mine_hard_classes(classifier_with(w), 60, chunk_size=128)[0], 0, 600, 60)


def test_chunked_equals_unchunked():
    w = weights(700, 16, seed=4)
    classifier = classifier_with(w)
    whole = hard.mine_hard_classes(classifier, 30)[0]  # one 700 x 700 block
    chunked = hard.mine_hard_classes(classifier, 30, chunk_size=64)[0]
    rows = torch.arange(700)
    torch.testing.assert_close(similarity_of(w, rows, chunked), similarity_of(w, rows, whole), atol=1e-6, rtol=0)


def test_two_cpu_threads_split_the_rows_and_agree_with_brute_force():
    w = weights(900, 16, seed=5)
    torch.set_num_threads(2)
    try:
        table = hard.mine_hard_classes(classifier_with(w), 10, chunk_size=128)[0]
    finally:
        torch.set_num_threads(1)
    check_table(w, table, 0, 900, 10)


def test_k_must_leave_the_class_itself_out():
    with pytest.raises(ValueError, match="k = 23"):
        hard.mine_hard_classes(classifier_with(weights(23, 4)), 23)


def _mine_worker(rank, world, w, k, chunk, twins):
    classifier = classifier_with(w)
    table, similarity = hard.mine_hard_classes(classifier, k, chunk_size=chunk)
    check_table(w, table, classifier.start, classifier.end, k)
    torch.testing.assert_close(similarity.double(), reference_similarity(w, k)[classifier.start:classifier.end],
                               atol=1e-5, rtol=0)
    for a, b in twins:  # a scaled copy is the top neighbour of its original, and back
        for i, j in ((a, b), (b, a)):
            if classifier.start <= i < classifier.end:
                assert table[i - classifier.start, 0].item() == j


def _uneven_worker(rank, world):
    w = weights(23, 8, seed=6)
    w[17] = 3.7 * w[2]  # the twin lives on another shard than its original at both world sizes
    _mine_worker(rank, world, w, 6, None, [(2, 17)])
    _mine_worker(rank, world, weights(400, 8, seed=7), 12, 64, [])  # many 64 x 64 blocks per shard


@pytest.mark.parametrize("world", [2, 3])
def test_uneven_shards_equal_brute_force_and_scaled_twin_is_top_neighbour(world):
    run_distributed(_uneven_worker, world)


# ---------------------------------------------------------------- per-step lookup

def full_table(n, k):
    return torch.arange(n)[:, None] * 1000 + torch.arange(k)  # row i is recognisable: i*1000 + j


def test_single_process_lookup_indexes_the_table():
    table = full_table(23, 4)
    labels = torch.tensor([22, 0, 7, 7])
    classifier = dist_softmax.DistCosineSoftmax(23, 4)
    assert torch.equal(hard.lookup_hard_classes(table, labels, classifier), table[labels])


def _lookup_worker(rank, world, labels_per_rank):
    n, k = 23, 4
    classifier = dist_softmax.DistCosineSoftmax(n, 4)
    table = full_table(n, k)[classifier.start:classifier.end]  # only the owned rows
    labels = labels_per_rank[rank]
    assert torch.equal(hard.lookup_hard_classes(table, labels, classifier), full_table(n, k)[labels])


def test_lookup_fetches_rows_from_their_owners_across_all_shards():
    # shards of 23 over 3: [0, 8), [8, 16), [16, 23); every rank asks for rows of every shard
    labels = [torch.tensor([0, 9, 22, 16, 15]), torch.tensor([7, 8, 7, 21, 3]), torch.tensor([17, 1, 12, 5, 8])]
    run_distributed(_lookup_worker, 3, labels)


# ---------------------------------------------------------------- script mode

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data"))
    demo_data.make_demo_dataset(root, num_classes=3, train_per_class=8, val_per_class=1, image_size=16)
    out = str(tmp_path_factory.mktemp("run"))
    w = weights(24, 8, seed=8)
    extract.atomic_save({"classifier": {"weight": w, "momentum": None, "num_classes": 24},
                              "args": {"data": root}}, os.path.join(out, "init.pt"))
    return out, root, w


def run_script(*args, torchrun=False):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
                if torchrun else [sys.executable])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(launcher + [os.path.join(ROOT, "03_hard_classes.py"), *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)


def test_script_writes_table_report_and_image_grid(run_dir):
    out, _, w = run_dir  # --data is read from init.pt's recorded args
    done = run_script("--out", out, "--hard-k", "5", "--image-size", "16", "--grid-rows", "2", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    saved = torch.load(os.path.join(out, "hard_classes.pt"), weights_only=True)
    check_table(w, saved["hard_classes"], 0, 24, 5)
    torch.testing.assert_close(saved["similarity"].double(), reference_similarity(w, 5), atol=1e-5, rtol=0)
    with open(os.path.join(out, "hard_classes.json")) as f:
        report = json.load(f)
    assert report["k"] == 5 and report["num_classes"] == 24
    assert report["similarity_1st"]["mean"] >= report["similarity_kth"]["mean"]
    assert report["same_class"]["classes"] == 3
    assert report["same_class"]["chance"] == pytest.approx(3 * 8 * 7 / (24 * 23), abs=1e-4)
    with Image.open(os.path.join(out, "hard_classes.png")) as grid:  # 2 rows x (anchor + k = 5 negatives)
        assert grid.size == (2 + 6 * (16 + 2), 2 + 2 * (16 + 2))


def test_script_under_torchrun_writes_the_single_process_table(run_dir, tmp_path):
    out, root, w = run_dir
    out2 = str(tmp_path)
    extract.atomic_save({"classifier": {"weight": w, "momentum": None, "num_classes": 24}},
                             os.path.join(out2, "init.pt"))
    done = run_script("--out", out2, "--data", root, "--hard-k", "5", "--image-size", "16", "--grid-rows", "1",
                      "--device", "cpu", torchrun=True)
    assert done.returncode == 0, done.stderr
    saved = torch.load(os.path.join(out2, "hard_classes.pt"), weights_only=True)
    check_table(w, saved["hard_classes"], 0, 24, 5)


def test_the_grid_takes_the_run_image_size_when_none_is_given(run_dir, tmp_path):
    _, root, w = run_dir
    out = str(tmp_path)
    extract.atomic_save({"classifier": {"weight": w, "momentum": None, "num_classes": 24},
                         "args": {"data": root, "image_size": 12}}, os.path.join(out, "init.pt"))
    hard.main(["--out", out, "--hard-k", "2", "--grid-rows", "1", "--device", "cpu"])
    with Image.open(os.path.join(out, "hard_classes.png")) as grid:  # 1 row x (anchor + 2 negatives) of 12 px
        assert grid.size == (2 + 3 * (12 + 2), 2 + 1 * (12 + 2))


def test_script_rejects_k_not_below_the_class_count_with_one_line(run_dir):
    out, _, _ = run_dir
    done = run_script("--out", out, "--hard-k", "24", "--device", "cpu")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["error: --hard-k 24 needs 1 <= k < 24, the number of classes"]
