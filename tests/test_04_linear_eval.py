"""04_linear_eval.py: linear probe, weighted kNN and semi-supervised fine-tuning, on 1 and 2 processes."""
import argparse
import json
import os

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from helpers import demo_folder, run_distributed, stage, stage_argv

import dist_softmax

extract = stage("01_extract_init")
evaluation = stage("04_linear_eval")
torch.set_num_threads(1)

SIZE, BATCH = 16, 6  # 3 classes x 6 train / 3 val images at 16 px: 18 train, 9 val (odd: uneven shards)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return demo_folder(tmp_path_factory, 3, 6, 3, SIZE)


def argv_04(data, out, *extra):
    return stage_argv(data, out, SIZE, BATCH, "--epochs", "2", *extra)


def save_backbone(out, seed=1):
    """A 'pretrained' backbone.pt: a seeded network whose BN statistics are not the defaults, so any
    BN layer left in training mode would visibly move them."""
    torch.manual_seed(seed)
    backbone, _ = extract.build_backbone("resnet18", SIZE)
    for module in backbone.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 2.0)
    os.makedirs(out, exist_ok=True)
    state = {k: v.clone() for k, v in backbone.state_dict().items()}
    torch.save(state, os.path.join(out, "backbone.pt"))
    return state


def read_json(out, name):
    with open(os.path.join(out, name)) as f:
        return json.load(f)


# ---------------------------------------------------------------- the linear probe

def test_probe_on_features_that_carry_the_labels_reaches_well_above_chance():
    torch.manual_seed(0)
    classes, width = 5, 16
    centres = torch.randn(classes, width) * 2
    train_y, val_y = torch.arange(200) % classes, torch.arange(100) % classes
    train_x = centres[train_y] + torch.randn(200, width)
    val_x = centres[val_y] + torch.randn(100, width)
    probe = evaluation.Probe(torch.nn.Identity(), width, classes, frozen=True)
    optimizer = torch.optim.SGD([{"params": probe.fc.parameters(), "lr": 0.5, "base_lr": 0.5}], momentum=0.9)
    args = type("Args", (), {"seed": 0, "batch_size": 32, "epochs": 10})
    for epoch in range(10):
        loss, _ = evaluation.cached_epoch(probe, optimizer, train_x, train_y, 0, 200, args, epoch)
    top1, top5, count = evaluation.sum_hits(evaluation.local_hits(probe.classify(val_x), val_y))
    assert count == 100
    assert top1 > 80, f"top-1 {top1}% on separable features (chance 20%)"
    assert top5 == 100
    assert loss < 0.5


def test_linear_probe_leaves_every_backbone_tensor_bit_identical(data, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "run")
    saved = save_backbone(out)
    loaded = {}
    real_loader = evaluation.load_pretrained_backbone

    def capture(*args, **kwargs):
        loaded["backbone"], width, described = real_loader(*args, **kwargs)
        return loaded["backbone"], width, described

    monkeypatch.setattr(evaluation, "load_pretrained_backbone", capture)
    result = evaluation.main(argv_04(data, out, "--epochs", "1"))
    after = loaded["backbone"].state_dict()
    assert set(after) == set(saved)
    changed = [k for k in saved if not torch.equal(after[k], saved[k])]
    assert changed == [], f"backbone tensors changed by the probe: {changed[:3]}"
    assert result["backbone_unchanged"] is True
    assert "backbone unchanged" in capsys.readouterr().out
    on_disk = read_json(out, "linear_eval.json")
    assert on_disk["protocol"] == "linear" and on_disk["checkpoint"].endswith("backbone.pt")
    assert 0 <= on_disk["top1"] <= on_disk["top5"] <= 100


def test_learning_rate_is_printed_after_scaling_by_the_batch(data, tmp_path, capsys):
    evaluation.main(argv_04(data, str(tmp_path / "run"), "--pretrained", "random", "--cached-features", "--epochs", "1"))
    out = capsys.readouterr().out
    assert "lr 40 x 6/2048 = 0.117188 (linear layer)" in out
    assert "epoch 1/1 loss" in out and "top-1" in out and "top-5" in out


def test_random_baseline_writes_its_own_files_beside_the_pretrained_results(data, tmp_path):
    out = str(tmp_path / "run")
    save_backbone(out)
    for extra in ([], ["--pretrained", "random"]):
        evaluation.main(argv_04(data, out, "--cached-features", "--epochs", "2", *extra))
    pretrained, random = read_json(out, "linear_eval_cached.json"), read_json(out, "linear_eval_cached_random.json")
    assert pretrained["checkpoint"].endswith("backbone.pt")
    assert random["checkpoint"].startswith("random init")
    records = [json.loads(line) for line in open(os.path.join(out, "linear_eval_cached_random_log.jsonl"))]
    assert [r["epoch"] for r in records] == [0, 1]
    assert all({"top1", "top5", "loss", "lr"} <= set(r) for r in records)
    assert os.path.isfile(os.path.join(out, "linear_eval_cached_checkpoint.pt"))
    assert os.path.isfile(os.path.join(out, "linear_eval_cached_random_checkpoint.pt"))
    assert not os.path.exists(os.path.join(out, "linear_eval.json"))  # the image probe's name stays free


def test_the_random_baseline_gets_bn_statistics_of_the_training_images(data, tmp_path, capsys):
    torch.manual_seed(0)
    backbone, _ = extract.build_backbone("resnet18", SIZE)
    paths, _, _ = extract.list_images(os.path.join(data, "train"))
    args = argparse.Namespace(image_size=SIZE, workers=0, seed=0)
    evaluation.estimate_bn_statistics(backbone, paths, args, torch.device("cpu"))
    assert not backbone.training
    # 18 images are one batch: the first BN holds the mean and unbiased variance of conv1's outputs.
    images = torch.stack([extract.ImageList(paths, extract.eval_transform(SIZE))[i][0] for i in range(len(paths))])
    with torch.no_grad():
        conv = backbone.conv1(images).double()
    torch.testing.assert_close(backbone.bn1.running_mean.double(), conv.mean((0, 2, 3)), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(backbone.bn1.running_var.double(), conv.transpose(0, 1).flatten(1).var(1),
                               atol=1e-5, rtol=1e-4)
    assert "BN statistics estimated on 18 training images" in capsys.readouterr().out
    # 04 --pretrained random does it before the protocol and says so.
    evaluation.main(argv_04(data, str(tmp_path / "run"), "--pretrained", "random", "--knn"))
    assert "random-init baseline: BN statistics estimated" in capsys.readouterr().out


def _cached_probe_on_two_processes(rank, world_size, data, out):
    evaluation.main(argv_04(data, out, "--pretrained", "random", "--cached-features", "--standardize"))


def test_cached_probe_gives_the_same_result_on_one_and_two_processes(data, tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    evaluation.main(argv_04(data, one, "--pretrained", "random", "--cached-features", "--standardize"))
    run_distributed(_cached_probe_on_two_processes, 2, data, two)
    a, b = read_json(one, "linear_eval_cached_random.json"), read_json(two, "linear_eval_cached_random.json")
    assert b["world_size"] == 2
    assert [h["val_images"] for h in b["history"]] == [9, 9]  # 5 + 4: no image dropped or counted twice
    assert (a["top1"], a["top5"]) == (b["top1"], b["top5"])
    assert a["history"][-1]["loss"] == pytest.approx(b["history"][-1]["loss"], rel=1e-5)
    wa = torch.load(os.path.join(one, "linear_eval_cached_random_checkpoint.pt"), weights_only=True)["network"]
    wb = torch.load(os.path.join(two, "linear_eval_cached_random_checkpoint.pt"), weights_only=True)["network"]
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-6)


def _evaluate_on_processes(rank, world_size, data, expected):
    torch.manual_seed(0)
    backbone, width = extract.build_backbone("resnet18", SIZE)
    probe = evaluation.Probe(backbone, width, 3, frozen=True)
    paths, _, classes = extract.list_images(os.path.join(data, "train"))
    val_paths, val_labels = extract.list_val_images(data, classes)
    val = extract.ImageList(val_paths, extract.eval_transform(SIZE), val_labels)
    result = evaluation.evaluate(probe, val, 2, argparse.Namespace(workers=0, loader_timeout=60), torch.device("cpu"))
    if expected is not None:
        assert result == expected, (result, expected)
    return result


def test_image_evaluation_counts_every_val_image_once_on_two_processes(data):
    expected = _evaluate_on_processes(0, 1, data, None)
    assert expected[2] == 9
    run_distributed(_evaluate_on_processes, 2, data, expected)


def _image_probe_on_two_processes(rank, world_size, data, out):
    result = evaluation.main(argv_04(data, out, "--epochs", "1"))
    assert result["world_size"] == 2 and result["val_images"] == 9 and result["backbone_unchanged"]


def test_image_probe_runs_with_ddp_on_two_processes(data, tmp_path):
    out = str(tmp_path / "run")
    save_backbone(out)
    run_distributed(_image_probe_on_two_processes, 2, data, out)
    assert read_json(out, "linear_eval.json")["history"][0]["val_images"] == 9


def _nan_on_rank_1(rank, world_size):
    """Rank 1's only batch holds a NaN; both ranks must stop with exit code 2 at step 0 (if only rank 1
    stopped, rank 0 would wait forever in the next step's gradient all-reduce)."""
    import argparse
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for group in optimizer.param_groups:
        group["base_lr"] = 0.1
    images = torch.randn(2, 3, 2, 2)
    if rank == 1:
        images[0, 0, 0, 0] = float("nan")
    loader = [(images, torch.tensor([0, 1]))]
    args = argparse.Namespace(epochs=1, print_freq=10, batch_size=4)
    with pytest.raises(SystemExit) as stopped:
        evaluation.image_epoch(model, optimizer, loader, args, 0, torch.device("cpu"))
    assert stopped.value.code == 2


def test_a_non_finite_loss_on_one_rank_stops_every_rank():
    run_distributed(_nan_on_rank_1, 2)


def test_an_interrupted_probe_resumes_to_the_uninterrupted_result(data, tmp_path, monkeypatch, capsys):
    whole, broken = str(tmp_path / "whole"), str(tmp_path / "broken")
    extra = ("--pretrained", "random", "--cached-features", "--standardize", "--epochs", "3", "--lr", "2")
    evaluation.main(argv_04(data, whole, *extra))
    real_save, saves = extract.atomic_save, []

    def save_then_crash(obj, path, **kwargs):
        real_save(obj, path, **kwargs)
        if path.endswith(".pt"):  # JSON files go through atomic_save too
            saves.append(path)
            raise KeyboardInterrupt  # killed right after the first epoch's checkpoint

    monkeypatch.setattr(extract, "atomic_save", save_then_crash)
    with pytest.raises(SystemExit) as stopped:
        evaluation.main(argv_04(data, broken, *extra))
    assert stopped.value.code == 130
    monkeypatch.setattr(extract, "atomic_save", real_save)
    assert len(saves) == 1
    capsys.readouterr()
    evaluation.main(argv_04(data, broken, *extra))
    assert "resuming from" in capsys.readouterr().out
    name = "linear_eval_cached_random_checkpoint.pt"
    a = torch.load(os.path.join(whole, name), weights_only=True)
    b = torch.load(os.path.join(broken, name), weights_only=True)
    assert b["epoch"] == 2
    for key in a["network"]:
        assert torch.equal(a["network"][key], b["network"][key]), key
    assert a["history"][-1]["top1"] == b["history"][-1]["top1"]


def test_resuming_with_other_settings_is_refused(data, tmp_path, capsys):
    out = str(tmp_path / "run")
    evaluation.main(argv_04(data, out, "--pretrained", "random", "--cached-features", "--epochs", "1"))
    with pytest.raises(SystemExit) as exit_info:
        evaluation.main(argv_04(data, out, "--pretrained", "random", "--cached-features", "--epochs", "1", "--lr", "3"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "linear_eval_cached_random_checkpoint.pt was written with other settings (--lr " in err
    assert "delete it" in err


# ---------------------------------------------------------------- weighted kNN

def brute_force_knn_accuracy(train_x, train_y, queries, query_y, num_classes, k, temperature):
    """float64, one process, the whole similarity matrix at once: (top-1 %, top-5 %)."""
    sim = queries.double() @ train_x.double().t()
    values, index = sim.topk(min(k, len(train_x)), dim=1)
    scores = torch.zeros(len(queries), num_classes, dtype=torch.float64)
    scores.scatter_add_(1, train_y[index], (values / temperature).exp())
    top = scores.topk(5, dim=1).indices == query_y[:, None]
    return 100 * top[:, 0].double().mean().item(), 100 * top.any(1).double().mean().item()


def _knn_against_brute_force(rank, world_size):
    generator = torch.Generator().manual_seed(0)
    train_x = F.normalize(torch.randn(37, 8, generator=generator), dim=1)
    train_y = torch.randint(0, 6, (37,), generator=generator)
    queries = F.normalize(torch.randn(11, 8, generator=generator), dim=1)
    query_y = torch.randint(0, 6, (11,), generator=generator)
    start, end = dist_softmax.shard_range(37, rank, world_size)  # 19 / 18 rows
    ks = [1, 5, 20, 200]  # 20 exceeds a shard, 200 the whole train set
    accuracy = extract.knn_accuracy(train_x[start:end], start, train_y, queries, query_y, 6, ks, temperature=0.07,
                                    chunk_size=4)
    assert sorted(accuracy) == ks
    for k in ks:
        expected = brute_force_knn_accuracy(train_x, train_y, queries, query_y, 6, k, 0.07)
        assert accuracy[k] == pytest.approx(expected), k
    _, ids = dist_softmax.nearest_rows(queries, train_x[start:end], 7, start, chunk_size=4)
    assert torch.equal(ids, (queries @ train_x.t()).topk(7, dim=1).indices)


def test_knn_scores_equal_brute_force_float64_on_one_process():
    _knn_against_brute_force(0, 1)


def test_knn_scores_equal_brute_force_float64_on_two_processes():
    run_distributed(_knn_against_brute_force, 2)


def _knn_on_two_processes(rank, world_size, data, out, expected):
    result = evaluation.main(argv_04(data, out, "--knn", "--pretrained", "random", "--knn-k", "3,7", "--chunk-size", "4"))
    assert result["world_size"] == 2
    assert result["results"] == expected  # val gathered from uneven shards, train sharded, candidates merged


def test_knn_run_gives_the_same_result_on_one_and_two_processes(data, tmp_path):
    argv = argv_04(data, str(tmp_path / "one"), "--knn", "--pretrained", "random", "--knn-k", "3,7", "--chunk-size", "4")
    expected = evaluation.main(argv)["results"]
    assert set(expected) == {"3", "7"}
    run_distributed(_knn_on_two_processes, 2, data, str(tmp_path / "two"), expected)


def test_knn_run_writes_both_k_and_clamps_k_to_the_train_size(data, tmp_path, capsys):
    out = str(tmp_path / "run")
    save_backbone(out)
    result = evaluation.main(argv_04(data, out, "--knn"))
    evaluation.main(argv_04(data, out, "--knn", "--pretrained", "random"))
    assert "k clamped to the 18 training images: [20, 200] -> [18]" in capsys.readouterr().out
    assert set(result["results"]) == {"18"} and result["k"] == 18
    assert read_json(out, "knn.json")["protocol"] == "knn"
    assert read_json(out, "knn_random.json")["checkpoint"].startswith("random init")


# ---------------------------------------------------------------- semi-supervised

def test_class_balanced_subset_takes_the_fraction_of_every_class_reproducibly():
    labels = [0] * 100 + [1] * 50 + [2] * 3
    subset = evaluation.class_balanced_subset(labels, 0.1, seed=0)
    counts = torch.bincount(torch.tensor([labels[i] for i in subset]), minlength=3).tolist()
    assert counts == [10, 5, 1]  # at least one image of every class
    assert subset == evaluation.class_balanced_subset(labels, 0.1, seed=0) == sorted(subset)
    assert subset != evaluation.class_balanced_subset(labels, 0.1, seed=1)


def test_subset_file_selects_the_named_images_and_refuses_unknown_ones(tmp_path, capsys):
    train = str(tmp_path / "train")
    paths = [os.path.join(train, "a", "x1.png"), os.path.join(train, "a", "x2.png"), os.path.join(train, "b", "y1.png")]
    listing = tmp_path / "subset.txt"
    listing.write_text("b/y1.png\nx2.png\n\n")
    assert evaluation.read_subset_file(str(listing), paths, train) == [1, 2]
    listing.write_text("b/zz.png\n")
    with pytest.raises(SystemExit):
        evaluation.read_subset_file(str(listing), paths, train)
    assert "names 'b/zz.png', which is not one image" in capsys.readouterr().err


def test_semi_supervised_fine_tunes_the_backbone_and_writes_semi_json(data, tmp_path, capsys):
    out = str(tmp_path / "run")
    saved = save_backbone(out)
    result = evaluation.main(argv_04(data, out, "--label-fraction", "0.5", "--epochs", "1"))
    printed = capsys.readouterr().out
    assert "lr 10 x 6/256 = 0.234375 (linear layer), 0.001 x 6/256 = 2.34375e-05 (backbone)" in printed
    assert result["settings"]["labelled_images"] == 9  # 3 of each class's 6
    assert read_json(out, "semi_0.5.json")["protocol"] == "semi"
    assert len(open(os.path.join(out, "semi_0.5_subset.txt")).read().split()) == 9
    tuned = torch.load(os.path.join(out, "semi_0.5_checkpoint.pt"), weights_only=True)["network"]
    assert not torch.equal(tuned["backbone.layer1.0.conv1.weight"], saved["layer1.0.conv1.weight"])


# ---------------------------------------------------------------- data and checkpoints

def test_tiny_imagenet_val_layout_loads_with_the_train_class_order(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    for wnid in ("n02", "n01", "n03"):
        (root / "train" / wnid / "images").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / "train" / wnid / "images" / f"{wnid}_0.JPEG")
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    (root / "val" / "images").mkdir(parents=True)
    rows = [("val_1.JPEG", "n03"), ("val_0.JPEG", "n01"), ("val_2.JPEG", "n02"), ("val_3.JPEG", "n01")]
    for name, _ in rows:
        Image.new("RGB", (8, 8)).save(root / "val" / "images" / name)
    (root / "val" / "val_annotations.txt").write_text("".join(f"{n}\t{c}\t0\t0\t8\t8\n" for n, c in rows))
    _, _, classes = extract.list_images(str(root / "train"))
    assert classes == ["n01", "n02", "n03"]
    paths, labels = extract.list_val_images(str(root), classes)
    assert [os.path.basename(p) for p in paths] == ["val_0.JPEG", "val_1.JPEG", "val_2.JPEG", "val_3.JPEG"]
    assert labels == [0, 2, 1, 0]


def test_imagefolder_val_with_fewer_classes_keeps_train_indices_and_unknown_classes_are_refused(tmp_path, capsys):
    for split, names in (("train", ("cat", "dog", "eel")), ("val", ("eel",))):
        for name in names:
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / name / "0.png")
    classes = ["cat", "dog", "eel"]
    assert extract.list_val_images(str(tmp_path), classes)[1] == [2]
    (tmp_path / "val" / "fox").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "fox" / "0.png")
    with pytest.raises(SystemExit):
        extract.list_val_images(str(tmp_path), classes)
    assert "['fox'] that train/ lacks" in capsys.readouterr().err


def test_a_state_dict_with_a_wrong_key_is_refused_with_a_clear_message(data, tmp_path, capsys):
    out = str(tmp_path / "run")
    state = save_backbone(out)
    state["layer9.weight"] = state.pop("layer1.0.conv1.weight")
    bad = str(tmp_path / "bad.pt")
    torch.save(state, bad)
    with pytest.raises(SystemExit) as exit_info:
        evaluation.main(argv_04(data, out, "--pretrained", bad, "--cached-features"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --pretrained")
    assert "unexpected key layer9.weight" in err and "missing key layer1.0.conv1.weight" in err


def test_a_backbone_for_another_image_size_is_refused_naming_the_stem(tmp_path, capsys):
    torch.manual_seed(0)
    big, _ = extract.build_backbone("resnet18", 224)
    path = str(tmp_path / "big.pt")
    torch.save(big.state_dict(), path)
    with pytest.raises(SystemExit):
        evaluation.load_pretrained_backbone(path, "resnet18", SIZE)
    err = capsys.readouterr().err
    assert "conv1.weight has shape [64, 3, 7, 7]" in err and "--image-size" in err


def test_02_checkpoints_and_torchvision_state_dicts_with_fc_or_module_prefix_load(tmp_path):
    torch.manual_seed(0)
    net = extract.EmbeddingNet("resnet18", SIZE)
    expected = net.backbone.state_dict()
    full = dict(expected, **{"fc.weight": torch.zeros(10, 512), "fc.bias": torch.zeros(10)})
    candidates = {
        "checkpoint.pt": {"network": net.state_dict(), "args": {"arch": "resnet18", "image_size": SIZE}},
        "torchvision.pt": full,
        "ddp.pt": {"state_dict": {"module." + k: v for k, v in full.items()}},
    }
    for name, obj in candidates.items():
        torch.save(obj, tmp_path / name)
        backbone, width, described = evaluation.load_pretrained_backbone(str(tmp_path / name), "resnet18", SIZE)
        assert width == 512 and described.endswith(name)
        for key, value in backbone.state_dict().items():
            assert torch.equal(value, expected[key]), (name, key)


def test_missing_backbone_names_02_and_the_random_baseline(data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        evaluation.main(argv_04(data, str(tmp_path / "run")))
    err = capsys.readouterr().err
    assert "backbone.pt not found; run 02_pretrain.py" in err and "--pretrained random" in err


def test_two_protocols_at_once_are_refused(data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        evaluation.main(argv_04(data, str(tmp_path), "--knn", "--label-fraction", "0.1"))
    assert "run them one at a time" in capsys.readouterr().err


def test_help_shows_single_process_torchrun_and_multi_node_commands():
    text = evaluation.parser.format_help()
    assert "python 04_linear_eval.py" in text and "torchrun --nproc_per_node=8 04_linear_eval.py" in text
    assert "--nnodes=8" in text and "--knn" in text and "--label-fraction" in text


def test_the_random_baseline_resumes_on_another_process_count(data, tmp_path, monkeypatch):
    """Its BN statistics are estimated anew by every run, and on other process counts or GPUs they
    round differently (here: other batches of the estimate in the first run): the resume contract
    fingerprints the network before that estimate, so the checkpoint is still taken."""
    out = str(tmp_path / "run")
    with monkeypatch.context() as patch:
        patch.setattr(evaluation, "BN_BATCH", 4)
        evaluation.main(argv_04(data, out, "--pretrained", "random", "--cached-features"))
    before = read_json(out, "linear_eval_cached_random.json")["history"]
    run_distributed(_cached_probe_again, 2, data, out)
    assert read_json(out, "linear_eval_cached_random.json")["history"] == before


def _cached_probe_again(rank, world_size, data, out):
    evaluation.main(argv_04(data, out, "--pretrained", "random", "--cached-features"))
