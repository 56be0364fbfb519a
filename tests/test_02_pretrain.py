"""02_pretrain.py: training, checkpoints, exact resume (also on another process count), outputs."""
import argparse
import glob
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

import demo_data
from helpers import ROOT, free_port, interrupt_at_epoch, real_photos, run_distributed, stage, stage_argv

import dist_softmax

extract = stage("01_extract_init")
pretrain = stage("02_pretrain")
torch.set_num_threads(1)

SIZE, BATCH = 16, 8  # 32 instances at 16 px, 4 steps per epoch on one process


def demo_run(base, val_per_class):
    """Demo data (4 classes x 8 images) and a run folder holding 01's init.pt for it."""
    data = demo_data.make_demo_dataset(str(base / "demo"), num_classes=4, train_per_class=8,
                                       val_per_class=val_per_class, image_size=SIZE)
    extract.main(stage_argv(data, str(base / "run"), SIZE, BATCH, "--diagnostic-samples", "8"))
    return data, str(base / "run")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Demo data without val/ and a run folder holding 01's init.pt, copied by each test that trains."""
    return demo_run(tmp_path_factory.mktemp("pretrain"), val_per_class=0)


@pytest.fixture
def run(prepared, tmp_path):
    data, base_run = prepared
    out = str(tmp_path / "run")
    shutil.copytree(base_run, out)
    return data, out


def argv_02(data, out, epochs, *extra):
    return ["--data", data, "--out", out, "--arch", "resnet18", "--image-size", str(SIZE),
            "--batch-size", str(BATCH), "--epochs", str(epochs), "--warmup-epochs", "1", "--lr", "4",
            "--alpha", "0", "--workers", "0", "--print-freq", "1", *extra]


def torchrun(nproc, script, argv):
    """Launch `script` as torchrun would on one node, OMP_NUM_THREADS=1; returns the finished process."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", os.path.join(ROOT, script), *argv]
    return subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)


def step_losses(out):
    with open(os.path.join(out, "pretrain_log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [(r["epoch"], r["step"], r["loss"]) for r in records if "step" in r]


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# ---------------------------------------------------------------- schedule

def test_learning_rate_warms_up_linearly_then_decays_by_cosine_to_zero():
    lr = extract.cosine_lr
    assert lr(0.4, 1.0, 2, 10) == pytest.approx(0.2)
    assert lr(0.4, 2.0, 2, 10) == pytest.approx(0.4)
    assert lr(0.4, 6.0, 2, 10) == pytest.approx(0.2)  # half-way through the cosine
    assert lr(0.4, 10.0, 2, 10) == pytest.approx(0.0, abs=1e-12)


def test_help_shows_single_process_torchrun_and_multi_node_commands():
    text = pretrain.parser.format_help()
    assert "python 02_pretrain.py" in text and "torchrun --nproc_per_node" in text and "--nnodes" in text


# ---------------------------------------------------------------- one process

def test_one_process_trains_and_writes_a_torchvision_backbone(run, capsys):
    data, out = run
    pretrain.main(argv_02(data, out, 1))
    printed = capsys.readouterr().out
    assert "lr 4.0 x 8/4096 = 0.0078125" in printed
    assert "epoch 0 step 4/4 loss" in printed and "img/s" in printed and "eta" in printed and "mem" in printed
    losses = [loss for _, _, loss in step_losses(out)]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    backbone = torch.load(os.path.join(out, "backbone.pt"), weights_only=True)
    resnet = torchvision.models.resnet18()
    resnet.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # the small-image stem of 16 px
    result = resnet.load_state_dict(backbone, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert ckpt["epoch"] == 0 and ckpt["step"] == 4 and ckpt["world_size"] == 1
    assert ckpt["classifier"]["weight"].shape == (32, 128) and ckpt["classifier"]["momentum"].shape == (32, 128)
    assert torch.equal(ckpt["network"]["backbone.conv1.weight"], backbone["conv1.weight"])


def test_training_moves_the_classifier_rows_away_from_the_prior(run):
    data, out = run
    pretrain.main(argv_02(data, out, 1))
    init = torch.load(os.path.join(out, "init.pt"), weights_only=True)
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert not torch.allclose(ckpt["classifier"]["weight"], init["classifier"]["weight"])


def test_an_interrupted_run_resumes_with_the_same_losses(run, tmp_path, monkeypatch, capsys):
    data, out = run
    uninterrupted = str(tmp_path / "uninterrupted")
    shutil.copytree(out, uninterrupted)
    pretrain.main(argv_02(data, uninterrupted, 2))

    with monkeypatch.context() as patch:
        patch.setattr(torch.utils.data.DistributedSampler, "set_epoch", interrupt_at_epoch(1))
        with pytest.raises(SystemExit) as stopped:
            pretrain.main(argv_02(data, out, 2))
    assert stopped.value.code == 130 and not os.path.exists(os.path.join(out, "backbone.pt"))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: interrupted; in epoch 2 of 2 (1 finished, in checkpoint.pt)" in err
    assert "the same command resumes" in err
    pretrain.main(argv_02(data, out, 2))  # the same command again: resumes at epoch 1

    expected = step_losses(uninterrupted)
    assert [e for e, _, _ in expected] == [0] * 4 + [1] * 4
    assert step_losses(out) == expected
    a = torch.load(os.path.join(out, "backbone.pt"), weights_only=True)
    b = torch.load(os.path.join(uninterrupted, "backbone.pt"), weights_only=True)
    assert all(torch.equal(a[key], b[key]) for key in b)


def test_a_non_finite_loss_stops_with_a_message_and_keeps_the_last_checkpoint(run, monkeypatch, capsys):
    data, out = run
    pretrain.main(argv_02(data, out, 1))
    checkpoint = os.path.join(out, "checkpoint.pt")
    before = sha256(checkpoint)
    capsys.readouterr()
    forward = dist_softmax.DistCosineSoftmax.forward
    monkeypatch.setattr(dist_softmax.DistCosineSoftmax, "forward",
                        lambda self, *a, **k: forward(self, *a, **k) * float("nan"))
    with pytest.raises(SystemExit) as exit_info:
        pretrain.main(argv_02(data, out, 2))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: loss is nan at epoch 1 step 0")
    assert err.count("\n") == 1 and sha256(checkpoint) == before


def test_resuming_with_a_changed_setting_is_refused(run, capsys):
    data, out = run
    pretrain.main(argv_02(data, out, 1))
    argv = argv_02(data, out, 2)
    argv[argv.index("--lr") + 1] = "2"
    with pytest.raises(SystemExit) as exit_info:
        pretrain.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "other settings (--lr 4.0)" in err and err.count("\n") == 1


def test_data_other_than_the_run_was_made_from_is_refused(run, tmp_path, capsys):
    _, out = run
    other = demo_data.make_demo_dataset(str(tmp_path / "other"), num_classes=3, train_per_class=8,
                                      val_per_class=0, image_size=SIZE)
    with pytest.raises(SystemExit):
        pretrain.main(argv_02(other, out, 1))
    err = capsys.readouterr().err
    assert "32 training images" in err and "24 different" in err and err.count("\n") == 1


def test_a_run_folder_without_init_is_refused_with_the_command_to_fix_it(prepared, tmp_path, capsys):
    data, _ = prepared
    with pytest.raises(SystemExit):
        pretrain.main(argv_02(data, str(tmp_path / "empty"), 1))
    assert "run 01_extract_init.py" in capsys.readouterr().err


# ---------------------------------------------------------------- two processes

def test_a_one_process_checkpoint_resumes_on_two_processes(run):
    data, out = run
    pretrain.main(argv_02(data, out, 1))
    done = torchrun(2, "02_pretrain.py", argv_02(data, out, 2))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stdout and "saved by 1 process(es), now 2" in done.stdout
    epochs = [e for e, _, _ in step_losses(out)]
    assert epochs == [0] * 4 + [1] * 4  # 2 processes x 4 instances: still 4 steps per epoch
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["step"] == 8 and ckpt["world_size"] == 2
    assert ckpt["classifier"]["momentum"].shape == (32, 128)
    assert os.path.isfile(os.path.join(out, "backbone.pt"))


def _train_with_smoothing(rank, world_size, argv):
    pretrain.main(argv)


def test_two_processes_train_with_hard_class_smoothing(run, capfd):
    data, out = run
    argv = argv_02(data, out, 1)
    argv[argv.index("--alpha") + 1] = "0.2"
    run_distributed(_train_with_smoothing, 2, argv + ["--hard-k", "100"])
    printed = capfd.readouterr().out
    assert "--hard-k 100 clamped to 31" in printed and "31 hard classes per instance mined" in printed
    losses = [loss for _, _, loss in step_losses(out)]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)


# ---------------------------------------------------------------- 02 against a plain autograd trainer

def plain_trainer(data, out, steps_per_epoch, epochs, batch, lr, alpha, k, tau=0.15):
    """The method written the obvious way, in one process: cosine logits over all N rows (Eq. 1),
    the Eq. 2 targets over the k most similar other rows (mined each epoch), F.cross_entropy with
    soft targets, one torch.optim.SGD (momentum 0.9, weight decay 1e-4) over network and rows, warm-up
    of one epoch then cosine; the same data order and augmentations as 02. Returns the network
    state, the rows, the per-step losses and the mean angle a visited row turned per epoch."""
    init = torch.load(os.path.join(out, "init.pt"), weights_only=True)
    net = extract.EmbeddingNet("resnet18", SIZE)
    net.load_state_dict(init["network"])
    rows = torch.nn.Parameter(init["classifier"]["weight"].to(torch.get_default_dtype()))
    base_lr = lr * batch / 4096
    sgd = torch.optim.SGD(list(net.parameters()) + [rows], lr=base_lr, momentum=0.9, weight_decay=1e-4)
    paths, _, _ = extract.list_images(os.path.join(data, "train"))
    dataset = extract.ImageList(paths, extract.TwoViews(extract.train_transform(SIZE)))
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0,
                                                  drop_last=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=sampler, drop_last=True)
    losses, turns = [], []
    for epoch in range(epochs):
        torch.manual_seed(extract.step_seed(0, epoch, 0))
        sampler.set_epoch(epoch)
        with torch.no_grad():
            similar = F.normalize(rows, dim=1) @ F.normalize(rows, dim=1).t()
            similar.fill_diagonal_(-float("inf"))
            hard = similar.topk(k, dim=1).indices
        net.train()
        turned = []
        for i, (views, ids) in enumerate(loader):
            progress = epoch + (i + 0.5) / steps_per_epoch
            t = min(1.0, (progress - 1) / (epochs - 1))
            for group in sgd.param_groups:
                group["lr"] = base_lr * progress if progress < 1 else base_lr * 0.5 * (1 + math.cos(math.pi * t))
            labels = ids.repeat_interleave(2)
            images = views.flatten(0, 1).to(torch.get_default_dtype())
            logits = F.normalize(net(images), dim=1) @ F.normalize(rows, dim=1).t() / tau
            targets = torch.zeros_like(logits)
            targets[torch.arange(len(labels))[:, None], hard[labels]] = alpha / k
            targets[torch.arange(len(labels)), labels] = 1 - alpha
            loss = F.cross_entropy(logits, targets)
            before = rows.detach()[ids].clone()
            sgd.zero_grad()
            loss.backward()
            sgd.step()
            losses.append(loss.item())
            cos = F.cosine_similarity(before.double(), rows.detach()[ids].double(), dim=1).clamp(-1, 1)
            turned.append(torch.rad2deg(torch.acos(cos)))
        turns.append(torch.cat(turned).mean().item())
    return net.state_dict(), rows.detach(), losses, turns


def relative_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


@pytest.fixture
def float64():
    """Both trainers in float64. In fp32, rounding differences between two correct implementations
    grow chaotically in this ReLU network (a 2e-6 difference in the parameters gave gradients 3e-3
    apart one step later), so 20 steps can only be compared where rounding is 1e-16."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("photos", ["demo", "real"])
def test_one_process_matches_a_plain_autograd_trainer_for_20_steps(photos, tmp_path, request):
    """Every network parameter and buffer, every row and every loss of 02 within 1e-6 (relative) of
    the plain trainer after 2 epochs of 10 steps, with hard-class smoothing re-mined at epoch 1
    (measured: 2e-14 for the network, 3e-8 for the rows, which 02 saves in fp32)."""
    if photos == "real":
        data = real_photos(str(tmp_path / "photos"), classes=2, train_per_class=40)
        if data is None:
            pytest.skip("../shared/data/cifar10-dev.tar is not there")
    else:
        data = demo_data.make_demo_dataset(str(tmp_path / "demo"), num_classes=4, train_per_class=20,
                                         val_per_class=0, image_size=SIZE)
    out = str(tmp_path / "run")
    extract.main(["--data", data, "--out", out, "--arch", "resnet18", "--image-size", str(SIZE),
                  "--batch-size", str(BATCH), "--workers", "0", "--diagnostic-samples", "8"])
    request.getfixturevalue("float64")
    argv = argv_02(data, out, 2, "--knn-every", "0")
    argv[argv.index("--alpha") + 1] = "0.2"
    pretrain.main(argv + ["--hard-k", "5"])
    state, rows, losses, turns = plain_trainer(data, out, steps_per_epoch=10, epochs=2, batch=BATCH, lr=4,
                                               alpha=0.2, k=5)
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert ckpt["step"] == len(losses) == 20
    for key, value in state.items():
        if value.is_floating_point():
            assert relative_error(ckpt["network"][key], value) < 1e-6, key
    assert relative_error(ckpt["classifier"]["weight"], rows) < 1e-6  # saved as fp32: 2e-8
    ours = [loss for _, _, loss in step_losses(out)]
    assert ours == pytest.approx(losses, rel=1e-8)
    epochs = [r for r in map(json.loads, open(os.path.join(out, "pretrain_log.jsonl"))) if "epoch_loss" in r]
    assert [r["row_turn_deg"] for r in epochs] == pytest.approx(turns, rel=1e-2)
    assert epochs[-1]["row_norm"] == pytest.approx(ckpt["classifier"]["weight"].norm(dim=1).mean().item(), rel=1e-5)


def test_sampled_steps_are_torch_sgd_on_the_drawn_rows_and_leave_the_others_and_their_momentum():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(10, 4))
    optimizer = torch.optim.SGD([weight], lr=0.1, momentum=0.9, weight_decay=1e-3)
    w, momentum = weight.detach().double().clone(), torch.zeros(10, 4, dtype=torch.float64)  # float64 reference
    for drawn in ([1, 3, 4], [3, 5], [1, 5, 9]):  # row 3 drawn twice in a row, row 1 after a pause
        rows, grad = torch.tensor(drawn), torch.randn(len(drawn), 4)
        weight.grad = torch.sparse_coo_tensor(rows[None], grad, weight.shape)
        before = weight.detach().clone()
        pretrain.step_sampled_rows(optimizer, weight)
        momentum[rows] = 0.9 * momentum[rows] + grad.double() + 1e-3 * w[rows]  # torch SGD, per drawn row
        w[rows] -= 0.1 * momentum[rows]
        others = ~torch.isin(torch.arange(10), rows)
        assert torch.equal(weight.detach()[others], before[others])  # no step, no weight decay
        torch.testing.assert_close(weight.detach().double(), w, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(optimizer.state[weight]["momentum_buffer"].double(), momentum, rtol=1e-6, atol=1e-6)


def test_row_turn_degrees_measures_small_and_large_angles():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    b = torch.tensor([[math.cos(1e-4), math.sin(1e-4)], [0.0, 3.0], [-1.0, 0.0]])
    turned = pretrain.row_turn_degrees(a, b)
    assert turned.tolist() == pytest.approx([math.degrees(1e-4), 90.0, 180.0], rel=1e-4)


# ---------------------------------------------------------------- the kNN curve

@pytest.fixture(scope="module")
def with_val(tmp_path_factory):
    """Demo data with a val/ folder (12 images) and its 01 run folder."""
    return demo_run(tmp_path_factory.mktemp("knn"), val_per_class=3)


def knn_records(out):
    with open(os.path.join(out, "pretrain_log.jsonl")) as f:
        return [(r["epoch"], r["knn_top1"]) for r in map(json.loads, f) if "knn_top1" in r]


def test_the_knn_curve_is_04s_knn_of_the_backbone_at_that_epoch(with_val, tmp_path, capsys):
    data, base = with_val
    out = str(tmp_path / "run")
    shutil.copytree(base, out)
    pretrain.main(argv_02(data, out, 2, "--knn-every", "1"))
    curve = knn_records(out)
    assert [epoch for epoch, _ in curve] == [0, 1]
    evaluation = stage("04_linear_eval")
    result = evaluation.main(["--data", data, "--out", out, "--knn", "--workers", "0", "--batch-size", "4"])
    assert curve[-1][1] == pytest.approx(result["results"]["20"]["top1"])
    printed = capsys.readouterr().out
    assert "kNN curve: every 1 epoch(s)" in printed and "epoch 1: kNN top-1 (k=20)" in printed


def test_the_knn_interval_keeps_its_cost_under_5_percent_and_0_turns_it_off(with_val, tmp_path, capsys):
    data, base = with_val
    out = str(tmp_path / "run")
    shutil.copytree(base, out)
    pretrain.main(argv_02(data, out, 3))
    # 32 bank + 12 val passes against 6 x 32 per epoch: 22.9% a round, so every 5 epochs (4.6%); and the last
    assert "kNN curve: every 5 epoch(s)" in capsys.readouterr().out
    assert [epoch for epoch, _ in knn_records(out)] == [2]
    off = str(tmp_path / "off")
    shutil.copytree(base, off)
    pretrain.main(argv_02(data, off, 1, "--knn-every", "0"))
    assert knn_records(off) == [] and "kNN curve" not in capsys.readouterr().out


def _knn_curve_on_two_processes(rank, world_size, argv):
    pretrain.main(argv)


def test_the_knn_curve_is_the_same_on_two_processes(with_val, tmp_path):
    """Sharded bank, uneven val shards (12 images), candidates merged: the number of one process."""
    data, base = with_val
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    shutil.copytree(base, one)
    shutil.copytree(base, two)
    pretrain.main(argv_02(data, one, 1, "--knn-every", "1"))
    ckpt = torch.load(os.path.join(one, "checkpoint.pt"), weights_only=True)
    # 02 on two processes trains another network; score the one-process backbone on two processes.
    torch.save({k[len("backbone."):]: v for k, v in ckpt["network"].items() if k.startswith("backbone.")},
               os.path.join(two, "backbone.pt"))
    run_distributed(_knn_of_backbone, 2, data, two, knn_records(one)[0][1])


def _knn_of_backbone(rank, world_size, data, out, expected):
    evaluation = stage("04_linear_eval")
    result = evaluation.main(["--data", data, "--out", out, "--knn", "--workers", "0", "--batch-size", "4"])
    assert result["results"]["20"]["top1"] == pytest.approx(expected)


def _two_process_run_recording_the_scored_network(rank, world_size, argv, folder):
    measure = pretrain.KnnCurve.measure

    def recording(self, backbone, epoch):
        torch.save(backbone.state_dict(), os.path.join(folder, f"scored-rank{rank}-epoch{epoch}.pt"))
        return measure(self, backbone, epoch)
    pretrain.KnnCurve.measure = recording
    pretrain.main(argv)
    evaluation = stage("04_linear_eval")
    result = evaluation.main(["--data", argv[1], "--out", argv[3], "--knn", "--workers", "0"])
    if rank == 0:
        torch.save(result["results"]["20"]["top1"], os.path.join(folder, "knn04.pt"))


def test_one_backbone_one_knn_number_on_two_processes(with_val, tmp_path):
    """Every rank scores the kNN curve with the same weights and BN statistics, those backbone.pt
    holds, so the curve's last point is 04's kNN of backbone.pt."""
    data, base = with_val
    out = str(tmp_path / "run")
    shutil.copytree(base, out)
    argv = argv_02(data, out, 2, "--knn-every", "1")
    run_distributed(_two_process_run_recording_the_scored_network, 2, argv, str(tmp_path))
    saved = torch.load(os.path.join(out, "backbone.pt"), weights_only=True)
    for epoch in (0, 1):
        states = [torch.load(str(tmp_path / f"scored-rank{r}-epoch{epoch}.pt"), weights_only=True) for r in (0, 1)]
        for key in states[0]:
            assert torch.equal(states[0][key], states[1][key]), f"epoch {epoch}: {key} differs between the ranks"
    assert all(torch.equal(states[0][key], saved[key]) for key in saved)
    assert knn_records(out)[-1][1] == torch.load(str(tmp_path / "knn04.pt"))


# ---------------------------------------------------------------- the device data path

def ks_distance(a, b):
    """The two-sample Kolmogorov-Smirnov statistic of two 1-D samples."""
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    grid = np.concatenate([a, b])
    return np.abs(np.searchsorted(a, grid, side="right") / len(a) - np.searchsorted(b, grid, side="right") / len(b)).max()


@pytest.mark.parametrize("height, width", [(64, 64), (32, 48), (30, 200)])
def test_device_crops_are_drawn_like_random_resized_crop(height, width):
    """Area share and aspect of 20,000 crops against torchvision's get_params on the same image size
    (30 x 200 often ends in the centre-crop fallback): KS distance below its 0.1% critical value."""
    n = 20000
    views = pretrain.SimCLRViews(16)
    box = views.sample(torch.full((n,), height), torch.full((n,), width), torch.Generator().manual_seed(0))["box"]
    torch.manual_seed(0)
    image = torch.zeros(3, height, width)
    reference = torch.tensor([torchvision.transforms.RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3])
                              for _ in range(n)])
    critical = 1.95 * math.sqrt(2 / n)
    for ours, theirs in ((box[:, 2] * box[:, 3], reference[:, 2] * reference[:, 3]),  # area
                         (box[:, 3] / box[:, 2], reference[:, 3] / reference[:, 2]),  # aspect w / h
                         (box[:, 0] / (height - box[:, 2] + 1), reference[:, 0] / (height - reference[:, 2] + 1))):
        assert ks_distance(ours, theirs) < critical
    assert ((box[:, 0] + box[:, 2] <= height) & (box[:, 1] + box[:, 3] <= width) & (box[:, 2:] > 0).all(1)).all()


@pytest.mark.parametrize("jitter", ["simclr", "mocov2"])
def test_device_flip_jitter_grayscale_and_blur_rates_and_ranges(jitter):
    n = 40000
    p = pretrain.SimCLRViews(16, jitter).sample(torch.full((n,), 32), torch.full((n,), 32),
                                                torch.Generator().manual_seed(1))
    for key, rate in (("flip", 0.5), ("jitter", 0.8), ("gray", 0.2), ("blur", 0.5)):
        assert abs(p[key].float().mean().item() - rate) < 4 * math.sqrt(rate * (1 - rate) / n), key
    b, c, s, h = extract.JITTER[jitter]
    for column, (low, high) in enumerate([(1 - b, 1 + b), (1 - c, 1 + c), (1 - s, 1 + s), (-h, h)]):
        values = p["factor"][:, column]
        assert values.min() >= low and values.max() <= high  # uniform over the range, as ColorJitter draws
        assert ks_distance(values, np.random.default_rng(column).uniform(low, high, n)) < 1.95 * math.sqrt(2 / n)
    assert p["sigma"].min() >= 0.1 and p["sigma"].max() <= 2.0
    orders = torch.unique(p["order"], dim=0, return_counts=True)[1]
    assert len(orders) == 24 and orders.min() > 0.8 * n / 24  # every order of the four jitters, equally often


def test_simclr_jitter_is_the_default_and_twice_moco_v2s():
    assert extract.JITTER["simclr"] == (0.8, 0.8, 0.8, 0.2) and extract.JITTER["mocov2"] == (0.4, 0.4, 0.4, 0.1)
    assert pretrain.parser.get_default("jitter") == "simclr" and pretrain.parser.get_default("data_path") == "pil"
    jitter = [t for t in extract.train_transform(16).transforms if isinstance(t, torchvision.transforms.RandomApply)][0]
    assert jitter.transforms[0].brightness == pytest.approx((0.2, 1.8)) and jitter.transforms[0].hue == (-0.2, 0.2)


def test_device_augmentations_equal_torchvision_functional_ops():
    generator = torch.Generator().manual_seed(2)
    x = torch.rand(6, 3, 20, 24, generator=generator)
    factor = 0.6 + 0.8 * torch.rand(6, generator=generator)
    shift = 0.2 * torch.rand(6, generator=generator) - 0.1
    functional = torchvision.transforms.functional
    for op, reference, f in ((0, functional.adjust_brightness, factor), (1, functional.adjust_contrast, factor),
                             (2, functional.adjust_saturation, factor), (3, functional.adjust_hue, shift)):
        expected = torch.stack([reference(image, float(value)) for image, value in zip(x, f)])
        torch.testing.assert_close(pretrain.COLOUR_OPS[op](x, f).clamp(0, 1), expected, atol=2e-6, rtol=0)
    sigma = 0.1 + 1.9 * torch.rand(6, generator=generator)
    expected = torch.stack([functional.gaussian_blur(image, [5, 5], [float(s)] * 2) for image, s in zip(x, sigma)])
    torch.testing.assert_close(pretrain.gaussian_blur(x, sigma, 5), expected, atol=1e-6, rtol=0)
    images = [(255 * torch.rand(3, h, w, generator=generator)).byte() for h, w in ((40, 30), (33, 50))]
    box = torch.tensor([[2, 3, 20, 15], [1, 2, 30, 40]])
    expected = torch.stack([functional.resized_crop(image.float() / 255, *b.tolist(), [16, 16], antialias=True)
                            for image, b in zip(images, box)])
    torch.testing.assert_close(pretrain.resized_crops(images, box, 16), expected, atol=1e-6, rtol=0)


def test_device_views_are_the_same_for_the_same_generator_and_normalised(tmp_path):
    images = [(255 * torch.rand(3, 24, 24, generator=torch.Generator().manual_seed(i))).byte() for i in range(8)]
    views = pretrain.SimCLRViews(16)
    a = views(images, torch.Generator().manual_seed(5))
    b = views(images, torch.Generator().manual_seed(5))
    assert a.shape == (8, 3, 16, 16) and torch.equal(a, b)
    assert not torch.equal(a, views(images, torch.Generator().manual_seed(6)))


@pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")  # torchvision 0.29 points to torchcodec
@pytest.mark.parametrize("cache", [False, True])
def test_the_device_path_trains_and_resumes_exactly(run, tmp_path, monkeypatch, cache):
    """02 --data-path device on the CPU: interrupted after epoch 0 and resumed, the same losses as an
    uninterrupted run; with --cache-images the same again (the views do not depend on the cache)."""
    data, out = run
    extra = ["--data-path", "device"] + (["--cache-images"] if cache else [])
    whole = str(tmp_path / "whole")
    shutil.copytree(out, whole)
    pretrain.main(argv_02(data, whole, 2, *extra))
    with monkeypatch.context() as patch:
        patch.setattr(torch.utils.data.DistributedSampler, "set_epoch", interrupt_at_epoch(1))
        with pytest.raises(SystemExit):
            pretrain.main(argv_02(data, out, 2, *extra))
    pretrain.main(argv_02(data, out, 2, *extra))
    assert step_losses(out) == step_losses(whole) and len(step_losses(out)) == 8
    if cache:
        plain = str(tmp_path / "plain")
        shutil.copytree(whole, plain)
        for name in ("checkpoint.pt", "pretrain_log.jsonl", "backbone.pt"):
            os.remove(os.path.join(plain, name))
        pretrain.main(argv_02(data, plain, 2, "--data-path", "device"))
        assert step_losses(plain) == step_losses(whole)


# ---------------------------------------------------------------- the device path through loader workers

def as_jpegs(folder, dest):
    """A copy of an ImageFolder tree with every image re-encoded as JPEG."""
    for path in sorted(glob.glob(os.path.join(folder, "**", "*.png"), recursive=True)):
        target = os.path.join(dest, os.path.relpath(path, folder))[:-4] + ".jpg"
        os.makedirs(os.path.dirname(target), exist_ok=True)
        Image.open(path).convert("RGB").save(target, quality=90)
    return dest


def device_epoch(paths, workers, rank=0, world=1):
    """One epoch of the device path's (views, ids) batches on the CPU, as rank `rank` of `world`."""
    args = argparse.Namespace(image_size=SIZE, jitter="simclr", cache_images=False, workers=workers,
                              loader_timeout=60, seed=0)
    source = pretrain.DeviceViews(paths, args, torch.device("cpu"))
    sampler = torch.utils.data.DistributedSampler(source, num_replicas=world, rank=rank, seed=0, drop_last=True)
    return [batch for batch, _ in source.batches(sampler, 3, 0)]


def same_device_batches_with_workers(rank, world, paths):
    torch.set_num_threads(1)
    expected = device_epoch(paths, 0, rank, world)
    assert len(expected) == len(paths) // world // 3
    for workers in (1, 2):
        got = device_epoch(paths, workers, rank, world)
        assert len(got) == len(expected)
        for (views, ids), (views0, ids0) in zip(got, expected):
            assert torch.equal(ids, ids0) and torch.equal(views, views0)


@pytest.mark.parametrize("kind, processes", [("png", 1), ("jpeg", 2)])
def test_device_path_batches_through_loader_workers_equal_the_in_process_ones(prepared, tmp_path, kind, processes):
    """--workers 1 and 2 against --workers 0: PNG on one process, JPEG on two."""
    data, _ = prepared
    train = os.path.join(data, "train") if kind == "png" else as_jpegs(os.path.join(data, "train"), str(tmp_path))
    paths, _, _ = extract.list_images(train)
    if processes == 1:
        same_device_batches_with_workers(0, 1, paths)
    else:
        run_distributed(same_device_batches_with_workers, processes, paths)


def test_two_processes_finish_an_epoch_on_the_device_path_with_a_loader_worker(prepared, tmp_path):
    data, base_run = prepared
    jpegs = str(tmp_path / "jpegs")
    as_jpegs(os.path.join(data, "train"), os.path.join(jpegs, "train"))
    out = str(tmp_path / "run")
    extract.main(stage_argv(jpegs, out, SIZE, BATCH, "--diagnostic-samples", "8"))
    argv = [*argv_02(jpegs, out, 1), "--data-path", "device"]
    argv[argv.index("--workers") + 1] = "1"
    done = torchrun(2, "02_pretrain.py", argv)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(step_losses(out)) == 32 // BATCH and os.path.isfile(os.path.join(out, "backbone.pt"))
