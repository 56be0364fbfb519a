"""The paper's ablations (Tables 2-5, the augmentation, Figure 4's BN arms) on real photos, at the
README's real-photo recipe: every arm with the same seeds, each arm beside its baseline.

  python tests/ablations.py --data DATA --out runs/ablations [--seeds 0 1 2] [--arms default,t3_half]
  python tests/ablations.py --out runs/ablations --table        # the table of what has finished

DATA is an ImageFolder root (train/, val/), e.g. the CIFAR-10 photos of ../shared/data. Each arm
runs 01 (or reuses the same seed's init of the same 01 flags), 02, 04's kNN and 04's linear probe
on cached features, on two CPU processes (torchrun), and keeps its folder: a rerun skips what is
done, and the same seeds reproduce every number. Not a paper stage.
"""
import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NET = ["--arch", "resnet18", "--image-size", "16"]
RECIPE_01 = ["--batch-size", "200"]
RECIPE_02 = ["--batch-size", "16", "--epochs", "5", "--warmup-epochs", "1", "--lr", "4", "--hard-k", "10"]
PROBE = ["--cached-features", "--standardize", "--lr", "1", "--epochs", "30", "--batch-size", "100"]
GAUSS, NO_SMOOTHING = ["--init", "random"], ["--alpha", "0"]

# name: (what it is, 01 flags, 02 flags); "{n2}" and "{n8}" are N/2 and N/8 sampled classes.
ARMS = {
    "default": ("defaults: prior rows, MLP head, alpha 0.2, k 10, SimCLR jitter, running BN", [], []),
    "t2_no_mlp": ("Table 2: no MLP head (prior rows, alpha 0.2, k 10)", ["--head", "linear"], []),
    "t2_mlp": ("Table 2: MLP head (Gaussian rows, alpha 0); Table 3: all classes", GAUSS, NO_SMOOTHING),
    "t2_prior": ("Table 2: + the prior (alpha 0)", [], NO_SMOOTHING),
    "t3_half": ("Table 3: M = N/2 sampled classes (Gaussian rows, alpha 0)", GAUSS, NO_SMOOTHING + ["--sample-classes", "{n2}"]),
    "t3_eighth": ("Table 3: M = N/8 sampled classes (Gaussian rows, alpha 0)", GAUSS, NO_SMOOTHING + ["--sample-classes", "{n8}"]),
    "t4_gauss_3x": ("Table 4: Gaussian rows, 3x steps (alpha 0)", GAUSS, NO_SMOOTHING + ["--epochs", "15"]),
    "t4_prior_3x": ("Table 4: prior rows, 3x steps (alpha 0)", [], NO_SMOOTHING + ["--epochs", "15"]),
    "t5_alpha01": ("Table 5: alpha 0.1 (k 10)", [], ["--alpha", "0.1"]),
    "t5_alpha03": ("Table 5: alpha 0.3 (k 10)", [], ["--alpha", "0.3"]),
    "t5_k5": ("Table 5: k 5 (alpha 0.2)", [], ["--hard-k", "5"]),
    "t5_k20": ("Table 5: k 20 (alpha 0.2)", [], ["--hard-k", "20"]),
    "aug_mocov2": ("augmentation: MoCo v2's colour jitter", [], ["--jitter", "mocov2"]),
    "bn_fixed": ("Figure 4: fixed BNs (eval mode) in the prior pass", ["--bn", "fixed"], []),
    "bn_ema": ("Figure 4: running averages in the prior pass", ["--bn", "ema"], []),
    "device": ("the device data path (--data-path device)", [], ["--data-path", "device"]),
}


def run(stage, argv, log):
    """torchrun 2 processes, one thread each; output appended to `log`; stop the grid on a failure."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", os.path.join(ROOT, stage), *argv]
    with open(log, "a") as f:
        done = subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=f,
                              stderr=subprocess.STDOUT, text=True)
    if done.returncode:
        sys.exit(f"{stage} {' '.join(argv)} failed (exit {done.returncode}); see {log}")


def run_arm(name, seed, args, num_train):
    _, flags_01, flags_02 = ARMS[name]
    flags_02 = [f.format(n2=num_train // 2, n8=num_train // 8) for f in flags_02]
    out = os.path.join(args.out, name, f"seed{seed}")
    common = ["--data", args.data, "--out", out, "--workers", "1", "--seed", str(seed)]
    if os.path.isfile(os.path.join(out, "linear_eval_cached.json")):
        return
    os.makedirs(out, exist_ok=True)
    log = os.path.join(out, "stages.log")
    init = os.path.join(args.out, "init", "_".join(flags_01).replace("-", "") or "prior", f"seed{seed}")
    if not os.path.isfile(os.path.join(init, "init.pt")):
        os.makedirs(init, exist_ok=True)
        run("01_extract_init.py", ["--data", args.data, "--out", init, "--workers", "1", "--seed", str(seed),
                                   *NET, *RECIPE_01, *flags_01], os.path.join(os.path.dirname(init), f"seed{seed}.log"))
    for name_ in ("init.pt", "data.json"):
        if not os.path.isfile(os.path.join(out, name_)):
            shutil.copy(os.path.join(init, name_), out)
    if not os.path.isfile(os.path.join(out, "backbone.pt")):
        run("02_pretrain.py", [*common, *NET, *RECIPE_02, *flags_02], log)
    for backbone, extra, result in ((os.path.join(out, "backbone.pt"), ["--knn"], "knn.json"),
                                    (os.path.join(out, "backbone.pt"), PROBE, "linear_eval_cached.json")):
        if not os.path.isfile(os.path.join(out, result)):
            run("04_linear_eval.py", [*common, "--pretrained", backbone, *extra], log)


def run_random(seed, args):
    out = os.path.join(args.out, "random", f"seed{seed}")
    common = ["--data", args.data, "--out", out, "--workers", "1", "--seed", str(seed), *NET]
    for extra, result in ((["--knn"], "knn_random.json"), (PROBE, "linear_eval_cached_random.json")):
        if not os.path.isfile(os.path.join(out, result)):
            os.makedirs(out, exist_ok=True)
            run("04_linear_eval.py", [*common, "--pretrained", "random", *extra], os.path.join(out, "stages.log"))


def measures(folder, suffix=""):
    """{measure: value} of one finished arm folder."""
    def load(name):
        path = os.path.join(folder, name + suffix + ".json")
        return json.load(open(path)) if os.path.isfile(path) else None
    knn, probe, found = load("knn"), load("linear_eval_cached"), {}
    if knn:
        found.update(knn20=knn["results"]["20"]["top1"], knn200=knn["results"]["200"]["top1"])
    if probe:
        found["probe"] = probe["top1"]
    log = os.path.join(folder, "pretrain_log.jsonl")
    curve = [r["knn_top1"] for r in map(json.loads, open(log)) if "knn_top1" in r] if os.path.isfile(log) else []
    if curve and knn:
        found["curve_minus_04"] = curve[-1] - knn["results"]["20"]["top1"]
    return found


def seed_folders(out, arm):
    """The arm's seed folders (seed0, seed1, ...) found under `out`, sorted."""
    folder = os.path.join(out, arm)
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def retrieval(init_folder_log):
    """01's same-class top-1 retrieval (%) from its log, or None."""
    if not os.path.isfile(init_folder_log):
        return None
    found = re.findall(r"same-class top-1 retrieval of the \w+ rows: ([\d.]+)%", open(init_folder_log).read())
    return float(found[-1]) if found else None


def table(args):
    def cell(values):
        if not values:
            return "-"
        return f"{statistics.mean(values):.1f} ({min(values):.1f}-{max(values):.1f})" if len(values) > 1 else f"{values[0]:.1f}"
    lines = ["| arm | seeds | kNN top-1 k=20 | kNN top-1 k=200 | linear probe top-1 | prior retrieval |",
             "| --- | --- | --- | --- | --- | --- |"]
    rows = [(name, what, ARMS[name][1]) for name, (what, _, _) in ARMS.items()] + [("random", "the random network", None)]
    for name, what, flags_01 in rows:
        seeds = seed_folders(args.out, name)
        found = [measures(os.path.join(args.out, name, s), "_random" if name == "random" else "") for s in seeds]
        found = [f for f in found if "probe" in f]
        got = {key: [f[key] for f in found if key in f] for key in ("knn20", "knn200", "probe")}
        init = os.path.join(args.out, "init", "_".join(flags_01 or []).replace("-", "") or "prior")
        ret = [retrieval(os.path.join(init, s + ".log")) for s in seeds] if flags_01 is not None and "--init" not in flags_01 else []
        lines.append(f"| {what} | {len(found)} | {cell(got['knn20'])} | {cell(got['knn200'])} | {cell(got['probe'])} | "
                     f"{cell([r for r in ret if r is not None])} |")
    found = [measures(os.path.join(args.out, n, s)) for n in ARMS
             for s in seed_folders(args.out, n)]
    gaps = [abs(m["curve_minus_04"]) for m in found if "curve_minus_04" in m]  # runs with a curve and a 04 kNN
    lines.append(f"\nkNN curve's last point minus 04's kNN (k=20) of the same backbone: at most {max(gaps or [0]):.2f} "
                 f"points over {len(gaps)} runs")
    return "\n".join(lines)


# (what, arm, its baseline, the paper's figure and the sign of arm - baseline there; None: no claim)
COMPARISONS = [
    ("Table 2: + MLP head (prior, smoothing)", "default", "t2_no_mlp", ("58.6 -> 68.2", 1)),
    ("Table 2: + the prior", "t2_prior", "t2_mlp", ("67.3 -> 67.6", 1)),
    ("Table 2: + smoothing", "default", "t2_prior", ("67.6 -> 68.2", 1)),
    ("Table 3: all -> M = N/2 sampled classes", "t3_half", "t2_mlp", ("67.3 -> 64.8-65.5", -1)),
    ("Table 3: all -> M = N/8 sampled classes", "t3_eighth", "t2_mlp", ("67.3 -> 64.8-65.5", -1)),
    ("Table 4: Gaussian -> prior rows, 1x", "t2_prior", "t2_mlp", ("10 ep: 12.4 -> 27.4", 1)),
    ("Table 4: Gaussian -> prior rows, 3x", "t4_prior_3x", "t4_gauss_3x", ("25 ep: 40.8 -> 46.3", 1)),
    ("Table 5: alpha 0.2 -> 0.1", "t5_alpha01", "default", ("68.2 -> 67.7", -1)),
    ("Table 5: alpha 0.2 -> 0.3", "t5_alpha03", "default", ("68.2 -> 67.5", -1)),
    ("Table 5: k 10 -> 5 (paper 100 -> 50)", "t5_k5", "default", ("68.2 -> 68.0", -1)),
    ("Table 5: k 10 -> 20 (paper 100 -> 200)", "t5_k20", "default", ("68.2 -> 67.9", -1)),
    ("Figure 4: running BNs -> fixed BNs", "bn_fixed", "default", ("running best", -1)),
    ("Figure 4: running BNs -> running averages (ema)", "bn_ema", "default", None),
    ("SimCLR's jitter -> MoCo v2's", "aug_mocov2", "default", None),
    ("the PIL data path -> the device path", "device", "default", None),
]


def comparison(args):
    """Each arm against its baseline, seed by seed: mean (range) of the differences in kNN and probe top-1,
    and a verdict on the probe against the paper's direction."""
    lines = ["| comparison | paper (linear top-1) | kNN k=20: arm - base | probe: arm - base | verdict |",
             "| --- | --- | --- | --- | --- |"]
    for what, arm, base, paper in COMPARISONS:
        seeds = seed_folders(args.out, arm)
        pairs = [(measures(os.path.join(args.out, arm, s)), measures(os.path.join(args.out, base, s))) for s in seeds]
        pairs = [(a, b) for a, b in pairs if "probe" in a and "probe" in b]
        cells = []
        for key in ("knn20", "probe"):
            d = [a[key] - b[key] for a, b in pairs]
            spread = f" ({min(d):+.1f} to {max(d):+.1f})" if len(d) > 1 else ""
            cells.append(f"{statistics.mean(d):+.1f}{spread}" if d else "-")
        d = [a["probe"] - b["probe"] for a, b in pairs]
        sign = paper[1] if paper else 0
        verdict = ("-" if not d else "no paper figure" if not sign else "same direction" if all(x * sign > 0 for x in d)
                   else "opposite" if all(x * sign < 0 for x in d) else "within the seed spread")
        if d and sign and len(d) < 3:  # a verdict needs three seeds; fewer show only the sign so far
            verdict = {"same direction": "the paper's sign", "opposite": "the opposite sign"}.get(verdict, "mixed signs")
            verdict += " so far"
        count = "" if len(d) >= 3 else f" ({len(d)} seed{'' if len(d) == 1 else 's'})"
        lines.append(f"| {what} | {paper[0] if paper else '-'} | {cells[0]} | {cells[1]} | {verdict}{count} |")
    return "\n".join(lines)


def detail(args):
    """Seed by seed: kNN top-1 (k=20 / k=200), probe top-1, and the kNN curve's last point minus 04's kNN."""
    lines = ["| arm | seed | kNN k=20 | kNN k=200 | probe | curve - 04 |", "| --- | --- | --- | --- | --- | --- |"]
    for name in list(ARMS) + ["random"]:
        folder = os.path.join(args.out, name)
        for seed in seed_folders(args.out, name):
            m = measures(os.path.join(folder, seed), "_random" if name == "random" else "")
            cells = [f"{m[key]:.1f}" if key in m else "-" for key in ("knn20", "knn200", "probe")]
            curve = f"{m['curve_minus_04']:+.2f}" if "curve_minus_04" in m else "-"
            lines.append(f"| {name} | {seed[4:]} | {' | '.join(cells)} | {curve} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data")
    parser.add_argument("--out", default="runs/ablations")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated arm names")
    parser.add_argument("--table", action="store_true", help="print the table of the finished arms and stop")
    parser.add_argument("--detail", action="store_true", help="with --table: every seed of every arm as well")
    args = parser.parse_args()
    if not args.table:
        num_train = sum(len(files) for _, _, files in os.walk(os.path.join(args.data, "train")))
        for seed in args.seeds:
            run_random(seed, args)
            for name in args.arms.split(","):
                run_arm(name, seed, args, num_train)
    print(table(args) + "\n\n" + comparison(args) + ("\n\n" + detail(args) if args.detail else ""))


if __name__ == "__main__":
    main()
