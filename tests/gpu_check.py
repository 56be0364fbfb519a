"""One prepared check for a lent GPU (one H100 or H200, 16 CPU cores), under 8 minutes: the GPU
figures the README lacks, in OUT/gpu_check.json and OUT/gpu_check.md (a section ready to paste).

    python tests/gpu_check.py OUT              # on the GPU machine
    python tests/gpu_check.py OUT --cpu-toy    # every step at toy size on the CPU (tests/test_gpu_check.py)

Each step is timed and stopped at its own budget; a failed step is recorded with its error and the
next one runs; the exit code is 1 when any step failed.

  machine                     GPU name and memory, torch and CUDA versions, CPU cores
  cuda_tests                  python -m pytest -q tests -k cuda: passed / failed / skipped
  softmax_<fp32|bf16>_b<B>    tests/bench_dist_softmax.py at N = 1,281,167, D = 128, B = 512 and 4,096,
                              fp32 and bf16 autocast: ms per step, x floor and peak memory of ours, plain
                              autograd and the matmul floor, and of the sampled softmax (M = 65,536)
                              against the B x M x D products
  data                        a generated tiny-ImageNet-shaped set: 200 classes x (100 train + 10 val)
                              64 px JPEGs in train/<wnid>/images/, val/images/ + val/val_annotations.txt
  init                        01_extract_init.py: resnet18, 64 px, batch 512
  pretrain_pil, pretrain_device   2 epochs of 02_pretrain.py at batch 512, 12 loader workers, from the same
                              init.pt, on each data path: images/s, data-wait share, peak memory, the loss
                              per logged step, and the README's 200-epoch tiny-ImageNet recipe projected
                              from the last epoch's time (x 100,000 / images used x 200) and from images/s
  knn_pil, knn_device         04_linear_eval.py --knn on each backbone: top-1 / top-5

The toy mode: N = 20,000, B = 64, M = 2,048, one step; 4 classes x (8 + 2) images of 16 px, batch 8,
no loader workers; OMP_NUM_THREADS=1, up to 4 steps at a time. Step logs go to OUT/logs/; the data
set and run folders to --work (default: a temporary folder, removed at the end).
"""
import argparse
import concurrent.futures
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import demo_data  # noqa: E402

RECIPE_IMAGES, RECIPE_EPOCHS = 100_000, 200  # the README's tiny-ImageNet recipe

# data: (classes, train images per class, val images per class, px); budgets in seconds per step;
# total: the deadline of the whole check; parallel: steps at a time (the toy mode overlaps them)

GPU = {"device": "cuda", "classes": 1_281_167, "sample": 65_536, "batches": (512, 4096), "bench_steps": 10,
       "data": (200, 100, 10, 64), "batch": 512, "workers": 12, "hard_k": 100, "epochs": 2, "env": {},
       "budgets": {"machine": 30, "cuda_tests": 45, "softmax_b512": 40, "softmax_b4096": 50, "data": 20,
                   "init": 40, "pretrain": 50, "knn": 25},  # 465 s in all
       "total": 465, "parallel": 1}
TOY = {"device": "cpu", "classes": 20_000, "sample": 2_048, "batches": (64,), "bench_steps": 1,
       "data": (4, 8, 2, 16), "batch": 8, "workers": 0, "hard_k": 4, "epochs": 2, "env": {"OMP_NUM_THREADS": "1"},
       "budgets": {"machine": 120, "cuda_tests": 120, "softmax_b64": 120, "data": 60, "init": 120, "pretrain": 120,
                   "knn": 120},
       "total": 900, "parallel": 4}
PATHS = ("pil", "device")
WRITING = threading.Lock()
RUNNING = set()  # the process groups of the steps now running
VARIANTS = {"ours": "ours", "plain": "plain autograd", "floor": "matmul floor", "sampled": "sampled (ours, M classes)",
            "sampled_floor": "sampled floor (B x M x D products)"}


class StepFailed(Exception):
    """A step's error, with the tail of its log."""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="folder for gpu_check.json, gpu_check.md and logs/")
    parser.add_argument("--cpu-toy", action="store_true", help="every step at toy size on the CPU")
    parser.add_argument("--work", default=None, help="folder for the data set and run folders (kept)")
    args = parser.parse_args()
    cfg = TOY if args.cpu_toy else GPU
    os.environ.update(cfg["env"])  # every process this check starts (OMP_NUM_THREADS=1 on the CPU)
    out = os.path.abspath(args.out)
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    work = os.path.abspath(args.work) if args.work else tempfile.mkdtemp(prefix="gpu_check_")
    command = "python tests/gpu_check.py OUT" + (" --cpu-toy" if args.cpu_toy else "")
    steps = plan(cfg)
    report = {"command": command, "mode": "cpu-toy" if args.cpu_toy else "gpu", "config": config_record(cfg),
              "steps": {name: {"status": "pending", "budget_s": budget} for name, budget, *_ in steps}}
    ctx = {"cfg": cfg, "out": out, "work": work, "data": os.path.join(work, "data")}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stopped from outside: stop the steps too
    t0 = time.perf_counter()
    try:
        run_plan(steps, ctx, report)
    finally:  # also when stopped from outside: the report says what ran, pending steps stay "pending"
        report["total_s"] = round(time.perf_counter() - t0, 1)
        report["failed"] = [name for name, step in report["steps"].items() if step["status"] != "ok"]
        write_report(report, out)
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {os.path.join(out, 'gpu_check.json')} and gpu_check.md in {report['total_s']:.0f} s; "
          + (f"failed: {', '.join(report['failed'])}" if report["failed"] else "every step ok"))
    return 1 if report["failed"] else 0


def plan(cfg):
    """(name, budget in s, function, steps it needs) in the order they run."""
    budgets = cfg["budgets"]
    steps = [("machine", budgets["machine"], machine, ()), ("cuda_tests", budgets["cuda_tests"], cuda_tests, ())]
    for dtype in ("fp32", "bf16"):
        for batch in cfg["batches"]:
            steps.append((f"softmax_{dtype}_b{batch}", budgets[f"softmax_b{batch}"],
                          lambda ctx, rec, t, d=dtype, b=batch: softmax(ctx, rec, t, d, b), ()))
    steps += [("data", budgets["data"], make_data, ()), ("init", budgets["init"], extract_init, ("data",))]
    steps += [(f"pretrain_{p}", budgets["pretrain"], lambda ctx, rec, t, p=p: pretrain(ctx, rec, t, p), ("init",))
              for p in PATHS]
    steps += [(f"knn_{p}", budgets["knn"], lambda ctx, rec, t, p=p: knn(ctx, rec, t, p), (f"pretrain_{p}",))
              for p in PATHS]
    return steps


def config_record(cfg):
    classes, train, val, size = cfg["data"]
    record = {key: value for key, value in cfg.items() if key not in ("data", "budgets")}
    record["data"] = {"classes": classes, "train_per_class": train, "val_per_class": val, "image_size": size}
    return record


# ---------------------------------------------------------------- running steps

def run_plan(steps, ctx, report):
    """Each step once its needs have finished, in plan order; `parallel` at a time (1 on the GPU,
    so the timings do not overlap; the toy mode overlaps its steps to finish sooner)."""
    deadline, pending, running = time.monotonic() + ctx["cfg"]["total"], list(steps), {}
    with concurrent.futures.ThreadPoolExecutor(ctx["cfg"]["parallel"]) as pool:
        try:
            while pending or running:
                ready = [s for s in pending if all(report["steps"][n]["status"] in ("ok", "failed") for n in s[3])]
                for step in ready[:ctx["cfg"]["parallel"] - len(running)]:
                    pending.remove(step)
                    report["steps"][step[0]]["status"] = "running"
                    running[pool.submit(run_step, step, ctx, report, deadline)] = step
                done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in done:
                    running.pop(future)
                    future.result()
        except BaseException:  # Ctrl-C, SIGTERM: the steps' process groups end with this check
            for proc in list(RUNNING):
                stop(proc)
            raise


def run_step(step, ctx, report, deadline):
    name, budget, function, needs = step
    record = report["steps"][name]
    print(f"[gpu_check] {name} (budget {budget} s)", flush=True)
    t0 = time.perf_counter()
    try:
        missing = [n for n in needs if report["steps"][n]["status"] != "ok"]
        if missing:
            raise StepFailed(f"not run: needs {', '.join(missing)}, which failed")
        left = deadline - time.monotonic()
        if left < 5:
            raise StepFailed(f"not run: the {ctx['cfg']['total']} s of the whole check are spent")
        function(ctx, record, min(budget, left))
        record["status"] = "ok"
    except Exception as e:  # noqa: BLE001 - every failure is recorded, then the next step runs
        record.update(status="failed", error=(str(e) or type(e).__name__)[-4000:])
    record["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"[gpu_check] {name}: {record['status']} in {record['seconds']} s"
          + (f"\n{record['error']}" if "error" in record else ""), flush=True)
    with WRITING:
        write_report(report, ctx["out"])


def run(ctx, name, cmd, timeout, check=True):
    """Run cmd in the repository root, output to OUT/logs/<name>.log; the whole process group is
    stopped at the timeout. Returns (exit code, output)."""
    log_path = os.path.join(ctx["out"], "logs", f"{name}.log")
    env = {**os.environ, "GPU_CHECK_INNER": "1"}
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        RUNNING.add(proc)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop(proc)
            raise StepFailed(f"timed out after {timeout:.0f} s:\n{tail(log_path)}") from None
        finally:
            RUNNING.discard(proc)
    if check and code:
        raise StepFailed(f"exit code {code}:\n{tail(log_path)}")
    with open(log_path) as log:
        return code, log.read()


def stop(proc):
    """SIGTERM to the process group this check started (the stages stop with one line), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def tail(path, lines=15):
    with open(path, errors="replace") as f:
        return "\n".join(f.read().splitlines()[-lines:])


def python(script, *argv):
    return [sys.executable, os.path.join(ROOT, script), *map(str, argv)]


# ---------------------------------------------------------------- the steps

def cuda_tests(ctx, record, timeout):
    cmd = [sys.executable, "-m", "pytest", "-q", "tests", "-k", "cuda", "-p", "no:cacheprovider"]
    code, output = run(ctx, "cuda_tests", cmd, timeout, check=False)
    counts = {kind: 0 for kind in ("passed", "failed", "skipped", "errors")}
    for number, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?)\b", output.splitlines()[-1] if output else ""):
        counts["errors" if kind.startswith("error") else kind] += int(number)
    record.update(command="python -m pytest -q tests -k cuda", exit_code=code, **counts)
    if code or counts["failed"] or counts["errors"] or not sum(counts.values()):
        raise StepFailed(f"pytest exit code {code}:\n{tail(os.path.join(ctx['out'], 'logs', 'cuda_tests.log'))}")


def softmax(ctx, record, timeout, dtype, batch):
    cfg, name = ctx["cfg"], f"softmax_{dtype}_b{batch}"
    result = os.path.join(ctx["out"], "logs", f"{name}.json")
    argv = ["--device", cfg["device"], "--skip-parallel", "--classes", cfg["classes"], "--batch", batch, "--rounds", 1,
            "--steps", cfg["bench_steps"], "--sample-classes", cfg["sample"], "--keep-going", "--json", result]
    argv += (["--bf16"] if dtype == "bf16" else []) + (["--threads", 1] if cfg["device"] == "cpu" else [])
    run(ctx, name, python("tests/bench_dist_softmax.py", *argv), timeout)
    with open(result) as f:
        variants = json.load(f)["single"][str(cfg["classes"])]
    record.update(command=" ".join(["python tests/bench_dist_softmax.py", *map(str, argv[:-2])]), precision=dtype,
                  batch=batch, classes=cfg["classes"], dim=128, sample_classes=min(cfg["sample"], cfg["classes"]),
                  variants=softmax_rows(variants))
    failed = {v: r["error"] for v, r in record["variants"].items() if "error" in r and not r.get("out_of_memory")}
    if failed:
        raise StepFailed("; ".join(f"{v}: {e}" for v, e in failed.items()))


def softmax_rows(variants):
    """Per variant: ms / step, x floor, peak GiB, x floor (sampled against the sampled floor)."""
    rows = {}
    for v in VARIANTS:
        r, base = variants[v], variants["sampled_floor" if v.startswith("sampled") else "floor"]
        if "error" in r:
            rows[v] = {"error": r["error"], "out_of_memory": "out of memory" in r["error"].lower()}
            continue
        rows[v] = {"ms_per_step": 1000 * r["step_s"], "peak_gib": r["peak_gb"],
                   "x_floor": r["step_s"] / base["step_s"] if "step_s" in base else None,
                   "x_floor_memory": r["peak_gb"] / base["peak_gb"] if "peak_gb" in base else None}
    return rows


def make_data(ctx, record, timeout):
    """tiny-ImageNet's layout with demo_data's shapes (class = shape x hue family), in parallel."""
    classes, train, val, size = ctx["cfg"]["data"]
    root = ctx["data"]
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(os.path.join(root, "val", "images"))
    jobs = [(root, c, classes, train, val, size) for c in range(classes)]
    with multiprocessing.get_context("spawn").Pool(min(16, os.cpu_count() or 1)) as pool:  # no fork: threads run
        lines = pool.map_async(make_class, jobs).get(timeout)
    with open(os.path.join(root, "val", "val_annotations.txt"), "w") as f:
        f.writelines(line for per_class in lines for line in per_class)
    record.update(classes=classes, train_images=classes * train, val_images=classes * val, image_size=size,
                  layout="train/<wnid>/images/*.JPEG, val/images/*.JPEG + val/val_annotations.txt")


def make_class(job):
    """One class: its train images (and <wnid>_boxes.txt), its val images; returns its annotation lines."""
    root, c, classes, train, val, size = job
    wnid, shapes = f"n{c:08d}", demo_data.SHAPES
    families = math.ceil(classes / len(shapes))
    folder = os.path.join(root, "train", wnid, "images")
    os.makedirs(folder)
    box = f"0\t0\t{size - 1}\t{size - 1}\n"
    names = [f"{wnid}_{i}.JPEG" for i in range(train)] + [f"val_{c * val + i}.JPEG" for i in range(val)]
    for i, name in enumerate(names):
        rng = np.random.default_rng([0, int(i >= train), c, i])
        image = demo_data.shape_image(rng, shapes[c % len(shapes)], c // len(shapes), families, size)
        image.save(os.path.join(folder if i < train else os.path.join(root, "val", "images"), name), quality=90)
    with open(os.path.join(root, "train", wnid, f"{wnid}_boxes.txt"), "w") as f:
        f.writelines(f"{name}\t{box}" for name in names[:train])
    return [f"{name}\t{wnid}\t{box}" for name in names[train:]]


def stage_argv(ctx, run_dir):
    cfg = ctx["cfg"]
    size = cfg["data"][3]
    return ["--data", ctx["data"], "--out", run_dir, "--arch", "resnet18", "--image-size", size,
            "--workers", cfg["workers"], "--device", cfg["device"]]


def extract_init(ctx, record, timeout):
    run_dir = os.path.join(ctx["work"], "run_init")
    argv = stage_argv(ctx, run_dir) + ["--batch-size", ctx["cfg"]["batch"]]
    _, output = run(ctx, "init", python("01_extract_init.py", *argv), timeout)
    found = re.search(r"rows ready in ([\d.]+) s", output)
    record.update(command=shown("01_extract_init.py", argv), rows_s=float(found.group(1)) if found else None)


def pretrain(ctx, record, timeout, path):
    cfg, run_dir = ctx["cfg"], os.path.join(ctx["work"], f"run_{path}")
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    for name in ("init.pt", "data.json"):  # the same 01 init for both data paths
        shutil.copy(os.path.join(ctx["work"], "run_init", name), run_dir)
    classes, train, _, _ = cfg["data"]
    steps = classes * train // cfg["batch"]
    argv = stage_argv(ctx, run_dir) + ["--batch-size", cfg["batch"], "--epochs", cfg["epochs"], "--warmup-epochs", 1,
                                       "--lr", 0.48, "--hard-k", cfg["hard_k"], "--knn-every", 0,
                                       "--print-freq", max(1, steps // 10), "--data-path", path]
    run(ctx, f"pretrain_{path}", python("02_pretrain.py", *argv), timeout)
    shutil.copy(os.path.join(run_dir, "pretrain_log.jsonl"), os.path.join(ctx["out"], "logs", f"pretrain_{path}.jsonl"))
    with open(os.path.join(run_dir, "pretrain_log.jsonl")) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    record.update(command=shown("02_pretrain.py", argv), data_path=path, train_images=classes * train,
                  **pretrain_figures(lines, classes * train))


def pretrain_figures(lines, images):
    """From 02's log: images/s (views through the backbone, as 02 counts them) and the data-wait share
    over the last epoch's progress lines (the first epoch holds the warm-up), peak memory over all,
    each epoch's time and loss, the loss per logged step, and the recipe's time projected from the
    last epoch's time (with what an epoch costs besides its steps) and from the steps alone."""
    progress = [r for r in lines if "step" in r and "epoch_loss" not in r]
    epochs = [r for r in lines if "epoch_loss" in r]
    last = [r for r in progress if r["epoch"] == epochs[-1]["epoch"]]
    images_per_s = statistics.median(r["images_per_s"] for r in last)
    return {"steps_per_epoch": progress[-1]["steps"], "epoch_s": [r["epoch_s"] for r in epochs],
            "epoch_loss": [r["epoch_loss"] for r in epochs], "images_per_s": images_per_s,
            "data_wait": statistics.mean(r["data_wait"] for r in last),
            "peak_mem_gib": max(r["peak_mem_gib"] for r in progress),
            "loss_curve": [{"global_step": r["global_step"], "epoch": r["epoch"], "loss": r["loss"]} for r in progress],
            "projected_recipe_h": epochs[-1]["epoch_s"] * RECIPE_IMAGES / images * RECIPE_EPOCHS / 3600,
            "projected_recipe_steps_h": 2 * RECIPE_IMAGES * RECIPE_EPOCHS / images_per_s / 3600}


def knn(ctx, record, timeout, path):
    run_dir = os.path.join(ctx["work"], f"run_{path}")
    argv = stage_argv(ctx, run_dir) + ["--knn"]
    run(ctx, f"knn_{path}", python("04_linear_eval.py", *argv), timeout)
    with open(os.path.join(run_dir, "knn.json")) as f:
        result = json.load(f)
    record.update(command=shown("04_linear_eval.py", argv), data_path=path, top1=result["top1"], top5=result["top5"],
                  k=result["k"], val_images=result["val_images"])


def shown(script, argv):
    """The command as the report shows it: the generated data as DATA, run folders as RUN."""
    text = " ".join(["python", script, *map(str, argv)])
    return re.sub(r"--out \S+", "--out RUN", re.sub(r"--data \S+", "--data DATA", text))


# ---------------------------------------------------------------- the machine, the report

MACHINE = """import json, os, torch
info = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "cpu_count": os.cpu_count()}
if torch.cuda.is_available():
    info.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=torch.cuda.get_device_properties(0).total_memory / 2**30)
print(json.dumps(info))"""


def machine(ctx, record, timeout):
    _, output = run(ctx, "machine", [sys.executable, "-c", MACHINE], timeout)
    record.update(json.loads(output.splitlines()[-1]), cpu=cpu_name())
    if ctx["cfg"]["device"] == "cuda" and not record["cuda_available"]:
        raise StepFailed("no CUDA device is visible to torch")


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return None


def write_report(report, out):
    """Both files, after every step: a check stopped from outside still leaves what it measured."""
    for name, text in (("gpu_check.json", json.dumps(report, indent=1)), ("gpu_check.md", markdown(report))):
        with open(os.path.join(out, name + ".tmp"), "w") as f:
            f.write(text)
        os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))


def markdown(report):
    return "\n".join(md_header(report) + md_steps(report) + md_tests(report) + md_softmax(report)
                     + md_pretrain(report) + md_losses(report)) + "\n"


def md_header(report):
    m = report["steps"]["machine"]
    where = (f"{m['gpu']} ({m['gpu_memory_gib']:.1f} GiB)" if "gpu" in m else f"CPU only ({m['cpu']})"
             if "torch" in m else "a machine not yet described")
    versions = f", torch {m['torch']}" + (f" (CUDA {m['cuda']})" if m["cuda"] else "") if "torch" in m else ""
    total = f": {report['total_s']:.0f} s in all" if "total_s" in report else " (still running)"
    return ["### GPU check (`tests/gpu_check.py`)", "",
            f"`{report['command']}` on {where}, {m.get('cpu_count', os.cpu_count())} CPU cores{versions}{total}.", ""]


def md_steps(report):
    rows = ["| step | result | s | budget s |", "| --- | --- | --- | --- |"]
    for name, s in report["steps"].items():
        result = "failed: " + brief(s["error"]) if s["status"] == "failed" else s["status"]
        seconds = f"{s['seconds']:.1f}" if "seconds" in s else "-"
        rows.append(f"| {name} | {result} | {seconds} | {s['budget_s']:.0f} |")
    return rows + [""]


def md_tests(report):
    s = report["steps"]["cuda_tests"]
    if "passed" not in s:
        return []
    return [f"CUDA tests (`{s['command']}`): {s['passed']} passed, {s['failed']} failed, {s['skipped']} skipped"
            + (f", {s['errors']} errors" if s["errors"] else "") + ".", ""]


def md_softmax(report):
    steps = [s for name, s in report["steps"].items() if name.startswith("softmax_") and "variants" in s]
    if not steps:
        return []
    first = steps[0]
    rows = [f"The sharded softmax (`tests/bench_dist_softmax.py`), N = {first['classes']:,}, D = {first['dim']}, "
            f"one process, the median of {report['config']['bench_steps']} timed step(s) after one warm-up, each "
            f"variant in a fresh process; the sampled softmax draws M = {first['sample_classes']:,} classes per step and is "
            "read against the products over those M rows:", "",
            "| precision | batch | variant | ms / step | x floor | peak memory | x floor |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for s in steps:
        precision = "bf16 autocast" if s["precision"] == "bf16" else "fp32"
        for v, r in s["variants"].items():
            if "error" in r:
                cells = ["out of memory" if r["out_of_memory"] else "failed: " + brief(r["error"])] + ["-"] * 3
            else:
                cells = [f"{r['ms_per_step']:.1f}", ratio(r["x_floor"]), f"{r['peak_gib']:.2f} GiB",
                         ratio(r["x_floor_memory"])]
            rows.append(f"| {precision} | {s['batch']:,} | {VARIANTS[v]} | " + " | ".join(cells) + " |")
    return rows + [""]


def md_pretrain(report):
    steps = report["steps"]
    runs = {p: steps[f"pretrain_{p}"] for p in PATHS if "images_per_s" in steps[f"pretrain_{p}"]}
    if not runs:
        return []
    data, cfg, any_run = steps["data"], report["config"], next(iter(runs.values()))
    rows = [f"Pretraining: {data['train_images']:,} train and {data['val_images']:,} val images of {data['classes']} "
            f"generated classes ({data['image_size']} px JPEG, tiny-ImageNet's layout), made in {data['seconds']:.0f} s; "
            f"01 took {steps['init']['seconds']:.0f} s (`{steps['init']['command']}`). Then {cfg['epochs']} epochs of "
            f"`{any_run['command']}` (data path pil or device, the same init.pt), {any_run['steps_per_epoch']} steps "
            f"of {2 * cfg['batch']:,} images (two views per instance) per epoch. Images/s and data wait: over the "
            "last epoch's progress lines. The README's tiny-ImageNet recipe "
            f"({RECIPE_EPOCHS} epochs of {RECIPE_IMAGES:,} images) projected from the last epoch's time "
            f"(x {RECIPE_IMAGES:,} / {data['train_images']:,} x {RECIPE_EPOCHS}) and from images/s alone:", "",
            "| data path | s per epoch | images/s | data wait | peak memory | kNN top-1 / top-5 (04) | "
            "recipe, from epoch time | recipe, from images/s |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for p, r in runs.items():
        k = steps[f"knn_{p}"]
        scored = f"{k['top1']:.2f} / {k['top5']:.2f}" if "top1" in k else "-"
        rows.append(f"| {p} | {', '.join(f'{s:.1f}' for s in r['epoch_s'])} | {r['images_per_s']:,.0f} | "
                    f"{100 * r['data_wait']:.1f}% | {r['peak_mem_gib']:.2f} GiB | {scored} | "
                    f"{r['projected_recipe_h']:.2f} h | {r['projected_recipe_steps_h']:.2f} h |")
    return rows + [""]


def md_losses(report):
    curves = {p: report["steps"][f"pretrain_{p}"].get("loss_curve") for p in PATHS}
    curves = {p: {point["global_step"]: point for point in c} for p, c in curves.items() if c}
    if not curves:
        return []
    rows = ["The loss per logged step (mean over the steps since the previous line), both data paths:", "",
            "| step | epoch | " + " | ".join(curves) + " |", "| --- | --- | " + " | ".join("---" for _ in curves) + " |"]
    for step in sorted(set().union(*curves.values())):
        epoch = next(c[step]["epoch"] for c in curves.values() if step in c)
        rows.append(f"| {step} | {epoch} | " + " | ".join(f"{c[step]['loss']:.4f}" if step in c else "-"
                                                        for c in curves.values()) + " |")
    return rows + [""]


def ratio(value):
    return f"{value:.2f}" if value is not None else "-"


def brief(error):
    """An error in one line: its first line (what happened) and the last line of the log tail below it."""
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    detail = [line for line in lines[1:] if not line.startswith("$ ")]
    return " ".join(lines[:1] + detail[-1:]).replace("|", "/")[:200]


if __name__ == "__main__":
    sys.exit(main())
