"""Every torch.distributed collective the product calls, checked against what NCCL accepts.

One 2-process gloo run (helpers.run_distributed) goes through the code paths that call
collectives, with torch.distributed's collective functions wrapped so that each call made from a
product file (the six top-level .py files) is recorded: the collective, the calling file, function
and line, every tensor argument (dtype, shape, dense, contiguous) and the reduce op. The paths:
01's main (the prior pass and its row transfer, BN merge, run-folder lock, classifier file), 02's
main for one epoch (hard classes mined and looked up, the sampled softmax, DDP, the kNN curve, the
checkpoint with momentum), 03's main, 04's main for kNN, the cached-feature probe with
--standardize and one epoch of the image probe, and DistCosineSoftmax under CPU bf16 autocast.
Then, for every recorded call:

  * NCCL accepts it, by NCCL_SUPPORT below (the facts of tests/RESULTS.md's section "Collectives
    against NCCL"): the collective exists for NCCL, every dtype is one NCCL carries, the op is one
    NCCL reduces with, and every tensor is dense and contiguous (ProcessGroupNCCL refuses others);
  * tests/RESULTS.md's table has a row for its call site (file and function) naming the
    collective and each dtype, and every row of that table that names this test was recorded, so
    the table cannot rot silently.

What a CPU run cannot show: that each tensor is a CUDA tensor on the process's device (NCCL's
other requirement). RESULTS.md records where each tensor is made; the GPU test in
test_dist_softmax.py runs the softmax on CUDA.
"""
import functools
import json
import os
import re
import sys
import threading

import pytest
import torch
import torch.distributed as dist

import demo_data
from helpers import ROOT, run_distributed, stage, stage_argv

import dist_softmax

PRODUCT_FILES = ("01_extract_init.py", "02_pretrain.py", "03_hard_classes.py", "04_linear_eval.py",
                 "05_transfer.py", "dist_softmax.py")
RESULTS = os.path.join(ROOT, "tests", "RESULTS.md")
SECTION = "## Collectives against NCCL"

# ---------------------------------------------------------------- what NCCL accepts (torch 2.4 - 2.14)

# ProcessGroupNCCL's dtype map: int8, uint8, int32, int64, fp16, bf16, fp32, fp64; bool goes as uint8.
NCCL_DTYPES = {"int8", "uint8", "int32", "int64", "float16", "bfloat16", "float32", "float64", "bool"}
# ProcessGroupNCCL's op map: SUM, PRODUCT, MIN, MAX, AVG (NCCL >= 2.10); no BAND / BOR / BXOR.
NCCL_OPS = {"SUM", "PRODUCT", "MIN", "MAX", "AVG"}
# The collectives ProcessGroupNCCL implements in every torch the requirements admit (2.4 - 2.14).
# all_to_all_single takes uneven split sizes; *_object pickle to uint8 tensors on the current device.
NCCL_SUPPORT = {
    "all_reduce": "reduce", "broadcast": "plain", "reduce": "reduce", "all_gather": "plain",
    "all_gather_into_tensor": "plain", "all_gather_single": "plain", "reduce_scatter": "reduce",
    "reduce_scatter_tensor": "reduce", "reduce_scatter_single": "reduce", "all_to_all": "plain",
    "all_to_all_single": "plain", "barrier": "none", "all_gather_object": "object",
    "broadcast_object_list": "object", "gather": "plain", "scatter": "plain", "send": "plain", "recv": "plain",
}
# Collectives whose op argument sits at this position (default SUM).
OP_POSITION = {"all_reduce": 1, "reduce": 2, "reduce_scatter": 2, "reduce_scatter_tensor": 2,
               "reduce_scatter_single": 2}
WRAPPED = sorted(set(NCCL_SUPPORT) | {"gather_object", "scatter_object_list", "isend", "irecv",
                                      "monitored_barrier", "all_gather_coalesced", "all_reduce_coalesced"})


def nccl_problems(record):
    """Why NCCL would refuse this recorded call ([] if it would not)."""
    name, problems = record["collective"], []
    if name not in NCCL_SUPPORT:
        return [f"{name} is not a collective ProcessGroupNCCL implements"]
    for t in record["tensors"]:
        if t["dtype"] not in NCCL_DTYPES:
            problems.append(f"dtype {t['dtype']} has no NCCL type")
        if t["sparse"] or not t["contiguous"]:
            problems.append(f"a {'sparse' if t['sparse'] else 'non-contiguous'} tensor: NCCL takes dense, "
                            "contiguous tensors only")
    if NCCL_SUPPORT[name] == "reduce" and record["op"] not in NCCL_OPS:
        problems.append(f"reduce op {record['op']} is not one NCCL has")
    if NCCL_SUPPORT[name] in ("plain", "reduce") and not record["tensors"]:
        problems.append("no tensor argument")
    return problems


# ---------------------------------------------------------------- recording the calls

def _qualname(frame):
    """The function a frame runs, as RESULTS.md names it: Class.method, or the enclosing function of
    a comprehension, lambda or nested function (before Python 3.11, without co_qualname: the plain
    name, a comprehension standing for the function around it)."""
    code = frame.f_code
    if hasattr(code, "co_qualname"):
        return code.co_qualname.split(".<locals>")[0]
    while code.co_name.startswith("<") and frame.f_back is not None and frame.f_back.f_code.co_filename == code.co_filename:
        frame = frame.f_back
        code = frame.f_code
    return code.co_name


def _describe(name, frame, args, kwargs, product):
    tensors = []
    objects = name in ("all_gather_object", "broadcast_object_list")

    def visit(value):
        if isinstance(value, torch.Tensor):
            tensors.append({"dtype": str(value.dtype).replace("torch.", ""), "shape": list(value.shape),
                            "sparse": value.is_sparse,
                            "contiguous": (not value.is_sparse) and (value.is_contiguous() or (
                                value.dim() == 4 and value.is_contiguous(memory_format=torch.channels_last)))})
        elif isinstance(value, (list, tuple)) and not objects:  # tensor lists; split sizes are ints
            for item in value:
                visit(item)

    for value in list(args) + list(kwargs.values()):
        visit(value)
    if objects:
        tensors = []  # arbitrary objects: torch pickles them into uint8 tensors on the current device
    op = None
    if name in OP_POSITION:
        op = kwargs.get("op", args[OP_POSITION[name]] if len(args) > OP_POSITION[name] else dist.ReduceOp.SUM)
        op = str(getattr(op, "name", op)).split(".")[-1]
    via = frame.f_back  # the nearest product function above the call site (who called a row collective)
    while via is not None and os.path.abspath(via.f_code.co_filename) not in product:
        via = via.f_back
    return {"collective": name, "file": os.path.basename(frame.f_code.co_filename), "function": _qualname(frame),
            "line": frame.f_lineno, "tensors": tensors, "op": op,
            "via_file": via and os.path.basename(via.f_code.co_filename), "via": via and _qualname(via)}


def install_recorder(records):
    """Wrap torch.distributed's collectives (and dist_softmax's aliases of two of them): a call whose
    caller is a product file is appended to `records`; calls those make inside torch are not."""
    product = {os.path.join(ROOT, f) for f in PRODUCT_FILES}
    state = threading.local()

    def wrap(name, fn):
        @functools.wraps(fn)
        def recorded(*args, **kwargs):
            caller = sys._getframe(1)
            if not getattr(state, "inside", False) and os.path.abspath(caller.f_code.co_filename) in product:
                records.append(_describe(name, caller, args, kwargs, product))
            outer, state.inside = getattr(state, "inside", False), True
            try:
                return fn(*args, **kwargs)
            finally:
                state.inside = outer
        return recorded

    for name in WRAPPED:
        if hasattr(dist, name):
            setattr(dist, name, wrap(name, getattr(dist, name)))
    dist_softmax._all_gather = wrap(dist_softmax._all_gather.__name__, dist_softmax._all_gather)
    dist_softmax._reduce_scatter = wrap(dist_softmax._reduce_scatter.__name__, dist_softmax._reduce_scatter)


# ---------------------------------------------------------------- the 2-process run

SIZE, BATCH = 16, 8  # 4 classes x 4 train / 2 val images at 16 px


def run_paths(rank, world_size, data, base, record_dir):
    torch.set_num_threads(1)
    records = []
    install_recorder(records)
    extract, pretrain, hard = stage("01_extract_init"), stage("02_pretrain"), stage("03_hard_classes")
    evaluation = stage("04_linear_eval")
    out = os.path.join(base, "run")
    try:
        extract.main(stage_argv(data, out, SIZE, BATCH, "--diagnostic-samples", "4"))
        pretrain.main(["--data", data, "--out", out, "--arch", "resnet18", "--image-size", str(SIZE),
                       "--batch-size", str(BATCH), "--workers", "0", "--epochs", "1", "--warmup-epochs", "0",
                       "--alpha", "0.2", "--hard-k", "3", "--sample-classes", "10", "--knn-every", "1",
                       "--print-freq", "1"])
        hard.main(["--out", out, "--hard-k", "3", "--image-size", str(SIZE), "--grid-rows", "1",
                   "--grid-cols", "2"])
        evaluation.main(stage_argv(data, out, SIZE, BATCH, "--knn", "--knn-k", "3"))
        evaluation.main(stage_argv(data, out, SIZE, BATCH, "--epochs", "1", "--cached-features", "--standardize"))
        evaluation.main(stage_argv(data, out, SIZE, BATCH, "--epochs", "1"))
        # The softmax under bf16 autocast (as on CUDA, here on CPU): what reaches the collectives.
        classifier = dist_softmax.DistCosineSoftmax(16, 8)
        features = torch.randn(2, 8, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = classifier(features.bfloat16(), torch.tensor([rank, rank + 2]), torch.tensor([[5], [7]]), 0.2)
        loss.backward()
    finally:
        with open(os.path.join(record_dir, f"rank{rank}.json"), "w") as f:
            json.dump(records, f)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    base = tmp_path_factory.mktemp("collectives")
    data = demo_data.make_demo_dataset(str(base / "data"), num_classes=4, train_per_class=4, val_per_class=2,
                                       image_size=SIZE)
    record_dir = base / "records"
    record_dir.mkdir()
    run_distributed(run_paths, 2, data, str(base), str(record_dir))
    records = []
    for rank in range(2):
        with open(record_dir / f"rank{rank}.json") as f:
            records += json.load(f)
    return records


# ---------------------------------------------------------------- tests/RESULTS.md's table

WRAPPERS = {"all_gather_rows", "reduce_scatter_rows", "each_shard"}  # dist_softmax's row collectives
COLUMNS = ("site", "via", "collective", "tensors", "op", "nccl", "covered")


def results_rows():
    """The rows of the table under SECTION, as dicts of COLUMNS (cells as written)."""
    with open(RESULTS) as f:
        text = f.read()
    assert SECTION in text, f"{RESULTS} has no section {SECTION!r}"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) != len(COLUMNS) or set(cells[0]) <= set("-: "):
            continue
        if cells[0].lower().startswith("call site"):
            continue  # the header
        rows.append(dict(zip(COLUMNS, cells)))
    assert rows, f"no table rows under {SECTION!r} in {RESULTS}"
    return rows


def _names(cell):
    return set(re.findall(r"`([^`]+)`", cell))


def _has(cell, file, function):
    """Whether a cell names this file and function (Class.method matches a plain method name too)."""
    names = _names(cell)
    return file in names and (function in names or any(n.rsplit(".", 1)[-1] == function for n in names))


def row_matches(row, record):
    """Whether a table row describes this recorded call: the call site, who called it (for the row
    collectives), the collective, every dtype and the op."""
    if not _has(row["site"], record["file"], record["function"]):
        return False
    if record["function"] in WRAPPERS and not _has(row["via"], record["via_file"], record["via"]):
        return False
    if record["collective"] not in _names(row["collective"]):
        return False
    if any(not re.search(rf"\b{t['dtype']}\b", row["tensors"]) for t in record["tensors"]):
        return False
    return record["op"] is None or record["op"] in row["op"]


def static_call_sites():
    """(file, function, collective) of every literal collective call in the product files: the
    `dist.<collective>(...)` calls and dist_softmax's `_all_gather` / `_reduce_scatter` aliases."""
    import ast
    aliases = {"_all_gather": dist_softmax._all_gather.__name__, "_reduce_scatter": dist_softmax._reduce_scatter.__name__}
    sites = set()

    def walk(node, file, scope, in_function):
        for child in ast.iter_child_nodes(node):
            inner, inner_function = scope, in_function
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not in_function:
                # a nested function counts as its enclosing function (as _qualname strips <locals>)
                inner = scope + (child.name,)
                inner_function = not isinstance(child, ast.ClassDef)
            if isinstance(child, ast.Call):
                f = child.func
                if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "dist" \
                        and f.attr in WRAPPED:
                    sites.add((file, ".".join(scope), f.attr))
                elif isinstance(f, ast.Name) and f.id in aliases:
                    sites.add((file, ".".join(scope), aliases[f.id]))
            walk(child, file, inner, inner_function)

    for file in PRODUCT_FILES:
        with open(os.path.join(ROOT, file)) as f:
            walk(ast.parse(f.read()), file, (), False)
    return sites


# ---------------------------------------------------------------- the checks

def test_every_recorded_collective_is_one_nccl_accepts(recorded):
    assert len({(r["file"], r["function"]) for r in recorded}) >= 10, "too few call sites were reached"
    refused = {f"{r['file']}:{r['line']} {r['function']}: {r['collective']}": nccl_problems(r)
               for r in recorded if nccl_problems(r)}
    assert not refused, f"NCCL would refuse: {refused}"


def test_results_table_has_a_row_for_every_recorded_call(recorded):
    rows = results_rows()
    missing = {}
    for r in recorded:
        matches = [row for row in rows if row_matches(row, r)]
        if not matches:
            dtypes = ", ".join(t["dtype"] for t in r["tensors"])
            key = f"{r['file']} {r['function']} (from {r['via_file']} {r['via']}): {r['collective']} [{dtypes}] {r['op']}"
            missing[key] = r["line"]
        else:
            assert all(row["nccl"].startswith("✓") for row in matches), f"{r} is NCCL-supported; its row says not"
    assert not missing, f"{RESULTS} lacks rows for these recorded calls (file line): {missing}"


def test_every_table_row_this_test_covers_was_recorded_with_every_dtype_it_lists(recorded):
    stale = []
    for row in results_rows():
        if "test_collectives" not in row["covered"]:
            continue
        hits = [r for r in recorded if row_matches(row, r)]
        listed = {d for d in NCCL_DTYPES | {"complex64", "float8"} if re.search(rf"\b{d}\b", row["tensors"])}
        seen = {t["dtype"] for r in hits for t in r["tensors"]}
        if not hits or listed - seen:
            stale.append((row["site"], row["via"], row["collective"], sorted(listed - seen)))
    assert not stale, f"rows of {RESULTS} that name test_collectives but were not recorded as written: {stale}"


def test_every_collective_call_in_the_product_has_a_row():
    """A static scan, so call sites this run does not reach (05's detection, torchrun's teardown) are
    in the table too."""
    rows = results_rows()
    sites = static_call_sites()
    assert len(sites) >= 10
    missing = [site for site in sites
               if not any(_has(row["site"], site[0], site[1]) and site[2] in _names(row["collective"]) for row in rows)]
    assert not missing, f"{RESULTS} has no row for these collective calls (file, function, collective): {missing}"


def test_the_check_refuses_what_nccl_refuses():
    """nccl_problems itself: each thing ProcessGroupNCCL refuses is named."""
    def call(name, dtype="float32", op=None, sparse=False, contiguous=True):
        return {"collective": name, "op": op,
                "tensors": [{"dtype": dtype, "shape": [2], "sparse": sparse, "contiguous": contiguous}]}
    assert nccl_problems(call("all_reduce", op="SUM")) == []
    assert nccl_problems(call("all_reduce", "bool", op="MAX")) == []  # sent as uint8
    assert nccl_problems(call("all_reduce", op="BAND"))
    assert nccl_problems(call("broadcast", "complex64"))
    assert nccl_problems(call("broadcast", "uint16"))
    assert nccl_problems(call("broadcast", sparse=True))
    assert nccl_problems(call("broadcast", contiguous=False))
    assert nccl_problems(call("monitored_barrier"))  # gloo only
    assert nccl_problems({"collective": "barrier", "op": None, "tensors": []}) == []
