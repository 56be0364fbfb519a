"""The fault sweep: what a user who gets something wrong sees, stage by stage, run as a user runs it.

Expected failures print ONE line to stderr ("error: <the problem>; <the fix>"), exit with code 2 and
show no traceback. A run killed with SIGKILL resumes without losing a finished epoch and never leaves
a half-written checkpoint. Every stage accepts a run folder written with another process count.
(The in-process checks of the same messages live in test_01/02/04/05; these run the scripts.)
"""
import argparse
import errno
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import demo_data
from helpers import ROOT, free_port, run_script, stage


extract = stage("01_extract_init")
torch.set_num_threads(1)

SIZE, BATCH = 16, 6  # 3 classes x 6 train / 2 val images at 16 px: 18 instances, 3 per process on 2
STAGES = ["01_extract_init", "02_pretrain", "03_hard_classes", "04_linear_eval", "05_transfer"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("faults") / "demo")
    return demo_data.make_demo_dataset(root, num_classes=3, train_per_class=6, val_per_class=2, image_size=SIZE)


@pytest.fixture(scope="module")
def prepared(data, tmp_path_factory):
    """A run folder holding 01's init.pt for `data` (resnet18, 16 px), copied by the tests that use it."""
    out = str(tmp_path_factory.mktemp("faults") / "run")
    extract.main(["--data", data, "--out", out, "--arch", "resnet18", "--image-size", str(SIZE),
                  "--batch-size", str(BATCH), "--workers", "0", "--diagnostic-samples", "6"])
    return out


@pytest.fixture
def run(prepared, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(prepared, out)
    return out


def network(out=None, data=None, arch="resnet18"):
    return [*(["--data", data] if data else []), *(["--out", out] if out else []),
            "--arch", arch, "--image-size", str(SIZE), "--batch-size", str(BATCH), "--workers", "0"]


def argv_02(data, out, epochs, *extra):
    return [*network(out, data), "--epochs", str(epochs), "--warmup-epochs", "1", "--lr", "4", "--alpha", "0",
            "--print-freq", "1", *extra]


def assert_one_line_failure(done, *needles):
    """Exit code 2, exactly one stderr line starting 'error: ' that names every needle, no traceback."""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, f"exit code {done.returncode}; stderr:\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


# ---------------------------------------------------------------- --help

@pytest.mark.parametrize("script", STAGES)
def test_help_of_every_stage_exits_0_and_shows_the_launch_commands(script):
    done = run_script(script, ["--help"])
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr[-2000:]
    assert f"python {script}.py" in done.stdout
    assert "torchrun --nproc_per_node" in done.stdout and "--nnodes" in done.stdout


# ---------------------------------------------------------------- missing, empty and odd data folders

@pytest.mark.parametrize("script, extra", [
    ("01_extract_init", []),
    ("02_pretrain", ["--epochs", "1"]),
    ("04_linear_eval", ["--knn"]),
    ("05_transfer", ["--task", "classify", "--epochs", "1"]),
])
def test_a_missing_data_folder_is_one_line_naming_it(script, extra, tmp_path):
    missing = str(tmp_path / "no_such_folder")
    done = run_script(script, [*network(str(tmp_path / "run"), missing), *extra])
    assert_one_line_failure(done, "no_such_folder")


def test_an_empty_train_folder_is_one_line_naming_it(tmp_path):
    os.makedirs(tmp_path / "empty" / "train" / "a")
    done = run_script("01_extract_init", network(str(tmp_path / "run"), str(tmp_path / "empty")))
    assert_one_line_failure(done, os.path.join(str(tmp_path / "empty"), "train"), "no images")


def test_non_image_files_are_skipped(data, tmp_path):
    root = str(tmp_path / "demo")
    shutil.copytree(data, root)
    for junk in ("train/000_circle/notes.txt", "train/.DS_Store", "train/001_ring/Thumbs.db", "train/README"):
        with open(os.path.join(root, junk), "w") as f:
            f.write("not an image")
    out = str(tmp_path / "run")
    done = run_script("01_extract_init", network(out, root) + ["--diagnostic-samples", "6"])
    assert done.returncode == 0, done.stderr[-3000:]
    init = torch.load(os.path.join(out, "init.pt"), weights_only=True)
    assert init["classifier"]["num_classes"] == 18  # the 18 images, none of the 4 other files


@pytest.mark.parametrize("script, extra", [
    ("02_pretrain", ["--epochs", "1", "--alpha", "0", "--workers", "1"]),  # raised inside a loader worker
    ("04_linear_eval", ["--knn", "--pretrained", "random"]),
])
def test_a_truncated_image_is_one_line_naming_the_file(script, extra, data, run, tmp_path):
    root = str(tmp_path / "demo")
    shutil.copytree(data, root)
    bad = os.path.join(root, "train", "001_ring", "00003.png")
    with open(bad, "r+b") as f:
        f.truncate(60)
    paths, _, _ = extract.list_images(os.path.join(root, "train"))
    extract.check_data(run, paths, root, replace=True)  # broken already when the run was made
    done = run_script(script, [*network(run, root), *extra])
    assert_one_line_failure(done, bad)


def test_a_file_with_an_image_name_that_is_not_an_image_is_one_line_naming_it(data, tmp_path):
    root = str(tmp_path / "demo")
    shutil.copytree(data, root)
    bad = os.path.join(root, "train", "002_square", "notes.png")
    with open(bad, "w") as f:
        f.write("this is text")
    done = run_script("01_extract_init", network(str(tmp_path / "run"), root))
    assert_one_line_failure(done, bad)


# ---------------------------------------------------------------- run folders and checkpoints that do not fit

@pytest.mark.parametrize("script, extra", [
    ("02_pretrain", ["--epochs", "1"]),
    ("03_hard_classes", ["--hard-k", "2"]),
    ("04_linear_eval", ["--knn", "--pretrained", "random"]),
])
def test_a_run_folder_made_from_other_data_is_one_line(script, extra, run, tmp_path):
    other = demo_data.make_demo_dataset(str(tmp_path / "other"), num_classes=2, train_per_class=6,
                                      val_per_class=2, image_size=SIZE)
    done = run_script(script, [*network(run, other), *extra])
    assert_one_line_failure(done, "18", other)


def test_02_refuses_an_init_of_another_architecture(data, run):
    done = run_script("02_pretrain", argv_02(data, run, 1, "--arch", "resnet34"))
    assert_one_line_failure(done, "resnet18", "--arch resnet18")


def test_02_refuses_a_checkpoint_of_another_architecture(data, run, tmp_path):
    """A checkpoint.pt copied in from a resnet34 run over the same data: refused, not resumed."""
    other = str(tmp_path / "other")
    extract.main([*network(other, data, "resnet34"), "--diagnostic-samples", "6"])
    subprocess_ok(run_script("02_pretrain", [*argv_02(data, other, 1), "--arch", "resnet34"]))
    shutil.copy(os.path.join(other, "checkpoint.pt"), os.path.join(run, "checkpoint.pt"))
    done = run_script("02_pretrain", argv_02(data, run, 2))
    assert_one_line_failure(done, "checkpoint.pt", "other settings (--arch resnet34)")


def test_02_refuses_a_checkpoint_with_another_class_count(data, run, tmp_path):
    other = demo_data.make_demo_dataset(str(tmp_path / "other"), num_classes=2, train_per_class=6,
                                      val_per_class=0, image_size=SIZE)
    other_run = str(tmp_path / "other_run")
    extract.main([*network(other_run, other), "--diagnostic-samples", "6"])
    subprocess_ok(run_script("02_pretrain", argv_02(other, other_run, 1)))
    shutil.copy(os.path.join(other_run, "checkpoint.pt"), os.path.join(run, "checkpoint.pt"))
    done = run_script("02_pretrain", argv_02(data, run, 2))
    assert_one_line_failure(done, "checkpoint.pt", "other training images")


@pytest.mark.parametrize("script, extra", [
    ("04_linear_eval", ["--knn"]),
    ("05_transfer", ["--task", "classify", "--epochs", "1"]),
])
def test_a_backbone_of_another_architecture_is_one_line(script, extra, data, tmp_path):
    torch.manual_seed(0)
    backbone, _ = extract.build_backbone("resnet34", SIZE)
    path = str(tmp_path / "resnet34.pt")
    torch.save(backbone.state_dict(), path)
    done = run_script(script, [*network(str(tmp_path / "run"), data), "--pretrained", path, *extra])
    assert_one_line_failure(done, path, "resnet18")


# ---------------------------------------------------------------- SIGKILL mid-epoch, then resume

def test_a_run_killed_mid_epoch_resumes_from_its_last_epoch_without_half_written_files(data, run):
    """torchrun on 2 processes, killed (SIGKILL, the whole process group) in epoch 2: checkpoint.pt
    holds epoch 1, loads with weights_only=True, no temporary file is left, and the same command
    resumes at epoch 2 and finishes."""
    argv = argv_02(data, run, 4)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", os.path.join(ROOT, "02_pretrain.py"), *argv]
    log = os.path.join(run, "pretrain_log.jsonl")
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and process.poll() is None:
            steps = [json.loads(line) for line in open(log)] if os.path.isfile(log) else []
            if any(r.get("epoch") == 2 and r.get("step") == 1 for r in steps):
                break
            time.sleep(0.05)
        assert process.poll() is None, "the run ended before it could be killed mid-epoch"
        kill_tree(process.pid)  # the workers too: torchrun starts them in sessions of their own
    finally:
        if process.poll() is None:
            kill_tree(process.pid)
        process.wait()
    # A kill can land while checkpoint.pt is being written; then the next run removes the temp file.
    ckpt = torch.load(os.path.join(run, "checkpoint.pt"), weights_only=True)
    assert ckpt["epoch"] in (1, 2)  # 1 unless the kill came after epoch 2's last step was saved
    done = run_script("02_pretrain", argv, nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = [line for line in done.stdout.splitlines() if line.startswith("resumed:")]
    assert resumed and f"resumed: {ckpt['epoch'] + 1} epoch(s) done" in resumed[0], done.stdout[-2000:]
    assert not [p for p in os.listdir(run) if ".tmp" in p], os.listdir(run)
    final = torch.load(os.path.join(run, "checkpoint.pt"), weights_only=True)
    assert final["epoch"] == 3 and final["step"] == 4 * 3
    assert os.path.isfile(os.path.join(run, "backbone.pt"))


def test_02_removes_a_half_written_checkpoint_left_by_a_kill(data, run):
    half = os.path.join(run, ".tmp-checkpoint.pt1a2b3c")
    with open(half, "wb") as f:
        f.write(b"half a checkpoint")
    done = run_script("02_pretrain", argv_02(data, run, 1))
    assert done.returncode == 0, done.stderr[-3000:]
    assert not os.path.exists(half)
    assert "removed" in done.stdout and ".tmp-checkpoint.pt1a2b3c" in done.stdout


# ---------------------------------------------------------------- another process count at every stage

def test_every_stage_takes_a_run_folder_written_with_another_process_count(data, tmp_path):
    """01 on 1 process, 02 on 2 then resumed on 1, 03 on 2, 04 on 2 (equal to 1), 05 on 2."""
    out = str(tmp_path / "run")
    subprocess_ok(run_script("01_extract_init", [*network(out, data), "--diagnostic-samples", "6"]))
    subprocess_ok(run_script("02_pretrain", argv_02(data, out, 1), nproc=2))
    done = subprocess_ok(run_script("02_pretrain", argv_02(data, out, 2)))
    assert "saved by 2 process(es), now 1" in done.stdout
    subprocess_ok(run_script("03_hard_classes", ["--out", out, "--hard-k", "2", "--grid-rows", "1"], nproc=2))
    knn = ["--data", data, "--out", out, "--batch-size", str(BATCH), "--workers", "0", "--knn", "--knn-k", "1,5"]
    subprocess_ok(run_script("04_linear_eval", knn, nproc=2))
    with open(os.path.join(out, "knn.json")) as f:
        two = json.load(f)
    subprocess_ok(run_script("04_linear_eval", knn))
    with open(os.path.join(out, "knn.json")) as f:
        one = json.load(f)
    assert (two["world_size"], one["world_size"]) == (2, 1)
    assert two["results"] == one["results"]
    subprocess_ok(run_script("05_transfer", [*network(out, data), "--task", "classify", "--epochs", "1"], nproc=2))
    with open(os.path.join(out, "transfer_classify_imagefolder.json")) as f:
        assert json.load(f)["test_images"] == 6


def kill_tree(pid):
    """SIGKILL a process and all its descendants at once (as a crash or a preempted job would)."""
    children = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    for member in reversed(tree):
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


def subprocess_ok(done):
    assert done.returncode == 0, done.stderr[-3000:]
    return done


# ---------------------------------------------------------------- run state that cannot be mixed up

stages = {name: stage(name) for name in STAGES}


def stops_with_one_line(capsys, fn, *argv, code=2):
    """Run a stage's main in this process; it must stop with `code` and one stderr line. Returns the line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        fn(list(argv))
    err = capsys.readouterr().err
    assert stopped.value.code == code and err.count("\n") == 1 and err.startswith("error: "), err
    return err.strip()


def test_a_second_run_on_a_folder_in_use_is_refused(data, run, capsys):
    with open(os.path.join(run, ".lock"), "w") as held:  # what a live run on this folder holds
        held.write("process 4242 on othernode\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        line = stops_with_one_line(capsys, stages["02_pretrain"].main, *argv_02(data, run, 1))
        assert "is in use by another run (process 4242 on othernode)" in line
        assert not os.path.exists(os.path.join(run, "checkpoint.pt"))  # refused before any work


def test_a_run_that_was_killed_leaves_no_lock_behind(data, run):
    with open(os.path.join(run, ".lock"), "w") as f:  # the file of a run that died: no process holds it
        f.write("process 4242 on othernode\n")
    stages["02_pretrain"].main(argv_02(data, run, 1))
    assert os.path.isfile(os.path.join(run, "backbone.pt"))
    with open(os.path.join(run, ".lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released at the end of the stage


def test_a_checkpoint_of_other_data_is_refused_even_without_data_json(data, run, tmp_path, capsys):
    """Two data sets of 18 images with other file names; the run's data.json deleted."""
    other = str(tmp_path / "other")
    shutil.copytree(data, other)
    for split in ("train", "val"):
        os.rename(os.path.join(other, split, "000_circle"), os.path.join(other, split, "000_disc"))
    other_run = str(tmp_path / "other_run")
    extract.main([*network(other_run, other), "--diagnostic-samples", "6"])
    stages["02_pretrain"].main(argv_02(other, other_run, 1))
    os.remove(os.path.join(run, "data.json"))
    shutil.copy(os.path.join(other_run, "checkpoint.pt"), os.path.join(run, "checkpoint.pt"))
    line = stops_with_one_line(capsys, stages["02_pretrain"].main, *argv_02(data, run, 2))
    assert "checkpoint.pt was written with other settings (other training images)" in line
    shutil.copy(os.path.join(other_run, "init.pt"), os.path.join(run, "init.pt"))  # init.pt too
    os.remove(os.path.join(run, "checkpoint.pt"))
    line = stops_with_one_line(capsys, stages["02_pretrain"].main, *argv_02(data, run, 1))
    assert "init.pt was made from other training images" in line


def test_01_refuses_to_replace_the_init_of_a_trained_run_unless_told_to(data, run, capsys):
    stages["02_pretrain"].main(argv_02(data, run, 1))
    before = sha256(os.path.join(run, "init.pt"))
    line = stops_with_one_line(capsys, extract.main, *network(run, data))
    assert "holds a trained run" in line and "--overwrite" in line
    assert sha256(os.path.join(run, "init.pt")) == before
    extract.main([*network(run, data), "--overwrite", "--seed", "1", "--diagnostic-samples", "6"])
    assert sha256(os.path.join(run, "init.pt")) != before


@pytest.mark.parametrize("script, extra", [
    ("01_extract_init", ["--diagnostic-samples", "6"]),
    ("03_hard_classes", ["--hard-k", "2", "--grid-rows", "1"]),
    ("04_linear_eval", ["--knn", "--pretrained", "random"]),
    ("05_transfer", ["--task", "export", "--init", "random"]),
])
def test_every_stage_removes_the_temporary_files_a_killed_run_left(script, extra, data, run, capsys):
    stale = os.path.join(run, ".tmp-result.json8x2k")
    with open(stale, "w") as f:
        f.write("half")
    argv = ["--out", run, *extra] if script == "03_hard_classes" else [*network(run, data), *extra]
    stages[script].main(argv)
    assert not os.path.exists(stale) and f"removed {stale}" in capsys.readouterr().out


def test_03_mines_the_trained_rows_whatever_the_file_times(data, run, capsys):
    stages["02_pretrain"].main(argv_02(data, run, 1))
    os.utime(os.path.join(run, "init.pt"))  # init.pt now newer than checkpoint.pt
    stages["03_hard_classes"].main(["--out", run, "--hard-k", "2", "--grid-rows", "1", "--workers", "0"])
    assert f"rows of {os.path.join(run, 'checkpoint.pt')}, after epoch 0" in capsys.readouterr().out
    with open(os.path.join(run, "hard_classes.json")) as f:
        assert json.load(f)["source"] == "checkpoint.pt"


def test_outputs_get_the_mode_the_umask_gives(data, run):
    stages["02_pretrain"].main(argv_02(data, run, 1))
    for name in ("checkpoint.pt", "backbone.pt", "data.json"):
        assert stat.S_IMODE(os.stat(os.path.join(run, name)).st_mode) == 0o666 & ~extract.UMASK, name


# ---------------------------------------------------------------- broken files: one line naming the file

def write_bytes(path, content):
    with open(path, "wb") as f:
        f.write(content)


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


@pytest.mark.parametrize("script", ["02_pretrain", "03_hard_classes"])
@pytest.mark.parametrize("name, damage", [("checkpoint.pt", "empty"), ("checkpoint.pt", "truncated"),
                                          ("init.pt", "empty"), ("init.pt", "a backbone")])
def test_a_broken_run_file_is_one_line_naming_it(script, name, damage, data, run, capsys):
    if name == "checkpoint.pt":
        stages["02_pretrain"].main(argv_02(data, run, 1))
    path = os.path.join(run, name)
    if damage == "empty":
        write_bytes(path, b"")
    elif damage == "truncated":
        truncate(path)
    else:
        torch.save(extract.build_backbone("resnet18", SIZE)[0].state_dict(), path)
    argv = (argv_02(data, run, 2) if script == "02_pretrain" else
            ["--out", run, "--data", data, "--hard-k", "2", "--workers", "0"])
    line = stops_with_one_line(capsys, stages[script].main, *argv)
    assert path in line


@pytest.mark.parametrize("script, argv, checkpoint", [
    ("04_linear_eval", ["--knn-k", "1", "--pretrained", "random", "--cached-features", "--epochs", "1"],
     "linear_eval_cached_random_checkpoint.pt"),
    ("05_transfer", ["--task", "classify", "--init", "random", "--epochs", "1"],
     "transfer_classify_imagefolder_random_checkpoint.pt"),
])
def test_a_truncated_checkpoint_of_04_or_05_is_one_line(script, argv, checkpoint, data, run, capsys):
    full = [*network(run, data), *argv]
    stages[script].main(full)
    truncate(os.path.join(run, checkpoint))
    full[full.index("--epochs") + 1] = "2"
    assert os.path.join(run, checkpoint) in stops_with_one_line(capsys, stages[script].main, *full)


@pytest.mark.parametrize("content", [b"{not json", b'{"count": 18}', b"[]"])
def test_a_data_json_that_is_not_a_fingerprint_is_one_line(content, data, run, capsys):
    write_bytes(os.path.join(run, "data.json"), content)
    line = stops_with_one_line(capsys, stages["02_pretrain"].main, *argv_02(data, run, 1))
    assert "data.json is not a data fingerprint" in line


# ---------------------------------------------------------------- bad arguments: one line where they are parsed

@pytest.mark.parametrize("script, flag, value", [
    ("02_pretrain", "--epochs", "0"), ("02_pretrain", "--epochs", "-3"), ("02_pretrain", "--warmup-epochs", "nan"),
    ("02_pretrain", "--lr", "-1"), ("02_pretrain", "--weight-decay", "-1"), ("02_pretrain", "--momentum", "-0.5"),
    ("02_pretrain", "--workers", "-1"), ("02_pretrain", "--image-size", "0"), ("01_extract_init", "--image-size", "1"),
    ("01_extract_init", "--dim", "0"), ("02_pretrain", "--print-freq", "0"), ("02_pretrain", "--chunk-size", "0"),
    ("04_linear_eval", "--chunk-size", "-5"), ("03_hard_classes", "--chunk-size", "0"),
    ("03_hard_classes", "--grid-rows", "0"), ("04_linear_eval", "--knn-temperature", "0"),
    ("01_extract_init", "--diagnostic-samples", "0"), ("02_pretrain", "--seed", str(2 ** 40)),
    ("05_transfer", "--epochs", "0"), ("02_pretrain", "--batch-size", "0"), ("02_pretrain", "--temperature", "nan"),
])
def test_a_bad_argument_stops_where_it_is_parsed(script, flag, value, data, tmp_path, capsys):
    out = str(tmp_path / "run")
    argv = ["--data", data, "--out", out, flag, value] + (["--task", "classify"] if script == "05_transfer" else [])
    line = stops_with_one_line(capsys, stages[script].main, *argv)
    assert f"argument {flag}: '{value}' is not" in line and "multiple of" not in line and "lower --lr" not in line
    assert not os.path.exists(out)  # stopped before any work


def test_a_checkpoint_of_another_stage_names_the_stage_not_impossible_flags(data, run, capsys):
    stages["04_linear_eval"].main([*network(run, data), "--pretrained", "random", "--cached-features", "--epochs", "1"])
    shutil.copy(os.path.join(run, "linear_eval_cached_random_checkpoint.pt"), os.path.join(run, "checkpoint.pt"))
    line = stops_with_one_line(capsys, stages["02_pretrain"].main, *argv_02(data, run, 1))
    assert "was written by 04_linear_eval, not 02_pretrain" in line and "None" not in line


def test_a_changed_probe_lr_is_named_by_the_flag_value_not_the_scaled_lr(data, run, capsys):
    argv = [*network(run, data), "--pretrained", "random", "--cached-features", "--epochs", "1", "--lr", "2"]
    stages["04_linear_eval"].main(argv)
    argv[-1] = "3"
    assert "(--lr 2.0)" in stops_with_one_line(capsys, stages["04_linear_eval"].main, *argv)


# ---------------------------------------------------------------- inputs that would be silently wrong

def test_a_symlink_loop_is_listed_once_and_reported(data, tmp_path, capsys):
    root = str(tmp_path / "demo")
    shutil.copytree(data, root)
    os.symlink(".", os.path.join(root, "train", "000_circle", "loop"))
    os.symlink(os.path.join(root, "train", "001_ring"), os.path.join(root, "train", "002_square", "ring"))
    paths, _, _ = extract.list_images(os.path.join(root, "train"))
    assert len(paths) == 18 and "2 folder(s)" in capsys.readouterr().out


def test_an_unreadable_class_folder_is_one_line(data, tmp_path, monkeypatch, capsys):
    root = str(tmp_path / "demo")
    shutil.copytree(data, root)
    locked = os.path.join(root, "train", "001_ring")
    scandir = os.scandir

    def no_permission(path="."):  # what a folder without read permission gives a non-root user
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return scandir(path)

    monkeypatch.setattr(os, "scandir", no_permission)
    line = stops_with_one_line(capsys, lambda _: extract.list_images(os.path.join(root, "train")))
    assert locked in line and "Permission denied" in line


def test_a_16_bit_png_keeps_its_grey(tmp_path):
    path = str(tmp_path / "deep.png")
    Image.fromarray(np.full((8, 8), 30000, dtype=np.uint16)).save(path)
    with Image.open(path) as image:
        assert image.mode.startswith("I")
    assert np.asarray(extract.load_rgb(path)).tolist()[0][0] == [116, 116, 116]  # 30000 / 65535 x 255


def test_a_decompression_bomb_is_one_line_naming_it(data, tmp_path):
    root = str(tmp_path / "demo")
    shutil.copytree(data, root)
    bomb = os.path.join(root, "train", "000_circle", "huge.png")
    Image.new("1", (20000, 10000)).save(bomb)  # 200M pixels in 24 kB
    done = run_script("01_extract_init", network(str(tmp_path / "run"), root))
    assert_one_line_failure(done, bomb, "decompression bomb")


# ---------------------------------------------------------------- the environment, and every rank

def test_an_out_that_is_a_file_is_one_line_before_any_work(data, tmp_path, capsys):
    out = str(tmp_path / "file")
    write_bytes(out, b"")
    line = stops_with_one_line(capsys, stages["04_linear_eval"].main, *network(out, data), "--knn", "--pretrained", "random")
    assert f"--out {out} is a file" in line


def test_an_out_that_cannot_be_written_is_one_line_before_any_work(data, capsys):
    out = "/proc/self/run"  # a folder no process can create, root included
    line = stops_with_one_line(capsys, stages["04_linear_eval"].main, *network(out, data), "--knn", "--pretrained", "random")
    assert f"cannot write to the run folder {out}" in line and "pass an --out you can write to" in line


def test_a_full_disk_while_saving_keeps_the_last_checkpoint(data, run, monkeypatch, capsys):
    stages["02_pretrain"].main(argv_02(data, run, 1))
    before = sha256(os.path.join(run, "checkpoint.pt"))

    real_fsync = os.fsync

    def full_disk(fd):  # the disk fills while the new checkpoint is written
        if "checkpoint" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk)
    line = stops_with_one_line(capsys, stages["02_pretrain"].main, *argv_02(data, run, 2))
    assert "No space left on device" in line and "checkpoint.pt is kept" in line
    assert sha256(os.path.join(run, "checkpoint.pt")) == before
    assert not [p for p in os.listdir(run) if p.startswith(".tmp-")]


class StuckRead(torch.utils.data.Dataset):
    """A data set whose reads never come back (a hung network file system)."""

    def __len__(self):
        return 4

    def __getitem__(self, index):
        time.sleep(60)
        return index


def test_a_stuck_read_ends_the_run_with_one_line_after_the_loader_timeout(tmp_path, capsys):
    args = argparse.Namespace(out=str(tmp_path / "run"), device="cpu", workers=1, loader_timeout=2)
    started = time.time()
    with pytest.raises(SystemExit) as stopped:
        with extract.stage(args) as device:
            for _ in extract.data_loader(StuckRead(), args, device, batch_size=2):
                pass
    assert stopped.value.code == 2 and time.time() - started < 30
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: the data loader stopped delivering batches")
    assert "timed out after 2 seconds" in err and "--loader-timeout" in err


@pytest.mark.parametrize("data_path", ["pil", "device"])
def test_a_killed_loader_worker_ends_the_run_with_one_line(data_path, tmp_path):
    """02 with a loader worker: SIGKILL the worker mid-epoch; 02 stops within a minute, one line."""
    root = demo_data.make_demo_dataset(str(tmp_path / "many"), num_classes=2, train_per_class=100,
                                       val_per_class=0, image_size=SIZE)
    out = str(tmp_path / "run")
    extract.main(["--data", root, "--out", out, "--arch", "resnet18", "--image-size", str(SIZE),
                  "--batch-size", "20", "--workers", "0", "--diagnostic-samples", "4"])
    argv = [*argv_02(root, out, 5, "--data-path", data_path), "--batch-size", "2"]
    argv[argv.index("--workers") + 1] = "1"
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "02_pretrain.py"), *argv], cwd=ROOT,
                               env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    log, deadline = os.path.join(out, "pretrain_log.jsonl"), time.time() + 120
    while time.time() < deadline and not (os.path.isfile(log) and '"step": 3' in open(log).read()):
        time.sleep(0.05)
    workers = [int(pid) for task in os.listdir(f"/proc/{process.pid}/task")
               for pid in open(f"/proc/{process.pid}/task/{task}/children").read().split()]
    assert workers, "no loader worker found"
    os.kill(workers[0], signal.SIGKILL)
    killed = time.time()
    _, err = process.communicate(timeout=120)
    assert time.time() - killed < 60 and process.returncode == 2, err[-3000:]
    assert err.count("\n") == 1 and err.startswith("error: the data loader stopped delivering batches"), err[-3000:]


def test_when_one_rank_fails_every_rank_says_what_happened(data, tmp_path):
    """01 on 2 processes; an image only process 1 reads is broken: process 1 names it, process 0
    says that process 1 failed; neither prints a traceback."""
    root = str(tmp_path / "demo")
    shutil.copytree(data, root)
    paths, _, _ = extract.list_images(os.path.join(root, "train"))
    rank1_batch = extract.prior_batches(len(paths), BATCH // 2, 0)[1]
    bad = paths[int(rank1_batch[0])]
    truncate(bad)
    done = run_script("01_extract_init", network(str(tmp_path / "run"), root), nproc=2)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode != 0 and len(errors) == 2, done.stderr[-3000:]
    assert any(bad in line for line in errors) and any("another process" in line for line in errors)
    assert "Connection closed by peer" not in done.stderr and "gloo" not in done.stderr.lower()


@pytest.mark.parametrize("signum, code, what", [(signal.SIGINT, 130, "interrupted"),
                                                (signal.SIGTERM, 143, "stopped by SIGTERM")])
def test_ctrl_c_or_sigterm_is_one_line_saying_where_the_run_stands(signum, code, what, data, run):
    argv = argv_02(data, run, 1000)  # ends only by the signal, however loaded the machine
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "02_pretrain.py"), *argv], cwd=ROOT,
                               env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    log = os.path.join(run, "pretrain_log.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.isfile(log) and '"epoch": 1' in open(log).read()):
        time.sleep(0.05)
    process.send_signal(signum)
    try:
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()  # a run the signal did not stop would train for its 1,000 epochs
    assert process.returncode == code, err[-3000:]
    assert err.count("\n") == 1 and err.startswith(f"error: {what}; in epoch ") and "resumes" in err, err


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# ---------------------------------------------------------------- inputs that cannot give a wrong number

def tiny_imagenet_val(data, tmp_path, text):
    """A copy of `data` whose val/ is tiny-ImageNet's layout: val/images/ + val_annotations.txt."""
    root = str(tmp_path / "tiny")
    shutil.copytree(os.path.join(data, "train"), os.path.join(root, "train"))
    images = os.path.join(root, "val", "images")
    os.makedirs(images)
    for path in sorted(glob.glob(os.path.join(data, "val", "*", "*.png")))[:3]:
        shutil.copy(path, os.path.join(images, os.path.basename(os.path.dirname(path)) + ".png"))
    write_bytes(os.path.join(root, "val", "val_annotations.txt"), text if isinstance(text, bytes) else text.encode())
    return root


@pytest.mark.parametrize("text, needle", [
    ("000_circle.png\t000_circle\n000_circle.png\t000_circle\n", "lists 000_circle.png again"),
    ("000_circle.png\t000_circle\n000_circle.png\t001_ring\n", "as 001_ring, an earlier line as 000_circle"),
    ("../../../000_circle.png\t000_circle\n", "outside val/images/"),
    ("/etc/hostname\t000_circle\n", "outside val/images/"),
    (b"000_circle.png\t000_\xff\xfecircle\n", "is not UTF-8"),
])
def test_a_val_annotation_that_would_score_wrongly_is_one_line(text, needle, data, tmp_path, capsys):
    root = tiny_imagenet_val(data, tmp_path, text)
    line = stops_with_one_line(capsys, stages["04_linear_eval"].main, *network(str(tmp_path / "run"), root),
                               "--knn", "--pretrained", "random")
    assert needle in line and "val_annotations.txt" in line


def test_a_val_annotation_with_a_utf8_bom_is_read(data, tmp_path):
    root = tiny_imagenet_val(data, tmp_path, "\ufeff000_circle.png\t000_circle\n001_ring.png\t001_ring\n")
    result = stages["04_linear_eval"].main([*network(str(tmp_path / "run"), root), "--knn", "--pretrained", "random"])
    assert result["val_images"] == 2


@pytest.mark.parametrize("change", ["overwritten", "swapped"])
def test_an_image_changed_in_place_after_01_is_one_line(change, data, tmp_path, capsys):
    root, out = str(tmp_path / "demo"), str(tmp_path / "run")
    shutil.copytree(data, root)
    extract.main([*network(out, root), "--diagnostic-samples", "6"])
    a, b = sorted(glob.glob(os.path.join(root, "train", "*", "*.png")))[:2]
    if change == "overwritten":
        Image.new("RGB", (SIZE, SIZE), (255, 0, 0)).save(a)
    else:
        content_a, content_b = open(a, "rb").read(), open(b, "rb").read()
        write_bytes(a, content_b)
        write_bytes(b, content_a)
    line = stops_with_one_line(capsys, stages["02_pretrain"].main, *argv_02(root, out, 1))
    assert "changed in place since this run's 01" in line


def test_01_reruns_after_its_own_fix(data, tmp_path, capsys):
    root, out = str(tmp_path / "demo"), str(tmp_path / "run")
    shutil.copytree(data, root)
    bad = os.path.join(root, "train", "001_ring", "00002.png")
    truncate(bad)
    line = stops_with_one_line(capsys, extract.main, *network(out, root), "--diagnostic-samples", "6")
    assert bad in line and "remove or replace that file" in line
    os.remove(bad)  # exactly what the line says, then the same command
    extract.main([*network(out, root), "--diagnostic-samples", "6"])
    assert torch.load(os.path.join(out, "init.pt"), weights_only=True)["classifier"]["num_classes"] == 17


@pytest.mark.parametrize("cache", [False, True])
@pytest.mark.parametrize("damage", ["zero bytes", "broken link", "not an image"])
def test_the_device_path_names_a_bad_image_in_one_line(damage, cache, data, run, tmp_path, capsys):
    root = str(tmp_path / "demo")
    shutil.copytree(data, root)
    bad = os.path.join(root, "train", "001_ring", "00003.png")
    os.remove(bad)
    if damage == "broken link":
        os.symlink(str(tmp_path / "gone.png"), bad)
    else:
        write_bytes(bad, b"" if damage == "zero bytes" else b"this is text, not a picture")
    os.remove(os.path.join(run, "data.json"))  # the run was made from this (already broken) data
    argv = [*argv_02(root, run, 1), "--data-path", "device", "--workers", "1"] + (["--cache-images"] if cache else [])
    line = stops_with_one_line(capsys, stages["02_pretrain"].main, *argv)
    assert f"cannot read image {bad}" in line and "remove or replace that file" in line


def test_a_corrupt_jpeg_on_the_device_path_trains_without_decoder_noise(data, tmp_path):
    root = str(tmp_path / "jpeg")
    for path in sorted(glob.glob(os.path.join(data, "train", "*", "*.png"))):
        target = os.path.join(root, "train", os.path.relpath(path, os.path.join(data, "train")))[:-4] + ".jpg"
        os.makedirs(os.path.dirname(target), exist_ok=True)
        Image.open(path).convert("RGB").save(target)
    content = open(target, "rb").read()
    marker = content.find(b"\xff\xda")
    write_bytes(target, content[:marker] + b"\x00\x01\x02" + content[marker:])  # libjpeg: "Corrupt JPEG data"
    out = str(tmp_path / "run")
    extract.main([*network(out, root), "--diagnostic-samples", "6"])
    done = run_script("02_pretrain", [*argv_02(root, out, 1), "--data-path", "device"])
    assert done.returncode == 0 and "Corrupt JPEG" not in done.stderr and done.stderr.strip() == "", done.stderr


def killed_in_the_first_checkpoint_then_rerun(monkeypatch, main, argv):
    """main(argv) killed while writing its first checkpoint (after the epoch's log lines), then run again."""
    real_save = extract.atomic_save

    def killed_in_the_checkpoint(obj, path, **kwargs):
        if path.endswith("checkpoint.pt"):
            raise KeyboardInterrupt
        real_save(obj, path, **kwargs)
    monkeypatch.setattr(extract, "atomic_save", killed_in_the_checkpoint)
    with pytest.raises(SystemExit):
        main(argv)
    monkeypatch.setattr(extract, "atomic_save", real_save)
    main(argv)


def test_the_log_holds_each_step_once_after_a_kill_during_the_first_checkpoint(data, run, monkeypatch):
    killed_in_the_first_checkpoint_then_rerun(monkeypatch, stages["02_pretrain"].main, argv_02(data, run, 2))
    records = [json.loads(line) for line in open(os.path.join(run, "pretrain_log.jsonl"))]
    steps = [(r["epoch"], r["step"]) for r in records if "step" in r]
    assert steps == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)]
    assert [r["epoch"] for r in records if "epoch_loss" in r] == [0, 1]


def test_04s_log_holds_each_epoch_once_after_a_kill_during_a_checkpoint(data, run, monkeypatch):
    argv = [*network(run, data), "--pretrained", "random", "--cached-features", "--epochs", "2"]
    killed_in_the_first_checkpoint_then_rerun(monkeypatch, stages["04_linear_eval"].main, argv)
    records = [json.loads(line) for line in open(os.path.join(run, "linear_eval_cached_random_log.jsonl"))]
    assert [r["epoch"] for r in records] == [0, 1]


@pytest.mark.parametrize("content", [b'{"a": 1}', b"plain text\n", bytes(range(256)) * 4, "folder"])
@pytest.mark.parametrize("script, flag", [("04_linear_eval", "--pretrained"), ("05_transfer", "--init")])
def test_a_backbone_that_is_not_a_checkpoint_is_named_as_such(content, script, flag, data, tmp_path, capsys):
    path = str(tmp_path / "backbone.pt")
    os.mkdir(path) if content == "folder" else write_bytes(path, content)
    extra = ["--knn"] if script == "04_linear_eval" else ["--task", "classify", "--epochs", "1"]
    line = stops_with_one_line(capsys, stages[script].main, *network(str(tmp_path / "run"), data), flag, path, *extra)
    assert line.startswith(f"error: {flag} {path}") or f"{flag} {path}" in line
    assert ("is a folder, not a checkpoint file" if content == "folder" else "not a torch checkpoint") in line
    assert "_pickle" not in line and "weights_only" not in line


def test_05s_missing_backbone_names_its_own_flag(data, tmp_path, capsys):
    line = stops_with_one_line(capsys, stages["05_transfer"].main, *network(str(tmp_path / "run"), data),
                               "--task", "classify", "--epochs", "1")
    assert "--init" in line and "--pretrained" not in line


def voc_with(tmp_path, edit):
    """The demo VOC tree with the first 2007 test annotation rewritten by edit(text) -> text."""
    voc = demo_data.make_demo_voc(str(tmp_path / "voc"), train07=4, test07=3, train12=2)
    path = sorted(glob.glob(os.path.join(voc, "VOCdevkit", "VOC2007", "Annotations", "*.xml")))[-1]
    write_bytes(path, edit(open(path).read()).encode())
    return voc, path


@pytest.mark.parametrize("edit, needle", [
    (lambda t: re.sub(r"<bndbox>.*?</bndbox>", "", t, count=1, flags=re.S), "no <bndbox>"),
    (lambda t: re.sub(r"<name>.*?</name>", "", t, count=1), "unknown class None"),
    (lambda t: re.sub(r"<xmin>\d+</xmin>", "<xmin>ten</xmin>", t, count=1), "with numeric xmin"),
    (lambda t: re.sub(r"<xmax>\d+</xmax>", "<xmax>1</xmax>", t, count=1), "is empty or outside"),
    (lambda t: re.sub(r"<ymax>\d+</ymax>", "<ymax>5000</ymax>", t, count=1), "is empty or outside"),
    (lambda t: re.sub(r"<name>\w+</name>", "<name>unicorn</name>", t, count=1), "unknown class 'unicorn'"),
    (lambda t: t[:len(t) // 2], "is not a readable VOC annotation"),
    (lambda t: '<?xml version="1.0"?><!DOCTYPE a [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;">'
               '<!ENTITY c "&b;&b;&b;&b;&b;&b;">]><annotation>&c;</annotation>' + t, "is not a readable VOC annotation"),
])
def test_a_bad_voc_annotation_is_one_line_before_training(edit, needle, tmp_path, capsys):
    voc, path = voc_with(tmp_path, edit)
    out = str(tmp_path / "run")
    torch.manual_seed(0)
    os.makedirs(out)
    torch.save(extract.build_backbone("resnet18", 224)[0].state_dict(), os.path.join(out, "backbone.pt"))
    argv = ["--task", "detect", "--data", voc, "--out", out, "--arch", "resnet18", "--image-size", "224",
            "--batch-size", "2", "--iters", "2", "--min-size", "64", "--test-size", "64", "--max-size", "96",
            "--workers", "1"]
    line = stops_with_one_line(capsys, stages["05_transfer"].main, *argv)
    assert path in line and needle in line
    assert not os.path.exists(os.path.join(out, "transfer_detect_voc_checkpoint.pt"))
