"""The README's quickstart, end to end at a tiny size: every stage under torchrun on 2 processes.

Generated demo data (3 shapes x 6 images at 16 px), then 01 -> 02 (with hard-class smoothing) -> 03
(report) -> 04 kNN and cached linear probe, pretrained and --pretrained none -> 05 classification
transfer, pretrained and scratch -> 05 --task report. Every stage must exit 0 and the report must
list every row with a number in both columns. (At this size the pretrained backbone is not asked to
win: 1 epoch on 18 images says nothing; the full quickstart is where it must.)
"""
import os
import re

import pytest

from helpers import run_script, stage

extract = stage("01_extract_init")

SIZE = "16"


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    base = tmp_path_factory.mktemp("quickstart")
    data, out = str(base / "demo_data"), str(base / "run")
    # The generator behind `01_extract_init.py --make-demo-data`, at a tiny size.
    extract.make_demo_dataset(data, num_classes=3, train_per_class=6, val_per_class=3, image_size=int(SIZE))
    common = ["--data", data, "--out", out, "--workers", "0"]
    net = ["--arch", "resnet18", "--image-size", SIZE]
    steps = [
        ("01_extract_init", [*common, *net, "--batch-size", "6", "--diagnostic-samples", "6"]),
        ("02_pretrain", [*common, *net, "--batch-size", "6", "--epochs", "2", "--warmup-epochs", "1",
                         "--lr", "4", "--hard-k", "2"]),
        ("03_hard_classes", ["--out", out, "--hard-k", "2", "--grid-rows", "2"]),
    ]
    for backbone in (os.path.join(out, "backbone.pt"), "random"):
        steps += [
            ("04_linear_eval", [*common, "--pretrained", backbone, "--batch-size", "6", "--knn"]),
            ("04_linear_eval", [*common, "--pretrained", backbone, "--batch-size", "6", "--cached-features",
                                "--standardize", "--lr", "1", "--epochs", "3"]),
        ]
    for init in (os.path.join(out, "backbone.pt"), "random"):
        steps.append(("05_transfer", [*common, *net, "--task", "classify", "--init", init, "--batch-size", "6",
                                      "--epochs", "1"]))
    outputs = []
    for script, argv in steps:
        done = run_script(script, argv, nproc=2)
        outputs.append((script, argv, done))
        assert done.returncode == 0, f"{script} {' '.join(argv)}:\n{done.stderr[-3000:]}"
    report = run_script("05_transfer", ["--task", "report", "--out", out])
    assert report.returncode == 0, report.stderr[-3000:]
    return out, report.stdout, outputs


def test_every_stage_of_the_quickstart_exits_0_and_the_report_is_written(quickstart):
    out, printed, outputs = quickstart
    assert len(outputs) == 9
    with open(os.path.join(out, "report.md")) as f:
        assert f.read().strip() in printed


@pytest.mark.parametrize("row", ["kNN top-1", "linear probe top-1", "transfer classify imagefolder top-1"])
def test_the_report_has_a_number_beside_each_pretrained_and_random_result(quickstart, row):
    _, printed, _ = quickstart
    lines = [line for line in printed.splitlines() if line.startswith(f"| {row}")]
    assert lines, printed
    for line in lines:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert len(cells) == 3 and all(re.fullmatch(r"\d+\.\d", cell) for cell in cells[1:]), line


def test_the_verdict_line_counts_the_rows_where_pretrained_is_above_random(quickstart):
    _, printed, _ = quickstart
    pairs = [[float(cell) for cell in line.strip("|").split("|")[1:]]
             for line in printed.splitlines() if re.match(r"\| .* \| \d+\.\d \| \d+\.\d \|$", line)]
    above = sum(pretrained > random_init for pretrained, random_init in pairs)
    assert f"pretrained above random init on {above} of {len(pairs)} results" in printed, printed
