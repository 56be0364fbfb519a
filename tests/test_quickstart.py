"""The quickstart (tests/quickstart.sh) end to end at a tiny size, its demo data and its report.

The script itself runs, with its sizes shrunk (3 shapes x 6 images at 16 px, an epoch or two), so a
stage or flag that drifts out of it fails here: every stage under torchrun on 2 processes, then
tests/report.py. (At this size the pretrained backbone is not asked to win; the full quickstart is
where it must, see the README.)
"""
import json
import os
import re
import subprocess

import pytest
from PIL import Image

import demo_data
import report
from helpers import ROOT, stage

extract = stage("01_extract_init")

# The quickstart's sizes and their tiny stand-ins; each must occur in the script.
SHRINK = {"--workers 1": "--workers 0", "--batch-size 200": "--batch-size 6",
          "--batch-size 16 --epochs 40": "--batch-size 6 --epochs 2", "--hard-k 10": "--hard-k 2",
          "--epochs 30 --batch-size 100": "--epochs 3 --batch-size 6", "--epochs 5 --batch-size 32": "--epochs 1 --batch-size 6"}


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    base = tmp_path_factory.mktemp("quickstart")
    data, out = str(base / "demo_data"), str(base / "run")
    demo_data.make_demo_dataset(data, num_classes=3, train_per_class=6, val_per_class=3, image_size=16)
    with open(os.path.join(ROOT, "tests", "quickstart.sh")) as f:
        script = f.read()
    for size, tiny in SHRINK.items():
        assert size in script, f"tests/quickstart.sh no longer holds {size!r}; update SHRINK"
        script = script.replace(size, tiny)
    copy = os.path.join(ROOT, "tests", f".quickstart-{os.getpid()}.sh")  # beside the original: same cd
    try:
        with open(copy, "w") as f:
            f.write(script)
        done = subprocess.run(["bash", copy, data, out], cwd=ROOT, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    finally:
        os.remove(copy)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done.stdout


def test_every_stage_of_the_quickstart_runs_and_the_report_is_written(quickstart):
    out, printed = quickstart
    for name in ("init.pt", "backbone.pt", "hard_classes.json", "knn.json", "knn_random.json", "linear_eval_cached.json",
                 "linear_eval_cached_random.json", "transfer_classify_imagefolder.json",
                 "transfer_classify_imagefolder_random.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    with open(os.path.join(out, "report.md")) as f:
        assert f.read().strip() in printed


@pytest.mark.parametrize("row", ["kNN top-1", "linear probe (cached features) top-1", "transfer classify imagefolder top-1"])
def test_the_report_has_a_number_beside_each_pretrained_and_random_result(quickstart, row):
    _, printed = quickstart
    lines = [line for line in printed.splitlines() if line.startswith(f"| {row}")]
    assert lines, printed
    for line in lines:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert len(cells) == 3 and all(re.fullmatch(r"\d+\.\d", cell) for cell in cells[1:]), line


def test_the_verdict_line_counts_the_rows_where_pretrained_is_above_random(quickstart):
    _, printed = quickstart
    pairs = [[float(cell) for cell in line.strip("|").split("|")[1:]]
             for line in printed.splitlines() if re.match(r"\| .* \| \d+\.\d \| \d+\.\d \|$", line)]
    above = sum(pretrained > random_init for pretrained, random_init in pairs)
    assert f"pretrained above random init on {above} of {len(pairs)} results" in printed, printed


def test_the_report_shows_the_settings_both_arms_share_and_the_knn_curve(quickstart):
    _, printed = quickstart
    assert "- kNN: k [18], temperature 0.07" in printed  # k = 20 and 200 clamped to the 18 images
    assert re.search(r"- linear probe \(cached features\): .*batch size 6.*epochs 3.*lr 1\.0.*standardize True", printed), printed
    assert re.search(r"\| epochs done \| kNN top-1 \|\n\| --- \| --- \|\n\| 2 \| \d+\.\d \|", printed), printed


# ---------------------------------------------------------------- the report's refusals

def write_result(out, name, settings, top1=50.0):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, name + ".json"), "w") as f:
        json.dump({"top1": top1, "top5": 90.0, "settings": settings}, f)


def test_the_report_refuses_arms_measured_with_other_settings(tmp_path, capsys):
    out = str(tmp_path / "run")
    write_result(out, "linear_eval", {"lr": 1.0, "epochs": 30, "backbone": "a"})
    write_result(out, "linear_eval_random", {"lr": 40.0, "epochs": 30, "backbone": "b"}, top1=20.0)
    with pytest.raises(SystemExit) as stopped:
        report.main([out])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.count("\n") == 1
    assert "linear_eval.json and linear_eval_random.json were measured with other settings (lr 1.0 vs 40.0)" in err


def test_the_report_compares_arms_that_differ_only_in_the_backbone(tmp_path, capsys):
    out = str(tmp_path / "run")
    write_result(out, "linear_eval", {"lr": 1.0, "backbone": "a"})
    write_result(out, "linear_eval_random", {"lr": 1.0, "backbone": "b"}, top1=20.0)
    report.main([out])
    printed = capsys.readouterr().out
    assert "| linear probe top-1 | 50.0 | 20.0 |" in printed and "- linear probe: lr 1.0" in printed
    assert "pretrained above random init on 1 of 2 results" in printed  # top-1 above, top-5 equal


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"top1": "high", "settings": {}}'])
def test_a_broken_result_file_is_one_line(tmp_path, capsys, content):
    out = str(tmp_path / "run")
    write_result(out, "linear_eval_random", {})
    with open(os.path.join(out, "linear_eval.json"), "w") as f:
        f.write(content)
    with pytest.raises(SystemExit) as stopped:
        report.main([out])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.count("\n") == 1 and "rerun the stage" in err


# ---------------------------------------------------------------- the demo data

def test_demo_dataset_is_deterministic_imagefolder_with_one_folder_per_shape(tmp_path):
    a = demo_data.make_demo_dataset(str(tmp_path / "a"), num_classes=3, train_per_class=2, val_per_class=1, image_size=16)
    b = demo_data.make_demo_dataset(str(tmp_path / "b"), num_classes=3, train_per_class=2, val_per_class=1, image_size=16)
    paths, labels, classes = extract.list_images(os.path.join(a, "train"))
    assert classes == ["000_circle", "001_ring", "002_square"] and labels == [0, 0, 1, 1, 2, 2]
    assert len(extract.list_images(os.path.join(a, "val"))[0]) == 3
    for p in paths:
        assert open(p, "rb").read() == open(p.replace(a, b, 1), "rb").read()
    with Image.open(paths[0]) as image:
        assert image.size == (16, 16) and image.mode == "RGB"
