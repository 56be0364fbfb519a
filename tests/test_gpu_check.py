"""tests/gpu_check.py in its CPU mode: every step runs at toy size and records numbers, not errors."""
import json
import math
import os
import subprocess
import sys

import pytest

import gpu_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def numbers(record, *keys):
    return all(isinstance(record[k], (int, float)) and math.isfinite(record[k]) for k in keys)


@pytest.mark.skipif(bool(os.environ.get("GPU_CHECK_INNER")), reason="inside gpu_check itself")
def test_gpu_check_runs_every_step_at_toy_size_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "gpu_check.py"), str(out), "--cpu-toy"],
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads((out / "gpu_check.json").read_text())
    names = [name for name, *_ in gpu_check.plan(gpu_check.TOY)]
    assert list(report["steps"]) == names and report["failed"] == []
    for name, step in report["steps"].items():
        assert step["status"] == "ok" and "error" not in step, (name, step)
        assert numbers(step, "seconds", "budget_s"), name
    steps = report["steps"]
    assert numbers(steps["machine"], "cpu_count") and steps["machine"]["torch"]
    assert steps["cuda_tests"]["failed"] == 0 and steps["cuda_tests"]["skipped"] + steps["cuda_tests"]["passed"] > 0
    for name in names:
        if name.startswith("softmax_"):
            assert set(steps[name]["variants"]) == set(gpu_check.VARIANTS)
            for row in steps[name]["variants"].values():
                assert numbers(row, "ms_per_step", "x_floor", "peak_gib", "x_floor_memory"), (name, row)
    assert steps["data"]["train_images"] == 32 and steps["data"]["val_images"] == 8
    for path in gpu_check.PATHS:
        run = steps[f"pretrain_{path}"]
        assert numbers(run, "images_per_s", "data_wait", "peak_mem_gib", "projected_recipe_h", "projected_recipe_steps_h")
        assert len(run["loss_curve"]) == 8 and all(math.isfinite(p["loss"]) for p in run["loss_curve"])
        assert 0 <= steps[f"knn_{path}"]["top1"] <= 100
    markdown = (out / "gpu_check.md").read_text()
    assert all(f"| {name} | ok |" in markdown for name in names)
    lines = markdown.splitlines()
    for row in ("| pil | ", "| device | ", "| fp32 | 64 | ours | ", "| bf16 autocast | 64 | sampled", "| 8 | 1 | "):
        assert any(line.startswith(row) for line in lines), row
