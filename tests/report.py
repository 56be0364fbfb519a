"""The results of a run folder as one table: the pretrained backbone beside the random-init one.

  python tests/report.py RUN        # prints the table and writes RUN/report.md

Reads the JSON files the stages wrote (04's knn / linear_eval / semi_F and their _random twins, 05's
transfer results and theirs, 03's hard-class check) and 02's kNN curve. Two results are put side by
side only when they were measured with the same protocol settings (everything but the backbone);
otherwise it stops with one line naming the difference. Not a paper stage.
"""
import argparse
import importlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
extract = importlib.import_module("01_extract_init")  # the project root joins the path first
fail = extract.fail

ARM_KEYS = ("backbone", "init")  # what may differ between the two arms of a row: the backbone itself


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", metavar="RUN", help="the run folder (--out of the stages)")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.out):
        fail(f"{args.out} is not a folder; pass the --out of a run")
    text = report(args.out)
    print(text, end="")
    path = os.path.join(args.out, "report.md")
    extract.atomic_save(text.encode(), path, dump=lambda data, f: f.write(data))
    print(f"wrote {path}")


def report(out):
    """The markdown report of run folder `out`."""
    rows, compared = [], []
    for label, name, metrics in result_pairs(out):
        pretrained, random_init = load(out, name), load(out, name + "_random")
        if pretrained is None and random_init is None:
            continue
        settings = same_settings(out, name, pretrained, random_init)
        if settings is not None:
            compared.append((label, settings))
        for metric, key in metrics:
            cells = [cell(result, key) for result in (pretrained, random_init)]
            rows.append((f"{label} {metric}", *cells))
    about = next((r for r in map(lambda name: load(out, name), ("knn", "linear_eval", "linear_eval_cached", "knn_random")) if r), {})
    lines = [f"# Results of {out}", ""]
    if {"arch", "image_size", "train_images", "val_images", "classes"} <= set(about):
        lines += [f"{about['arch']} at {about['image_size']} px; {about['train_images']} train / "
                  f"{about['val_images']} val images, {about['classes']} classes (chance top-1 "
                  f"{100 / about['classes']:.1f}%).", ""]
    lines += ["| result | pretrained | random init |", "| --- | --- | --- |"]
    lines += [f"| {label} | {a} | {b} |" for label, a, b in rows]
    pairs = [(float(a), float(b)) for _, a, b in rows if "-" not in (a, b)]
    if pairs:
        lines += ["", f"pretrained above random init on {sum(a > b for a, b in pairs)} of {len(pairs)} results"]
    if compared:
        lines += ["", "Both arms of each row were measured with the same settings:"]
        lines += [f"- {label}: {describe(settings)}" for label, settings in compared]
    lines += knn_curve(out) + hard_class_line(out)
    if not rows:
        lines += ["", "no results yet: run 04_linear_eval.py and 05_transfer.py with this --out first"]
    return "\n".join(lines) + "\n"


def result_pairs(out):
    """(row label, result name, [(metric label, key), ...]) of every result the stages may have written."""
    knn = load(out, "knn") or load(out, "knn_random") or {}
    top1 = [("top-1", "top1")]
    pairs = [("kNN", "knn", [(f"top-1 (k={k})", ("results", k, "top1")) for k in knn.get("results", {})]),
             ("linear probe", "linear_eval", top1 + [("top-5", "top5")]),
             ("linear probe (cached features)", "linear_eval_cached", top1 + [("top-5", "top5")])]
    pairs += [(f"semi-supervised {float(f):.0%}", f"semi_{f}", top1) for f in ("0.01", "0.1")]
    names = sorted(n[:-len(".json")] for n in os.listdir(out) if n.startswith("transfer_classify_")
                   and n.endswith(".json") and not n.endswith("_random.json"))
    pairs += [(f"transfer classify {n[len('transfer_classify_'):]}", n, top1) for n in names]
    return pairs + [("transfer detect voc", "transfer_detect_voc", [(k, k) for k in ("AP", "AP50", "AP75")])]


def load(out, name):
    """The JSON result RUN/<name>.json as a dict, None when absent; a broken file is one line."""
    path = os.path.join(out, name + ".json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            result = json.load(f)
    except (OSError, ValueError) as e:
        fail(f"cannot read {path} ({e}); rerun the stage that writes it")
    if not isinstance(result, dict) or not isinstance(result.get("settings", {}), dict):
        fail(f"{path} is not a result of this project's stages; rerun the stage that writes it")
    return result


def cell(result, key):
    """The number at `key` (a key or a path of keys) as '12.3', '-' when absent."""
    for part in key if isinstance(key, tuple) else (key,):
        result = result.get(part) if isinstance(result, dict) else None
    if result is None:
        return "-"
    if not isinstance(result, (int, float)):
        fail(f"a result in {key} is {result!r}, not a number; rerun the stage that writes it")
    return f"{result:.1f}"


def same_settings(out, name, pretrained, random_init):
    """The protocol settings both arms share (None with one arm only); fail() when they differ."""
    if pretrained is None or random_init is None:
        return None
    a, b = ({k: v for k, v in r.get("settings", {}).items() if k not in ARM_KEYS} for r in (pretrained, random_init))
    differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if differ:
        shown = "; ".join(f"{k} {a.get(k)} vs {b.get(k)}" for k in differ[:3])
        fail(f"{out}/{name}.json and {name}_random.json were measured with other settings ({shown}); "
             f"rerun one of them with the other's settings to compare them")
    return a


def describe(settings):
    skip = ("stage", "data", "subset")  # fingerprints: equal, and not worth printing
    return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in sorted(settings.items()) if k not in skip)


def knn_curve(out):
    """02's kNN curve (epochs done, kNN top-1) from RUN/pretrain_log.jsonl, as a table."""
    path = os.path.join(out, "pretrain_log.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        points = [(r["epoch"], r["knn_top1"]) for r in map(json.loads, f) if "knn_top1" in r]
    if not points:
        return []
    return ["", "The kNN curve of pretraining (02, val top-1 with k = 20):", "",
            "| epochs done | kNN top-1 |", "| --- | --- |"] + [f"| {epoch + 1} | {top1:.1f} |" for epoch, top1 in points]


def hard_class_line(out):
    hard = load(out, "hard_classes")
    if not hard or not hard.get("same_class"):
        return []
    same = hard["same_class"]
    return ["", f"03: {100 * same['share_all_k']:.1f}% of the {hard['k']} hard classes of an instance share its "
                f"folder class (chance {100 * same['chance']:.1f}%), mined from {hard['source']}."]


if __name__ == "__main__":
    main()
