"""Shared test utilities: import a numbered stage, and run a function on W gloo processes."""
import datetime
import importlib
import os
import socket
import subprocess
import sys
import tarfile
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import demo_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def stage(name):
    """Import a stage script by module name, e.g. stage("01_extract_init")."""
    return importlib.import_module(name)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, store, fn, args):
    torch.set_num_threads(1)
    # A file rendezvous: no port that another process could take between choosing and binding it.
    # A collective waiting over 5 minutes raises instead of hanging the suite (a rank that left early).
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(minutes=5))
    try:
        fn(rank, world_size, *args)
    finally:
        dist.barrier()  # gloo may abort a process that leaves before the others
        dist.destroy_process_group()
    # Leave without the interpreter's teardown: gloo's threads can abort it ("terminate called
    # without an active exception", SIGABRT) after a passing check. A failure above still raises.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(fn, world_size, *args):
    """Run fn(rank, world_size, *args) on world_size gloo processes; a failure in any re-raises here."""
    with tempfile.TemporaryDirectory() as folder:
        store = os.path.join(folder, "rendezvous")
        mp.spawn(_worker, args=(world_size, store, fn, args), nprocs=world_size, join=True)


def run_script(script, argv, nproc=None, timeout=300):
    """Run a stage as a user would: `python script argv` (nproc None) or `torchrun
    --nproc_per_node=nproc script argv` (OMP_NUM_THREADS=1 as torchrun sets it). Returns the
    finished subprocess.CompletedProcess with text stdout/stderr."""
    path = os.path.join(ROOT, script if script.endswith(".py") else script + ".py")
    if nproc is None:
        command = [sys.executable, path, *argv]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                   "--master_addr=127.0.0.1", f"--master_port={free_port()}", path, *argv]
    return subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=timeout)


def interrupt_at_epoch(stop_epoch):
    """A DistributedSampler.set_epoch replacement that raises KeyboardInterrupt (Ctrl-C) when epoch
    `stop_epoch` begins, i.e. right after the previous epoch's checkpoint; patch it in to interrupt."""
    def set_epoch(sampler, epoch):
        if epoch == stop_epoch:
            raise KeyboardInterrupt
        sampler.epoch = epoch
    return set_epoch


REAL_PHOTOS = os.path.join(ROOT, "..", "shared", "data", "cifar10-dev.tar")


def real_photos(dest, classes=2, train_per_class=40, val_per_class=10):
    """An ImageFolder subset of the shared CIFAR-10 photos (the first `classes` classes, the first
    images of each) unpacked into dest; None when ../shared/data/cifar10-dev.tar is not there."""
    if not os.path.isfile(REAL_PHOTOS):
        return None
    with tarfile.open(REAL_PHOTOS) as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.endswith(".jpg")),
                         key=lambda m: m.name)
        names = sorted({m.name.split("/")[2] for m in members})[:classes]
        keep = []
        for split, count in (("train", train_per_class), ("val", val_per_class)):
            for name in names:
                keep += [m for m in members if m.name.split("/")[1:3] == [split, name]][:count]
        tar.extractall(dest, members=keep, filter="data")
    return os.path.join(dest, "cifar10-dev")


def stage_argv(data, out, size, batch, *extra):
    """The flags the stage tests share: a resnet18 at `size` px, global batch `batch`, no loader workers."""
    return ["--data", data, "--out", out, "--arch", "resnet18", "--image-size", str(size),
            "--batch-size", str(batch), "--workers", "0", *extra]


def demo_folder(tmp_path_factory, classes, train_per_class, val_per_class, size):
    """A generated ImageFolder data set (tests/demo_data.py) in a fresh temporary folder."""
    root = str(tmp_path_factory.mktemp("demo"))
    return demo_data.make_demo_dataset(root, num_classes=classes, train_per_class=train_per_class,
                                       val_per_class=val_per_class, image_size=size)
