"""Benchmark of dist_softmax.DistCosineSoftmax (not collected by pytest).

(a) One process: forward + backward of the N-way cosine softmax for a batch of 512 embeddings of
    dimension 128, three ways: ours; plain PyTorch autograd (normalize, matmul, cross_entropy);
    and the floor, the three matrix products alone (logits = x w^T, dx = g w, dw = g^T x). Then
    Table 3's sampled softmax (ours with sample=(M, seed), a new seed every step) against its
    floor, the same three products over M rows.
(b) Two processes (torchrun-style, gloo on CPU, NCCL on GPU): the paper's Table 1 comparison,
    ours (DHP: rows sharded) against DDP with the classifier replicated on every rank, one full
    training step of the classifier (forward, backward, SGD with momentum).

Each measurement runs in a fresh process; variants alternate round by round and the medians are
reported: wall time, and the process's CPU time (the fairer figure on a shared machine, with
--threads 1). Peak memory is the process's peak resident memory (VmHWM) on CPU, or the CUDA peak.
--bf16 runs the forward of every variant under bf16 autocast (the floor: its products on bf16
operands); --keep-going records a worker that fails (out of memory) instead of stopping.

    python tests/bench_dist_softmax.py                         # both parts, the issue's sizes
    python tests/bench_dist_softmax.py --classes 200000 --rounds 3 --json bench.json
    python tests/bench_dist_softmax.py --classes 1281167 --batch 8192 --sampled-only --skip-parallel
    python tests/bench_dist_softmax.py --device cuda --skip-parallel --classes 1281167 --batch 4096 --bf16
"""
import argparse
import contextlib
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import dist_softmax  # noqa: E402
SINGLE = ("ours", "plain", "floor", "sampled", "sampled_floor")
PARALLEL = ("dhp", "ddp")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, nargs="+", default=[200_000, 1_281_167])
    parser.add_argument("--parallel-classes", type=int, default=1_281_167)
    parser.add_argument("--batch", type=int, default=512, help="global batch")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process, after one warm-up")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process (CPU)")
    parser.add_argument("--skip-parallel", action="store_true")
    parser.add_argument("--sampled-only", action="store_true", help="(a): only the sampled softmax and its floor")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast around the forward of every variant")
    parser.add_argument("--sample-classes", type=int, default=65536, metavar="M",
                        help="classes in each step of the sampled softmax (Table 3)")
    parser.add_argument("--keep-going", action="store_true",
                        help="record a failed worker (e.g. out of memory) as its error and go on")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--num-classes", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    results = {"machine": machine(args.device), "batch": args.batch, "dim": args.dim, "bf16": args.bf16,
               "sample_classes": args.sample_classes, "single": {}, "parallel": {}}
    precision = "bf16 autocast" if args.bf16 else "fp32"
    for n in args.classes:
        variants = SINGLE[3:] if args.sampled_only else SINGLE
        runs = alternate(variants, args.rounds, lambda v: launch(v, n, args, nproc=1))
        summary = results["single"][n] = summarise(runs)
        if not args.sampled_only:
            print_table(f"(a) one process, N = {n:,}, batch {args.batch}, D = {args.dim}, {precision}",
                        {v: summary[v] for v in SINGLE[:3]}, baseline="floor", extra={"plain": "ours"})
        print_table(f"    sampled softmax, M = {min(args.sample_classes, n):,} of the {n:,} classes, batch {args.batch}",
                    {v: summary[v] for v in SINGLE[3:]}, baseline="sampled_floor", label="floor")
    if not args.skip_parallel:
        n = args.parallel_classes
        runs = alternate(PARALLEL, args.rounds, lambda v: launch(v, n, args, nproc=2))
        results["parallel"][n] = summarise(runs)
        print_table(f"(b) two processes, N = {n:,}, global batch {args.batch}, {precision}: DHP vs DDP",
                    results["parallel"][n], baseline="ddp")
    print(results["machine"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


# ---------------------------------------------------------------- orchestration

def alternate(variants, rounds, run_one):
    runs = {v: [] for v in variants}
    for _ in range(rounds):
        for v in variants:
            runs[v].append(run_one(v))
    return runs


def launch(variant, num_classes, args, nproc):
    worker_args = [os.path.abspath(__file__), "--worker", variant, "--num-classes", str(num_classes),
                   "--batch", str(args.batch), "--dim", str(args.dim), "--steps", str(args.steps),
                   "--device", args.device, "--sample-classes", str(args.sample_classes)]
    worker_args += (["--threads", str(args.threads)] if args.threads else []) + (["--bf16"] if args.bf16 else [])
    if nproc == 1:
        cmd = [sys.executable] + worker_args
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_port", str(free_port())] + worker_args
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not lines:
        if args.keep_going:
            errors = [line for line in out.stderr.splitlines() if line.strip()]
            return {"error": errors[-1] if errors else f"exit code {out.returncode}"}
        raise SystemExit(f"benchmark worker {variant} failed:\n{out.stderr[-3000:]}")
    per_rank = [json.loads(line) for line in lines]
    return {key: max(r[key] for r in per_rank) for key in ("step_s", "cpu_s", "peak_gb")}


def summarise(runs):
    """Medians per variant; a variant with a failed round (--keep-going) keeps its error instead."""
    return {v: {"error": next(r["error"] for r in rs if "error" in r), "rounds": rs} if any("error" in r for r in rs)
            else {**{key: statistics.median(r[key] for r in rs) for key in ("step_s", "cpu_s", "peak_gb")}, "rounds": rs}
            for v, rs in runs.items()}


def print_table(title, summary, baseline, extra=None, label=None):
    label = "x " + (label or baseline)
    print(f"\n{title}")
    print(f"{'variant':>13} {'step (s)':>9} {label:>8} {'CPU (s)':>9} {label:>8} {'peak (GB)':>9} {label:>8}")
    base = summary[baseline]
    for v, s in summary.items():
        if "error" in s:
            print(f"{v:>13} failed: {s['error']}")
            continue
        print(f"{v:>13} {s['step_s']:9.3f} {ratio(s, base, 'step_s'):8.2f} {s['cpu_s']:9.3f} "
              f"{ratio(s, base, 'cpu_s'):8.2f} {s['peak_gb']:9.2f} {ratio(s, base, 'peak_gb'):8.2f}")
    for a, b in (extra or {}).items():
        print(f"{b} / {a}: wall time {ratio(summary[b], summary[a], 'step_s'):.2f}x, "
              f"CPU time {ratio(summary[b], summary[a], 'cpu_s'):.2f}x")


def ratio(s, base, key):
    return s[key] / base[key] if key in s and key in base else float("nan")


def machine(device):
    info = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    if device == "cuda":
        info += ", " + torch.cuda.get_device_name()
    return info


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- one measured process

def worker(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    device = dist_softmax.join_process_group(args.device)
    world, rank = dist_softmax.get_world_size(), dist_softmax.get_rank()
    torch.manual_seed(rank)
    n, d, local_b = args.num_classes, args.dim, args.batch // world
    features = torch.randn(local_b, d, device=device, requires_grad=True)
    labels = torch.randint(0, n, (local_b,), device=device)
    step = build_step(args.worker, n, d, features, labels, device, args.bf16, min(args.sample_classes, n))

    step()  # warm-up
    sync(device)
    base = peak_memory_gb(device, reset=True)
    times, cpu_times = [], []
    for _ in range(args.steps):
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    peak = peak_memory_gb(device)
    result = {"rank": rank, "step_s": statistics.median(times), "cpu_s": statistics.median(cpu_times),
              "peak_gb": peak, "base_gb": base}
    results = [result]
    if world > 1:
        results = [None] * world
        dist.all_gather_object(results, result)
    if rank == 0:
        for r in results:
            print(json.dumps(r), flush=True)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def build_step(variant, n, d, features, labels, device, bf16=False, num_sampled=None):
    tau = 0.15

    def autocast():  # around every variant's forward
        return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    if variant in ("ours", "dhp", "sampled"):
        classifier = dist_softmax.DistCosineSoftmax(n, d, tau).to(device)
        opt = torch.optim.SGD(classifier.parameters(), lr=0.1, momentum=0.9) if variant == "dhp" else None
        seeds = itertools.count()

        def step():
            features.grad = classifier.weight.grad = None
            with autocast():
                loss = classifier(features, labels, sample=(num_sampled, next(seeds)) if variant == "sampled" else None)
            loss.backward()
            if opt:
                opt.step()
        return step
    if variant == "plain" or variant == "ddp":
        weight = torch.nn.Parameter(torch.randn(n, d, device=device) * 0.01)
        module = PlainCosineSoftmax(weight, tau)
        opt = None
        if variant == "ddp":
            module = torch.nn.parallel.DistributedDataParallel(module)
            opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)

        def step():
            features.grad = weight.grad = None
            with autocast():
                loss = module(features, labels)
            loss.backward()
            if opt:
                opt.step()
        return step
    if variant in ("floor", "sampled_floor"):  # the products over all N rows, or over the M sampled
        dtype = torch.bfloat16 if bf16 else torch.float32
        x = F.normalize(features.detach(), dim=1).to(dtype)
        w = F.normalize(torch.randn(n if variant == "floor" else num_sampled, d, device=device), dim=1).to(dtype)

        def step():
            with autocast():
                g = x @ w.t()
                g @ w  # dx
                g.t() @ x  # dw
        return step
    raise ValueError(variant)


class PlainCosineSoftmax(torch.nn.Module):
    """What one writes without this project: the classifier as an ordinary autograd graph."""

    def __init__(self, weight, tau):
        super().__init__()
        self.weight, self.tau = weight, tau

    def forward(self, features, labels):
        logits = F.normalize(features, dim=1) @ F.normalize(self.weight, dim=1).t() / self.tau
        return F.cross_entropy(logits, labels)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    if dist.is_initialized():
        dist.barrier()


def peak_memory_gb(device, reset=False):
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
        if reset:
            torch.cuda.reset_peak_memory_stats()
        return peak
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f)
    peak = int(status["VmHWM"].split()[0]) / 2**20
    if reset:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # restart the peak-RSS counter
    return peak


if __name__ == "__main__":
    main()
