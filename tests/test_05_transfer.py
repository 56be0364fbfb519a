"""05_transfer.py: fine-tuned classification, VOC detection with its AP evaluator, backbone export."""
import argparse
import json
import os
import pickle

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import demo_data
from helpers import interrupt_at_epoch, run_distributed, stage

extract = stage("01_extract_init")
linear = stage("04_linear_eval")
transfer = stage("05_transfer")
torch.set_num_threads(1)

SIZE = 16  # classification images: 16 px, small-image stem, resnet18
COLOURS = [(220, 40, 40), (40, 200, 60), (50, 70, 230), (230, 210, 40)]


def colour_folder(root, train_per_class=12, val_per_class=(5, 4, 4, 4), seed=0):
    """ImageFolder train/ and val/ whose 4 classes are noisy images of 4 colours (learnable in a few
    epochs from scratch). 17 val images: uneven over 2 processes."""
    for split, counts in (("train", [train_per_class] * 4), ("val", val_per_class)):
        for c, count in enumerate(counts):
            os.makedirs(os.path.join(root, split, f"c{c}"), exist_ok=True)
            for i in range(count):
                rng = np.random.default_rng([seed, c, i, split == "val"])
                pixels = np.array(COLOURS[c], float) + rng.normal(0, 40, (SIZE, SIZE, 3))
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
                    os.path.join(root, split, f"c{c}", f"{i}.png"))
    return root


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return colour_folder(str(tmp_path_factory.mktemp("colours") / "data"))


def save_backbone(out, arch="resnet18", image_size=SIZE, seed=0):
    """A stand-in for 02's RUN/backbone.pt: a torchvision-named backbone state_dict."""
    torch.manual_seed(seed)
    model, _ = extract.build_backbone(arch, image_size)
    os.makedirs(out, exist_ok=True)
    torch.save(model.state_dict(), os.path.join(out, "backbone.pt"))
    return model.state_dict()


def argv_classify(data, out, epochs, *extra):
    return ["--task", "classify", "--data", data, "--out", out, "--arch", "resnet18", "--image-size", str(SIZE),
            "--epochs", str(epochs), "--batch-size", "16", "--lr", "0.8", "--workers", "0", "--print-freq", "1",
            *extra]


def read_json(path):
    with open(path) as f:
        return json.load(f)


def test_help_shows_single_process_torchrun_and_multi_node_commands():
    text = transfer.parser.format_help()
    assert "python 05_transfer.py --task classify" in text and "--task detect" in text and "--task export" in text
    assert "torchrun --nproc_per_node" in text and "--nnodes" in text


# ---------------------------------------------------------------- classification

def test_fine_tuning_from_scratch_beats_chance_clearly(colours, tmp_path, capsys):
    out = str(tmp_path / "run")
    transfer.main(argv_classify(colours, out, 3, "--init", "random"))
    printed = capsys.readouterr().out
    assert "head lr 0.8 x 16/256 = 0.05" in printed and "backbone lr x 1" in printed
    result = read_json(os.path.join(out, "transfer_classify_imagefolder_random.json"))
    assert result["test_images"] == 17 and result["num_classes"] == 4 and len(result["history"]) == 3
    assert result["top1"] >= 75.0  # chance is 25%
    assert result["top5"] == 100.0  # 4 classes: the top 5 always hold the label


def test_fine_tuning_starts_from_the_pretrained_backbone_with_a_smaller_backbone_lr(colours, tmp_path, capsys):
    out = str(tmp_path / "run")
    saved = save_backbone(out)
    transfer.main(argv_classify(colours, out, 1, "--backbone-lr-scale", "0.1"))  # --init: RUN/backbone.pt
    assert "backbone lr x 0.1" in capsys.readouterr().out
    ckpt = torch.load(os.path.join(out, "transfer_classify_imagefolder_checkpoint.pt"), weights_only=True)
    head_lr, backbone_lr = (group["lr"] for group in ckpt["optimizer"]["param_groups"])
    assert backbone_lr == pytest.approx(0.1 * head_lr)
    other = extract.build_backbone("resnet18", SIZE)[0].state_dict()  # another random initialisation
    key = "layer1.0.conv1.weight"
    moved = (ckpt["network"]["backbone." + key] - saved[key]).norm()
    assert 0 < moved < 0.1 * (other[key] - saved[key]).norm()  # trained, and from the saved weights


def test_a_state_dict_that_does_not_fit_is_refused_with_one_line(colours, tmp_path, capsys):
    out = str(tmp_path / "run")
    save_backbone(out, image_size=224)  # 7x7 stem; --image-size 16 builds the 3x3 one
    with pytest.raises(SystemExit) as exit_info:
        transfer.main(argv_classify(colours, out, 1))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "conv1.weight" in err


def test_an_interrupted_fine_tuning_resumes_with_the_same_results(colours, tmp_path, monkeypatch):
    out, uninterrupted = str(tmp_path / "run"), str(tmp_path / "uninterrupted")
    transfer.main(argv_classify(colours, uninterrupted, 2, "--init", "random"))

    with monkeypatch.context() as patch:
        patch.setattr(torch.utils.data.DistributedSampler, "set_epoch", interrupt_at_epoch(1))
        with pytest.raises(SystemExit, match="130"):
            transfer.main(argv_classify(colours, out, 2, "--init", "random"))
    assert read_json(os.path.join(out, "transfer_classify_imagefolder_random.json"))["epochs_done"] == 1
    transfer.main(argv_classify(colours, out, 2, "--init", "random"))  # the same command resumes
    strip = [{k: v for k, v in h.items() if k != "epoch_s"} for h in read_json(
        os.path.join(out, "transfer_classify_imagefolder_random.json"))["history"]]
    expected = [{k: v for k, v in h.items() if k != "epoch_s"} for h in read_json(
        os.path.join(uninterrupted, "transfer_classify_imagefolder_random.json"))["history"]]
    assert strip == expected and len(expected) == 2


def test_both_arms_fine_tune_with_the_same_settings_by_default(colours, tmp_path):
    out = str(tmp_path / "run")
    save_backbone(out, seed=1)  # not the random arm's network (seed 0)
    transfer.main(argv_classify(colours, out, 1))
    transfer.main(argv_classify(colours, out, 1, "--init", "random"))
    pretrained, random_init = (read_json(os.path.join(out, f"transfer_classify_imagefolder{s}.json"))["settings"]
                               for s in ("", "_random"))
    assert pretrained["backbone_lr_scale"] == 1.0 and pretrained.pop("backbone") != random_init.pop("backbone")
    assert pretrained == random_init


@pytest.mark.parametrize("flag, value, shown", [("--lr", "0.4", "--lr 0.8"), ("--batch-size", "8", "--batch-size 16")])
def test_resuming_a_fine_tuning_with_a_changed_setting_is_refused(colours, tmp_path, capsys, flag, value, shown):
    out = str(tmp_path / "run")
    transfer.main(argv_classify(colours, out, 1, "--init", "random"))
    argv = argv_classify(colours, out, 2, "--init", "random")
    argv[argv.index(flag) + 1] = value
    with pytest.raises(SystemExit) as stopped:
        transfer.main(argv)
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.count("\n") == 1 and f"other settings ({shown})" in err


def _classify_two_processes(rank, world_size, data, out):
    transfer.main(argv_classify(data, out, 1, "--init", "random"))


def test_two_processes_evaluate_every_val_image_exactly_once(colours, tmp_path):
    out = str(tmp_path / "run")
    run_distributed(_classify_two_processes, 2, colours, out)
    result = read_json(os.path.join(out, "transfer_classify_imagefolder_random.json"))
    assert result["test_images"] == 17  # 9 + 8
    # reference: the saved network evaluated image by image in one process, float64 counting
    ckpt = torch.load(os.path.join(out, "transfer_classify_imagefolder_random_checkpoint.pt"), weights_only=True)
    backbone, width = extract.build_backbone("resnet18", SIZE)
    net = linear.Probe(backbone, width, 4, frozen=False)
    net.load_state_dict(ckpt["network"])
    net.eval()
    _, test_tf = transfer.classify_transforms(SIZE)
    paths, labels, _ = extract.list_images(os.path.join(colours, "val"))
    with torch.no_grad():
        hits = [int(net(test_tf(Image.open(p).convert("RGB"))[None]).argmax()) == y for p, y in zip(paths, labels)]
    assert result["top1"] == pytest.approx(100.0 * sum(hits) / len(hits), abs=1e-9)


def write_cifar10(root, per_split=(20, 10)):
    """A tiny folder in CIFAR-10's python pickle format (cifar-10-batches-py)."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = per_split[1] if name == "test_batch" else per_split[0] // 5
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8),
                         "labels": rng.integers(0, 10, n).tolist()}, f)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return root


def test_cifar10_in_its_pickle_format_fine_tunes_and_reports(tmp_path, monkeypatch):
    data, out = write_cifar10(str(tmp_path / "cifar")), str(tmp_path / "run")
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a: True)  # generated: not the md5s
    transfer.main(["--task", "classify", "--dataset", "cifar10", "--data", data, "--out", out, "--arch", "resnet18",
                   "--image-size", str(SIZE), "--epochs", "1", "--batch-size", "10", "--workers", "0", "--init", "random"])
    result = read_json(os.path.join(out, "transfer_classify_cifar10_random.json"))
    assert (result["train_images"], result["test_images"], result["num_classes"]) == (20, 10, 10)
    assert 0.0 <= result["top1"] <= result["top5"] <= 100.0


class Recorder(torch.utils.data.Dataset):
    """Stands in for a torchvision dataset class: records the constructor's arguments."""
    calls = []

    def __init__(self, root, *args, **kwargs):
        Recorder.calls.append((args, kwargs))
        self.classes, self.all_categories = ["a", "b"], ["a", "b"]
        self.transform = kwargs.get("transform") or (lambda image: image)

    def __len__(self):
        return 4

    def __getitem__(self, index):
        return self.transform(Image.new("RGB", (SIZE + 4, SIZE + 4))), index % 2


@pytest.mark.parametrize("name, dataset, expected", [
    ("dtd", "DTD", [{"split": "train", "partition": 1}, {"split": "val", "partition": 1},
                    {"split": "test", "partition": 1}]),
    ("flowers102", "Flowers102", [{"split": "train"}, {"split": "val"}, {"split": "test"}]),
    ("cifar100", "CIFAR100", [{"train": True}, {"train": False}]),
])
def test_torchvision_sets_get_their_standard_splits_and_the_download_switch(name, dataset, expected, monkeypatch):
    Recorder.calls = []
    monkeypatch.setattr(torchvision.datasets, dataset, Recorder)
    args = transfer.parser.parse_args(["--task", "classify", "--dataset", name, "--data", "/nowhere", "--download"])
    train, test, _ = transfer.classification_sets(args, *transfer.classify_transforms(SIZE))
    got = [{k: v for k, v in kwargs.items() if k not in ("transform", "download")} for _, kwargs in Recorder.calls]
    assert got == expected and all(kwargs["download"] is True for _, kwargs in Recorder.calls)
    assert len(test) == 4 and test[0][0].shape == (3, SIZE, SIZE)


def test_inaturalist_2018_uses_the_official_json_split(tmp_path, monkeypatch):
    class FakeINat(Recorder):
        def __init__(self, root, version, **kwargs):
            super().__init__(root, version, **kwargs)
            self.all_categories = ["Plantae/0", "Plantae/1"]
            self.index = [(0, "a.jpg"), (0, "b.jpg"), (1, "c.jpg"), (1, "d.jpg")]

    for split, files in (("train", ["a.jpg", "c.jpg", "d.jpg"]), ("val", ["b.jpg"])):
        images = [{"file_name": f"train_val2018/Plantae/{'01'[f in ('c.jpg', 'd.jpg')]}/{f}"} for f in files]
        with open(tmp_path / f"{split}2018.json", "w") as f:
            json.dump({"images": images}, f)
    Recorder.calls = []
    monkeypatch.setattr(torchvision.datasets, "INaturalist", FakeINat)
    train, test, classes = transfer.inaturalist_sets(str(tmp_path), "2018", *transfer.classify_transforms(SIZE), False)
    assert (train.indices, test.indices, classes) == ([0, 2, 3], [1], 2)
    assert Recorder.calls[0][0] == ("2018",)


def test_sun397_uses_the_first_official_partition(tmp_path, monkeypatch):
    data_dir = tmp_path / "SUN397"

    class FakeSUN(Recorder):
        def __init__(self, root, **kwargs):
            super().__init__(root, **kwargs)
            self._data_dir = data_dir
            self._image_files = [data_dir / "a" / "abbey" / f"sun_{i}.jpg" for i in range(4)]

    data_dir.mkdir()
    (data_dir / "Training_01.txt").write_text("/a/abbey/sun_0.jpg\n/a/abbey/sun_3.jpg\n")
    (data_dir / "Testing_01.txt").write_text("/a/abbey/sun_1.jpg\n")
    monkeypatch.setattr(torchvision.datasets, "SUN397", FakeSUN)
    train, test, _ = transfer.sun397_sets(str(tmp_path), *transfer.classify_transforms(SIZE), False)
    assert (train.indices, test.indices) == ([0, 3], [1])


def test_a_missing_dataset_stops_with_one_line_naming_download(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        transfer.main(["--task", "classify", "--dataset", "cifar10", "--data", str(tmp_path), "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "--download" in err


# ---------------------------------------------------------------- the AP evaluator

def truth(boxes, labels, difficult=None):
    n = len(labels)
    return (torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(labels),
            torch.tensor(difficult or [False] * n))


def dets(image, boxes, scores, labels):
    return (image, torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(scores), torch.tensor(labels))


def test_perfect_boxes_give_ap_100_at_every_threshold():
    truths = [truth([[0, 0, 10, 10], [20, 20, 40, 30]], [1, 2]), truth([[5, 5, 25, 25]], [1])]
    detections = [dets(0, [[0, 0, 10, 10], [20, 20, 40, 30]], [0.9, 0.8], [0, 1]), dets(1, [[5, 5, 25, 25]], [0.7], [0])]
    result = transfer.voc_ap(detections, truths, 20, metric="all-point")
    assert (result["AP"], result["AP50"], result["AP75"]) == (100.0, 100.0, 100.0)
    assert result["per_class_AP"][:2] == [100.0, 100.0] and result["per_class_AP"][2] is None  # no boxes: left out


def test_a_shifted_box_counts_at_ap50_but_not_at_ap75():
    # shifted by 2 px: IoU = 80 / 120 = 0.667 > 0.50, 0.55, 0.60, 0.65 and < 0.70 ... 0.95
    result = transfer.voc_ap([dets(0, [[2, 0, 12, 10]], [0.9], [0])], [truth([[0, 0, 10, 10]], [1])], 20, "all-point")
    assert result["AP50"] == 100.0 and result["AP75"] == 0.0
    assert result["AP"] == pytest.approx(40.0)  # 4 of the 10 thresholds


def test_a_duplicate_detection_is_a_false_positive():
    truths = [truth([[0, 0, 10, 10]], [1]), truth([[0, 0, 10, 10]], [1])]
    detections = [dets(0, [[0, 0, 10, 10], [0, 0, 10, 10]], [0.9, 0.8], [0, 0]), dets(1, [[0, 0, 10, 10]], [0.7], [0])]
    # ranked: TP, FP (duplicate), TP -> recall .5 .5 1, precision 1 .5 .667; all-point AP = .5 + .5 x 2/3
    result = transfer.voc_ap(detections, truths, 20, metric="all-point")
    assert result["AP50"] == pytest.approx(100 * (0.5 + 0.5 * 2 / 3))
    # 11-point: r = 0 .. .5 -> 1, r = .6 .. 1 -> 2/3
    eleven = transfer.voc_ap(detections, truths, 20, metric="11-point")
    assert eleven["AP50"] == pytest.approx(100 * (6 + 5 * 2 / 3) / 11)


def test_difficult_objects_are_neither_hits_nor_misses():
    truths = [truth([[0, 0, 10, 10], [20, 20, 30, 30]], [1, 1], [True, False]), truth([[0, 0, 8, 8]], [2], [True])]
    detections = [dets(0, [[0, 0, 10, 10], [20, 20, 30, 30]], [0.9, 0.8], [0, 0]), dets(1, [[0, 0, 8, 8]], [0.9], [1])]
    result = transfer.voc_ap(detections, truths, 20, metric="all-point")
    assert result["AP"] == 100.0  # the hit on the difficult box is not a false positive
    assert result["per_class_AP"][1] is None  # a class with only difficult boxes is left out
    missed = transfer.voc_ap([dets(0, [[20, 20, 30, 30]], [0.8], [0])], truths[:1], 20, "all-point")
    assert missed["AP"] == 100.0  # the undetected difficult box is not a miss


def test_a_detection_in_an_image_without_that_class_is_a_false_positive():
    truths = [truth([[0, 0, 10, 10]], [1]), truth([], [])]
    detections = [dets(1, [[0, 0, 10, 10]], [0.9], [0]), dets(0, [[0, 0, 10, 10]], [0.8], [0])]
    # FP then TP: recall 0, 1; precision 0, .5 -> AP .5
    assert transfer.voc_ap(detections, truths, 20, metric="all-point")["AP50"] == pytest.approx(50.0)


# ---------------------------------------------------------------- detection

@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    return demo_data.make_demo_voc(str(tmp_path_factory.mktemp("voc") / "voc"), train07=6, test07=5, train12=4)


def voc_test_set(voc):
    return transfer.voc_images(argparse.Namespace(data=voc, download=False), "2007", "test", flip=False)


def test_demo_voc_is_read_by_torchvision_voc_detection(voc):
    dataset = voc_test_set(voc)
    image, target = dataset[0]
    assert len(dataset) == 5 and image.shape == (3, 96, 96)
    assert target["boxes"].shape[1] == 4 and len(target["labels"]) >= 1 and target["labels"].min() >= 1
    assert (target["boxes"][:, 2:] > target["boxes"][:, :2]).all() and target["boxes"].max() <= 96


def test_a_folder_without_voc_layout_stops_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        transfer.main(["--task", "detect", "--data", str(tmp_path), "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "VOCdevkit" in err


def test_the_detector_carries_our_backbone_weights_and_trainable_bn():
    backbone, width = extract.build_backbone("resnet18", 224)
    expected = backbone.conv1.weight.detach().clone()
    model = transfer.build_detector(backbone, width, 21, [64], 64, 96)
    assert torch.equal(model.backbone.body.conv1.weight, expected)
    assert all(p.requires_grad for p in model.parameters())  # every layer fine-tuned
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.fpn.modules())
    frozen = transfer.build_detector(extract.build_backbone("resnet18", 224)[0], width, 21, [64], 64, 96, "frozen")
    assert isinstance(frozen.backbone.body.bn1, torchvision.ops.FrozenBatchNorm2d)


def no_downloads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", refuse)
    monkeypatch.setattr(torchvision.datasets.utils, "download_url", refuse)


def argv_detect(voc, out, *extra):
    return ["--task", "detect", "--data", voc, "--out", out, "--arch", "resnet18", "--image-size", "224",
            "--batch-size", "2", "--iters", "3", "--min-size", "64", "80", "--test-size", "64", "--max-size", "96",
            "--workers", "0", "--print-freq", "1", *extra]


def test_detection_trains_evaluates_and_resumes_without_downloading_anything(voc, tmp_path, monkeypatch, capsys):
    no_downloads(monkeypatch)
    out = str(tmp_path / "run")
    save_backbone(out, image_size=224)
    transfer.main(argv_detect(voc, out))
    printed = capsys.readouterr().out
    assert "iter 3/3 loss" in printed and "AP50" in printed
    result = read_json(os.path.join(out, "transfer_detect_voc.json"))
    assert result["iterations"] == 3 and result["train_images"] == 10 and result["test_images"] == 5
    assert all(0.0 <= result[k] <= 100.0 for k in ("AP", "AP50", "AP75"))
    ckpt = torch.load(os.path.join(out, "transfer_detect_voc_checkpoint.pt"), weights_only=True)
    assert ckpt["iteration"] == 3
    transfer.main(argv_detect(voc, out, "--iters", "4"))  # a longer schedule continues from iteration 3
    printed = capsys.readouterr().out
    assert "resuming from" in printed and "iter 4/4 loss" in printed and "iter 3/" not in printed
    assert read_json(os.path.join(out, "transfer_detect_voc.json"))["iterations"] == 4


def _detect_two_processes(rank, world_size, voc, out):
    transfer.main(argv_detect(voc, out, "--iters", "1"))


def test_two_process_detection_evaluates_each_test_image_once(voc, tmp_path):
    out = str(tmp_path / "run")
    save_backbone(out, image_size=224)
    run_distributed(_detect_two_processes, 2, voc, out)
    result = read_json(os.path.join(out, "transfer_detect_voc.json"))
    # reference: the saved detector on all 5 test images (3 + 2 over the processes) in one process
    model = transfer.build_detector(extract.build_backbone("resnet18", 224)[0], 512, 21, [64, 80], 64, 96)
    model.load_state_dict(torch.load(os.path.join(out, "transfer_detect_voc_checkpoint.pt"),
                                     weights_only=True)["network"])
    dataset = voc_test_set(voc)
    detections = transfer.detect_shard(model, dataset, 5, torch.device("cpu"))
    truths = [dataset[i][1] for i in range(5)]
    truths = [(t["boxes"], t["labels"], t["difficult"]) for t in truths]
    reference = transfer.voc_ap(detections, truths, 20, metric="11-point")  # the default of --ap-metric
    assert [d[0] for d in detections] == [0, 1, 2, 3, 4] and result["test_images"] == 5
    assert result["AP"] == pytest.approx(reference["AP"], nan_ok=True)
    assert result["AP50"] == pytest.approx(reference["AP50"], nan_ok=True)


# ---------------------------------------------------------------- export

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("export") / "run")
    saved = save_backbone(out, arch="resnet50", image_size=224)
    transfer.main(["--task", "export", "--out", out, "--arch", "resnet50"])
    return out, saved


def test_export_takes_arch_and_image_size_from_the_run_when_not_given(tmp_path, capsys):
    out = str(tmp_path / "run")
    saved = save_backbone(out)  # resnet18 at 16 px: the small stem
    extract.atomic_save({"args": {"arch": "resnet18", "image_size": SIZE}}, os.path.join(out, "init.pt"))
    transfer.main(["--task", "export", "--out", out])
    state = torch.load(os.path.join(out, "backbone_torchvision.pth"), weights_only=True)
    assert state["conv1.weight"].shape == (64, 3, 3, 3) and all(torch.equal(state[k], saved[k]) for k in saved)
    assert f"network: resnet18 at {SIZE} px (as in {out}/init.pt)" in capsys.readouterr().out


def test_export_writes_a_torchvision_state_dict_that_loads_with_only_fc_missing(exported):
    out, saved = exported
    state = torch.load(os.path.join(out, "backbone_torchvision.pth"), weights_only=True)
    result = torchvision.models.resnet50().load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
    assert all(torch.equal(state[k], saved[k]) for k in saved)


def test_export_writes_detectron2_names_and_shapes(exported):
    out, saved = exported
    with open(os.path.join(out, "backbone_detectron2.pkl"), "rb") as f:
        obj = pickle.load(f)
    model = obj["model"]
    assert obj["matching_heuristics"] is True and "__author__" in obj
    expected_shapes = {
        "stem.conv1.weight": (64, 3, 7, 7), "stem.conv1.norm.weight": (64,), "stem.conv1.norm.running_var": (64,),
        "res2.0.conv1.weight": (64, 64, 1, 1), "res2.0.conv2.weight": (64, 64, 3, 3),
        "res2.0.conv3.norm.bias": (256,), "res2.0.shortcut.weight": (256, 64, 1, 1),
        "res2.0.shortcut.norm.running_mean": (256,), "res3.3.conv2.weight": (128, 128, 3, 3),
        "res4.5.conv3.weight": (1024, 256, 1, 1), "res5.0.shortcut.weight": (2048, 1024, 1, 1),
        "res5.2.conv3.norm.weight": (2048,)}
    assert {k: model[k].shape for k in expected_shapes} == expected_shapes
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in model.values())
    assert not any(k.startswith(("layer", "conv1.", "bn1", "fc")) or "num_batches_tracked" in k or ".bn" in k
                   or "downsample" in k for k in model)
    assert len(model) == sum(not k.endswith("num_batches_tracked") for k in saved)  # nothing lost
    assert np.array_equal(model["res4.2.conv2.norm.running_mean"], saved["layer3.2.bn2.running_mean"].numpy())
    info = read_json(os.path.join(out, "transfer_export_backbone.json"))
    assert info["task"] == "export" and info["stem"].startswith("7x7")
