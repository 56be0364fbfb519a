"""02_pretrain.py: training, checkpoints, exact resume (also on another process count), outputs."""
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torchvision

from helpers import ROOT, free_port, interrupt_at_epoch, run_distributed, stage

import dist_softmax

extract = stage("01_extract_init")
pretrain = stage("02_pretrain")
torch.set_num_threads(1)

SIZE, BATCH = 16, 8  # 32 instances at 16 px, 4 steps per epoch on one process


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Demo data and a run folder holding 01's init.pt, copied by each test that trains."""
    base = tmp_path_factory.mktemp("pretrain")
    data = extract.make_demo_dataset(str(base / "demo"), num_classes=4, train_per_class=8, val_per_class=0,
                                     image_size=SIZE)
    extract.main(["--data", data, "--out", str(base / "run"), "--arch", "resnet18", "--image-size", str(SIZE),
                  "--batch-size", str(BATCH), "--workers", "0", "--diagnostic-samples", "8"])
    return data, str(base / "run")


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
    lr = pretrain.learning_rate
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


def test_an_interrupted_run_resumes_with_the_same_losses(run, tmp_path, monkeypatch):
    data, out = run
    uninterrupted = str(tmp_path / "uninterrupted")
    shutil.copytree(out, uninterrupted)
    pretrain.main(argv_02(data, uninterrupted, 2))

    with monkeypatch.context() as patch:
        patch.setattr(torch.utils.data.DistributedSampler, "set_epoch", interrupt_at_epoch(1))
        with pytest.raises(KeyboardInterrupt):
            pretrain.main(argv_02(data, out, 2))
    assert not os.path.exists(os.path.join(out, "backbone.pt"))
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
    other = extract.make_demo_dataset(str(tmp_path / "other"), num_classes=3, train_per_class=8,
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
    assert "resumed from" in done.stdout and "saved by 1 process(es), now 2" in done.stdout
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
