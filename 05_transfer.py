"""Stage 05: transfer of the pretrained backbone: fine-tuned classification, VOC detection, export.

The paper's transfer experiments (Tables 8-10) ask whether instance-classification features carry
over to other tasks. Three tasks, one command each, all starting from RUN/backbone.pt (02):

--task classify  end-to-end fine-tuning on a labelled set (Tables 9-10): an ImageFolder root
    (ROOT/train, ROOT/val) or torchvision's CIFAR10, CIFAR100, DTD, SUN397, INaturalist, Flowers102
    read from a local --data root (--download hands torchvision's own download switch through).
    The model is 04's fine-tuning one (the backbone + a new linear head on the pooled features,
    nothing frozen, BN in train mode). SGD, momentum 0.9, weight decay 1e-4, head lr 0.1 at batch
    256 (scaled linearly, printed), backbone lr x --backbone-lr-scale (0.1; 1 for --init scratch),
    cosine decay set every step, 100 epochs; top-1/top-5 on the whole test split (each process a
    contiguous shard, every image counted once) after every epoch. Splits: CIFAR train/test;
    DTD and Flowers102 train+val / test (partition 1 for DTD); SUN397 the first official partition
    (Training_01.txt / Testing_01.txt from the dataset's Partitions.zip, placed in --data);
    iNaturalist 2018 (Table 9) the official train2018.json / val2018.json split of
    --data/2018 (other years: 2017, 2019 likewise; 2021: 2021_train / 2021_valid folders).
    Images <= 64 px are trained with pad-and-crop + flip, larger ones with random resized crop +
    flip; evaluation resizes and centre-crops. The paper upsamples CIFAR to 224 (--image-size 224).

--task detect  PASCAL VOC detection (Table 8): torchvision's Faster R-CNN with our ResNet under an
    FPN, trained on VOC 2007 trainval + 2012 trainval and tested on VOC 2007 test, read with
    torchvision.datasets.VOCDetection from --data (holding VOCdevkit/VOC2007, VOCdevkit/VOC2012).
    Normalisation follows MoCo's VOC protocol, which the paper uses: every layer is fine-tuned and
    BatchNorm is trained, not frozen, in the backbone and in the FPN (self-supervised features
    have other statistics than supervised ones, so frozen ImageNet-style BN hurts them). With
    several CUDA processes BN is SyncBatchNorm, so its statistics cover the whole batch of 16; in
    one process it is plain BN in train mode over that process's batch (the same statistics when
    the batch is the same). --det-norm frozen instead keeps the pretrained statistics fixed
    (FrozenBatchNorm2d; the FPN then has no norm), for runs with only one or two images per
    process. Recipe defaults are MoCo's detectron2 VOC schedule: batch 16, lr 0.02, 24k
    iterations, lr x 0.1 at 18k and 22k, 100 warm-up iterations, weight decay 1e-4, training short
    side drawn from 480..800 (step 32), test short side 800, horizontal flip. Difficult objects are
    kept for training (as detectron2 does) and ignored in evaluation.
    The evaluator here is VOC-style: per class and IoU threshold 0.50:0.05:0.95, detections sorted
    by score are matched to the ground truth box of highest IoU; a match to a difficult box counts
    neither way; a second detection of one box is a false positive; AP is the area under the
    precision envelope at every recall point (all-point interpolation, VOC 2010+).
    Reported: AP (mean over classes and thresholds), AP50, AP75. detectron2, whose numbers the paper
    quotes, scores VOC 2007 with the older 11-point interpolation: --ap-metric 11-point.

--task export  writes the backbone (strictly loaded) as
    RUN/backbone_torchvision.pth  a plain state_dict in torchvision's key names, for torchvision and
                                  mmdetection (init_cfg=dict(type="Pretrained", checkpoint=...));
    RUN/backbone_detectron2.pkl   detectron2's format: a Python pickle of {"model": {name: numpy
                                  array}, "__author__": ..., "matching_heuristics": True} with
                                  detectron2's names (stem.conv1, stem.conv1.norm, res2..res5, each
                                  block's conv1/conv2/conv3 with .norm, shortcut, shortcut.norm).
                                  It holds numpy arrays, so it is NOT a torch.load(weights_only=True)
                                  file; detectron2 reads it with MODEL.WEIGHTS path.pkl (the
                                  matching heuristics also map res5 onto an R50-C4 box head).

--task report  prints every result found in RUN as one table, the pretrained backbone beside the
    random-init one (04's kNN / linear probe / semi-supervised JSON and their _random twins, the
    transfer JSON and their _scratch twins, 03's hard-class check), counts the rows where the
    pretrained one is above, and writes it to RUN/report.md.

Each task writes RUN/transfer_<task>_<dataset>.json (settings and results; with --init scratch
RUN/transfer_<task>_<dataset>_scratch.json, beside it); classify and detect resume from the
checkpoint of that name (_checkpoint.pt) when the same command is run again.

Commands:
  python 05_transfer.py --task classify --data demo_data --out runs/demo --arch resnet18 --image-size 64 \\
      --epochs 10 --batch-size 64
  python 05_transfer.py --task detect --make-demo-voc demo_voc      # a small generated VOC folder
  python 05_transfer.py --task detect --data demo_voc --out runs/demo --arch resnet18 --image-size 64 \\
      --batch-size 4 --iters 20 --warmup-iters 5 --lr-steps 16 --min-size 96 --test-size 96 --max-size 160
  python 05_transfer.py --task export --out runs/demo --arch resnet18 --image-size 64
  python 05_transfer.py --task report --out runs/demo                # the results table
  python 05_transfer.py --task classify --dataset cifar10 --data /datasets/cifar --out runs/in1k --image-size 224
  torchrun --nproc_per_node=8 05_transfer.py --task detect --data /datasets/voc --out runs/in1k
  torchrun --nproc_per_node=8 05_transfer.py --task classify --dataset inaturalist --data /datasets/inat \\
      --out runs/in1k
  torchrun --nnodes=8 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
      05_transfer.py --task classify --dataset inaturalist --data /datasets/inat --out runs/in1k
--init defaults to RUN/backbone.pt; it also takes a 02 checkpoint, a torchvision-named ResNet
state_dict (the supervised baseline), or `scratch`. --image-size picks the stem as in pretraining
(<= 64: the small-image stem), so pass the pretraining's value for detect and export.
"""
import argparse
import importlib
import json
import math
import os
import pickle
import random
import time
import xml.etree.ElementTree as ET

import numpy as np
import torch
import torch.distributed as dist
import torchvision
from PIL import Image
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchvision import transforms
from torchvision.transforms import functional as TF

import dist_softmax as dsm

extract = importlib.import_module("01_extract_init")
pretrain = importlib.import_module("02_pretrain")
linear = importlib.import_module("04_linear_eval")

CLASSIFY_SETS = ("imagefolder", "cifar10", "cifar100", "dtd", "sun397", "inaturalist", "flowers102")
VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor")

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
extract.add_common_args(parser, epochs=100, batch_size=None, data_required=False)
parser.add_argument("--task", required=True, choices=["classify", "detect", "export", "report"])
parser.add_argument("--init", "--pretrained", metavar="PATH|scratch",
                    help="backbone to start from (default RUN/backbone.pt): RUN/backbone.pt, a 02 checkpoint.pt, a "
                         "torchvision-named ResNet state_dict; scratch (or none): random initialisation")
parser.add_argument("--dataset", choices=CLASSIFY_SETS + ("voc",),
                    help="classify: imagefolder (default) or a torchvision set; detect: voc")
parser.add_argument("--download", action="store_true", help="let torchvision download the dataset into --data")
parser.add_argument("--lr", type=float, default=None,
                    help="head lr at batch 256 for classify (default 0.1), lr at batch 16 for detect (0.02); "
                         "scaled linearly with --batch-size")
parser.add_argument("--backbone-lr-scale", type=float, default=None,
                    help="classify: backbone lr = head lr x this (default 0.1; 1 with --init scratch)")
parser.add_argument("--momentum", type=float, default=0.9)
parser.add_argument("--weight-decay", type=float, default=1e-4)
parser.add_argument("--inat-version", default="2018", choices=["2017", "2018", "2019", "2021"])
parser.add_argument("--iters", type=int, default=24000, help="detect: training iterations")
parser.add_argument("--lr-steps", type=int, nargs="*", default=[18000, 22000], help="detect: lr x 0.1 at these")
parser.add_argument("--warmup-iters", type=int, default=100, help="detect: linear warm-up iterations")
parser.add_argument("--min-size", type=int, nargs="+", default=list(range(480, 801, 32)),
                    help="detect: training short side, drawn per batch from these")
parser.add_argument("--test-size", type=int, default=800, help="detect: test short side")
parser.add_argument("--max-size", type=int, default=1333, help="detect: longest side cap")
parser.add_argument("--voc-train", nargs="+", default=["2007:trainval", "2012:trainval"], metavar="YEAR:SPLIT")
parser.add_argument("--voc-test", default="2007:test", metavar="YEAR:SPLIT")
parser.add_argument("--det-norm", default="train", choices=["train", "frozen"],
                    help="detect: BN trained (SyncBN over CUDA processes; MoCo's protocol) or frozen")
parser.add_argument("--ap-metric", default="all-point", choices=["all-point", "11-point"])
parser.add_argument("--test-limit", type=int, default=None, help="detect: evaluate on the first N test images")
parser.add_argument("--ckpt-every", type=int, default=1000, help="detect: iterations between checkpoints")
parser.add_argument("--print-freq", type=int, default=20, help="steps between progress lines")
parser.add_argument("--make-demo-voc", metavar="DIR", help="write a small generated VOC-format folder to DIR and exit")


def main(argv=None):
    args = parser.parse_args(argv)
    if args.make_demo_voc:
        make_demo_voc(args.make_demo_voc, seed=args.seed)
        print(f"wrote a generated VOC folder to {args.make_demo_voc} "
              f"(VOCdevkit/VOC2007 trainval + test, VOCdevkit/VOC2012 trainval)")
        return
    if args.task == "classify":
        args.dataset = args.dataset or "imagefolder"
        if args.dataset == "voc":
            extract.fail("--dataset voc is for --task detect; pick one of " + ", ".join(CLASSIFY_SETS))
    if args.task == "detect":
        if args.dataset not in (None, "voc"):
            extract.fail(f"--task detect reads PASCAL VOC only; drop --dataset {args.dataset}")
        args.dataset = "voc"
    if args.task == "report":
        report(args)
        return
    if args.task != "export" and args.data is None:
        extract.fail(f"--task {args.task} needs --data ROOT (the dataset's local folder)")
    args.init = args.init or os.path.join(args.out, "backbone.pt")
    args.init = "random" if args.init in ("scratch", "none") else args.init  # 04's name for a random backbone
    owns_group = not dist.is_initialized()  # a caller's group is left to the caller
    device = dsm.init_distributed(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    {"classify": classify, "detect": detect, "export": export}[args.task](args, device)
    dsm.finish_distributed(owns_group)


# ================================================================ --task classify

def classify(args, device):
    rank, world = dsm.get_rank(), dsm.get_world_size()
    log = print if dsm.is_main() else (lambda *a, **k: None)
    cuda = device.type == "cuda"

    # ---- data ----
    train_tf, test_tf = classify_transforms(args.image_size)
    train_set, test_set, num_classes = classification_sets(args, train_tf, test_tf)
    args.batch_size = args.batch_size or 256
    local_batch = extract.resolve_rank_batch(args.batch_size, world)
    sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True,
                                                  seed=args.seed, drop_last=True)
    loader = torch.utils.data.DataLoader(train_set, batch_size=local_batch, sampler=sampler, drop_last=True,
                                         num_workers=args.workers, pin_memory=cuda)
    if len(loader) == 0:
        extract.fail(f"--batch-size {args.batch_size} exceeds the {len(train_set)} training images; use a smaller one")

    # ---- network: the backbone + a new linear head (04's fine-tuning model, nothing frozen) ----
    backbone, width, described = linear.load_pretrained_backbone(args.init, args.arch, args.image_size, args.seed)
    probe = linear.Probe(backbone, width, num_classes, frozen=False).to(device)
    if cuda:
        probe = probe.to(memory_format=torch.channels_last)
    model = DistributedDataParallel(probe, device_ids=[device] if cuda else None) if world > 1 else probe

    # ---- optimiser: head at lr, backbone at lr x --backbone-lr-scale, cosine (04's set_lr) ----
    lr = args.lr if args.lr is not None else 0.1
    head_lr = lr * args.batch_size / 256
    scale = args.backbone_lr_scale if args.backbone_lr_scale is not None else (1.0 if args.init == "random" else 0.1)
    optimizer = torch.optim.SGD([{"params": probe.fc.parameters(), "lr": head_lr, "base_lr": head_lr},
                                 {"params": probe.backbone.parameters(), "lr": head_lr * scale,
                                  "base_lr": head_lr * scale}],
                                momentum=args.momentum, weight_decay=args.weight_decay)
    log(f"05_transfer classify: {args.dataset}, {len(train_set)} train / {len(test_set)} test images, "
        f"{num_classes} classes, {world} process(es) on {device}, batch {args.batch_size} ({local_batch} per process), "
        f"{len(loader)} steps/epoch, head lr {lr:g} x {args.batch_size}/256 = {head_lr:.6g}, backbone lr x {scale:g}, "
        f"backbone {described}")
    log("args: " + json.dumps(vars(args), sort_keys=True))

    # ---- resume ----
    name = f"transfer_classify_{args.dataset}" + ("_random" if args.init == "random" else "")  # beside the pretrained one
    ckpt_path = os.path.join(args.out, name + "_checkpoint.pt")
    start_epoch, history = 0, []
    if os.path.isfile(ckpt_path):
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if (ckpt["num_classes"], ckpt["arch"], ckpt["image_size"]) != (num_classes, args.arch, args.image_size):
            extract.fail(f"{ckpt_path} is a {ckpt['arch']} run at {ckpt['image_size']} px with {ckpt['num_classes']} "
                         f"classes, not this one; delete it or pass another --out")
        probe.load_state_dict(ckpt["network"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, history = ckpt["epoch"] + 1, ckpt["history"]
        log(f"resumed from {ckpt_path}: {start_epoch} epoch(s) done")
        del ckpt

    # ---- epochs: train (04's image_epoch), then top-1/top-5 on the whole test split ----
    for epoch in range(start_epoch, args.epochs):
        t0 = time.perf_counter()
        pretrain.seed_everything(pretrain.step_seed(args.seed, epoch, rank))  # a resumed epoch = an uninterrupted one
        sampler.set_epoch(epoch)
        loss, lr_now = linear.image_epoch(model, optimizer, loader, args, epoch, device, log)
        top1, top5, count = linear.evaluate(probe, test_set, local_batch, args.workers, device)
        history.append({"epoch": epoch, "loss": loss, "lr": lr_now, "top1": top1, "top5": top5,
                        "epoch_s": round(time.perf_counter() - t0, 3)})
        log(f"epoch {epoch + 1}/{args.epochs} loss {loss:.4f} lr {lr_now:.4g} top-1 {top1:.2f} top-5 {top5:.2f} "
            f"({count} test images) {time.perf_counter() - t0:.1f} s", flush=True)
        if dsm.is_main():
            network = {k: v.detach().cpu() for k, v in probe.state_dict().items()}
            dsm.atomic_save({"network": network, "optimizer": optimizer.state_dict(), "epoch": epoch,
                             "history": history, "num_classes": num_classes, "arch": args.arch,
                             "image_size": args.image_size, "args": vars(args)}, ckpt_path)
            extract.write_json(os.path.join(args.out, name + ".json"), {
                "task": "classify", "dataset": args.dataset, "settings": vars(args), "init": described,
                "num_classes": num_classes, "train_images": len(train_set), "test_images": count,
                "head_lr": head_lr, "backbone_lr": head_lr * scale, "epochs_done": epoch + 1, "world_size": world,
                "top1": top1, "top5": top5, "best_top1": max(h["top1"] for h in history), "history": history})
    log(f"wrote {os.path.join(args.out, name + '.json')}")


def classify_transforms(image_size):
    """(train, test) transforms. Small images keep their scale (pad-and-crop, the CIFAR custom);
    larger ones get random resized crops; both flip. Test: resize + centre crop (01's eval_transform
    above 64 px; at <= 64 px no enlargement, matching the training scale)."""
    normalise = [transforms.ToTensor(), transforms.Normalize(extract.IMAGENET_MEAN, extract.IMAGENET_STD)]
    if image_size <= 64:
        train = transforms.Compose([transforms.Resize(image_size), transforms.CenterCrop(image_size),
                                    transforms.RandomCrop(image_size, padding=image_size // 8, padding_mode="reflect"),
                                    transforms.RandomHorizontalFlip(), *normalise])
        test = transforms.Compose([transforms.Resize(image_size), transforms.CenterCrop(image_size), *normalise])
        return train, test
    return linear.probe_train_transform(image_size), extract.eval_transform(image_size)


def classification_sets(args, train_tf, test_tf):
    """(train set, test set, number of classes) for --dataset, read from --data; items (image, label)."""
    name, root, dl = args.dataset, args.data, args.download
    tv = torchvision.datasets
    if name == "imagefolder":
        train_paths, train_labels, classes = extract.list_images(os.path.join(root, "train"))
        val_paths, val_labels = pretrain.list_val_images(root, classes)
        return (extract.ImageList(train_paths, train_tf, train_labels),
                extract.ImageList(val_paths, test_tf, val_labels), len(classes))
    try:
        if name in ("cifar10", "cifar100"):
            cls = tv.CIFAR10 if name == "cifar10" else tv.CIFAR100
            train = cls(root, train=True, transform=train_tf, download=dl)
            return train, cls(root, train=False, transform=test_tf, download=dl), len(train.classes)
        if name in ("dtd", "flowers102"):
            cls, extra = (tv.DTD, {"partition": 1}) if name == "dtd" else (tv.Flowers102, {})
            train = torch.utils.data.ConcatDataset([cls(root, split=s, transform=train_tf, download=dl, **extra)
                                                    for s in ("train", "val")])
            test = cls(root, split="test", transform=test_tf, download=dl, **extra)
            return train, test, 47 if name == "dtd" else 102
        if name == "sun397":
            return sun397_sets(root, train_tf, test_tf, dl)
        return inaturalist_sets(root, args.inat_version, train_tf, test_tf, dl)
    except RuntimeError as e:
        extract.fail(f"--dataset {name} not found under --data {root} ({str(e).splitlines()[0]}); "
                     f"download it there or pass --download")


def sun397_sets(root, train_tf, test_tf, download):
    """SUN397 has no split in torchvision: use the dataset's first official partition (50 train and
    50 test images per class), read from Training_01.txt / Testing_01.txt in --data or --data/SUN397."""
    full = torchvision.datasets.SUN397(root, download=download)
    lists = []
    for file in ("Training_01.txt", "Testing_01.txt"):
        found = [p for p in (os.path.join(root, file), os.path.join(root, "SUN397", file)) if os.path.isfile(p)]
        if not found:
            extract.fail(f"{file} not found in {root} or {root}/SUN397; unpack SUN397's Partitions.zip there")
        with open(found[0]) as f:
            lists.append({line.strip().lstrip("/") for line in f if line.strip()})
    relative = [os.path.relpath(p, full._data_dir).replace(os.sep, "/") for p in full._image_files]
    return (TransformedSubset(full, [i for i, r in enumerate(relative) if r in lists[0]], train_tf),
            TransformedSubset(full, [i for i, r in enumerate(relative) if r in lists[1]], test_tf), len(full.classes))


def inaturalist_sets(root, version, train_tf, test_tf, download):
    """2021: the 2021_train and 2021_valid folders. 2017-2019: torchvision reads train and val images
    from one folder (--data/<year>); the official split comes from train<year>.json / val<year>.json."""
    tv = torchvision.datasets.INaturalist
    if version == "2021":
        train = tv(root, "2021_train", transform=train_tf, download=download)
        return train, tv(root, "2021_valid", transform=test_tf, download=download), len(train.all_categories)
    full = tv(root, version, download=download)
    relative = [f"{full.all_categories[c]}/{name}".replace(os.sep, "/") for c, name in full.index]
    subsets = []
    for split, transform in (("train", train_tf), ("val", test_tf)):
        path = os.path.join(root, f"{split}{version}.json")
        if not os.path.isfile(path):
            extract.fail(f"{path} not found; put iNaturalist {version}'s {split}{version}.json in --data")
        with open(path) as f:
            # file_name is "train_val2018/<super>/<id>/<file>"; drop the first folder
            names = {image["file_name"].split("/", 1)[1] for image in json.load(f)["images"]}
        subsets.append(TransformedSubset(full, [i for i, r in enumerate(relative) if r in names], transform))
    return subsets[0], subsets[1], len(full.all_categories)


class TransformedSubset(torch.utils.data.Dataset):
    """Items `indices` of a torchvision dataset built without a transform, with `transform` applied
    (one scan of the files serves both splits)."""

    def __init__(self, dataset, indices, transform):
        self.dataset, self.indices, self.transform = dataset, indices, transform

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, index):
        image, label = self.dataset[self.indices[index]]
        return self.transform(image.convert("RGB")), label


# ================================================================ --task detect

def detect(args, device):
    rank, world = dsm.get_rank(), dsm.get_world_size()
    log = print if dsm.is_main() else (lambda *a, **k: None)
    cuda = device.type == "cuda"

    # ---- data: VOC 07+12 trainval for training, 07 test for testing ----
    train_splits = [parse_split(s) for s in args.voc_train]
    test_split = parse_split(args.voc_test)
    for year, split in train_splits + [test_split]:
        check_voc_layout(args.data, year, split, args.download)
    train_set = torch.utils.data.ConcatDataset([
        torchvision.datasets.VOCDetection(args.data, year, split, download=args.download,
                                          transforms=VOCTarget(flip=True)) for year, split in train_splits])
    test_set = torchvision.datasets.VOCDetection(args.data, *test_split, download=args.download,
                                                 transforms=VOCTarget(flip=False))
    test_count = min(len(test_set), args.test_limit or len(test_set))
    batch_size = args.batch_size or 16
    local_batch = extract.resolve_rank_batch(batch_size, world)
    sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True,
                                                  seed=args.seed, drop_last=True)
    steps_per_epoch = len(sampler) // local_batch
    if steps_per_epoch == 0:
        extract.fail(f"--batch-size {batch_size} exceeds the {len(train_set)} training images; use a smaller one")

    # ---- network: Faster R-CNN, our ResNet under an FPN ----
    backbone, width, described = linear.load_pretrained_backbone(args.init, args.arch, args.image_size, args.seed)
    net = build_detector(backbone, width, len(VOC_CLASSES) + 1, args.min_size, args.test_size, args.max_size,
                         args.det_norm)
    if args.det_norm == "train" and world > 1:
        if cuda:
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        else:
            log("note: SyncBatchNorm needs CUDA; on CPU each process normalises over its own images")
    net = net.to(device)
    model = DistributedDataParallel(net, device_ids=[device] if cuda else None) if world > 1 else net

    # ---- optimiser: SGD, warm-up, steps ----
    base_lr = (args.lr if args.lr is not None else 0.02) * batch_size / 16
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=base_lr, momentum=args.momentum, weight_decay=args.weight_decay)
    log(f"05_transfer detect: VOC {' + '.join(args.voc_train)} ({len(train_set)} images) -> {args.voc_test} "
        f"({test_count} images), {world} process(es) on {device}, batch {batch_size} ({local_batch} per process), "
        f"{args.iters} iterations, lr {args.lr if args.lr is not None else 0.02} x {batch_size}/16 = {base_lr:.6g}, "
        f"BN {args.det_norm}{' (SyncBN)' if args.det_norm == 'train' and world > 1 and cuda else ''}, "
        f"backbone {described}")
    log("args: " + json.dumps(vars(args), sort_keys=True))

    # ---- resume ----
    name = "transfer_detect_voc" + ("_random" if args.init == "random" else "")
    ckpt_path = os.path.join(args.out, name + "_checkpoint.pt")
    it = 0
    if os.path.isfile(ckpt_path):
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        made = [ckpt["args"][k] for k in ("arch", "image_size", "det_norm")]
        if made != [args.arch, args.image_size, args.det_norm]:
            extract.fail(f"{ckpt_path} is a {made[0]} run at {made[1]} px with --det-norm {made[2]}, not this one; "
                         f"delete it or pass another --out")
        net.load_state_dict(ckpt["network"])
        optimizer.load_state_dict(ckpt["optimizer"])
        it = ckpt["iteration"]
        log(f"resumed from {ckpt_path} at iteration {it}")
        del ckpt

    # ---- training loop (iteration-based; an epoch's order is fixed by (seed, epoch), so a resume
    #      skips exactly the batches already taken) ----
    meter = pretrain.Meter()
    while it < args.iters:
        epoch, skip = divmod(it, steps_per_epoch)
        pretrain.seed_everything(pretrain.step_seed(args.seed, it, rank))
        sampler.set_epoch(epoch)
        order = list(sampler)
        batches = [order[i:i + local_batch]
                   for i in range(skip * local_batch, steps_per_epoch * local_batch, local_batch)]
        loader = torch.utils.data.DataLoader(train_set, batch_sampler=batches, num_workers=args.workers,
                                             collate_fn=collate_detection, pin_memory=cuda)
        model.train()
        for (images, targets), wait in pretrain.timed_batches(loader):
            meter.wait += wait
            lr = detection_lr(base_lr, it, args.warmup_iters, args.lr_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images = [im.to(device, non_blocking=True) for im in images]
            targets = [{k: v.to(device) for k, v in t.items() if k != "difficult"} for t in targets]
            losses = model(images, targets)
            loss = sum(losses.values())
            value = linear.average_over_ranks(loss.item(), device)  # the same on every rank: all stop together
            if not math.isfinite(value):
                extract.fail(f"loss is {value} at iteration {it}; {ckpt_path} holds the last checkpoint; "
                             f"lower --lr or raise --warmup-iters and rerun to resume")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            it += 1
            meter.add(value)
            if it % args.print_freq == 0 or it == args.iters:
                r = meter.report(epoch, it, args.iters, it, lr, batch_size, batch_size, args.iters - it, device)
                parts = " ".join(f"{k.removeprefix('loss_')} {v.item():.3f}" for k, v in losses.items())
                log(f"iter {it}/{args.iters} loss {r['loss']:.4f} ({parts}) lr {lr:.4g} "
                    f"img/s {r['images_per_s']:.1f} data {100 * r['data_wait']:.0f}% "
                    f"eta {pretrain.format_seconds(r['eta_s'])} "
                    f"mem {r['peak_mem_gib']:.2f}G", flush=True)
                meter = pretrain.Meter()
            if dsm.is_main() and (it % args.ckpt_every == 0 or it == args.iters):
                dsm.atomic_save({"network": {k: v.detach().cpu() for k, v in net.state_dict().items()},
                                 "optimizer": optimizer.state_dict(), "iteration": it, "args": vars(args)}, ckpt_path)
            if it == args.iters:
                break

    # ---- evaluation on the test split (each process a contiguous shard), AP on rank 0 ----
    t0 = time.perf_counter()
    detections = detect_shard(net, test_set, test_count, device)
    if dist.is_initialized():
        shards = [None] * world
        dist.all_gather_object(shards, detections)
        detections = [d for shard in shards for d in shard]
    if dsm.is_main():
        truths = [voc_objects(test_set.parse_voc_xml(ET.parse(test_set.annotations[i]).getroot()))
                  for i in range(test_count)]
        result = voc_ap(detections, truths, len(VOC_CLASSES), metric=args.ap_metric)
        log(f"VOC {args.voc_test} ({test_count} images, {time.perf_counter() - t0:.1f} s): AP {result['AP']:.2f} "
            f"AP50 {result['AP50']:.2f} AP75 {result['AP75']:.2f} ({args.ap_metric} interpolation)")
        per_class = {VOC_CLASSES[c]: {"AP": result["per_class_AP"][c], "AP50": result["per_class_AP50"][c]}
                     for c in range(len(VOC_CLASSES))}
        path = os.path.join(args.out, name + ".json")
        extract.write_json(path, {"task": "detect", "dataset": "voc", "settings": vars(args), "init": described,
                          "train_images": len(train_set), "test_images": test_count, "iterations": it,
                          "lr": base_lr, "AP": result["AP"], "AP50": result["AP50"], "AP75": result["AP75"],
                          "ap_metric": args.ap_metric, "per_class": per_class})
        log(f"wrote {path}")


def build_detector(backbone, width, num_classes, min_size, test_size, max_size, norm="train"):
    """torchvision Faster R-CNN on `backbone` (a ResNet, weights already loaded) under an FPN over
    layer1-4 (+ a max-pooled P6). norm "train": BN everywhere trainable, FPN with BN too (MoCo's
    protocol); "frozen": the backbone's BN frozen at its statistics, FPN without norm. All layers
    are trained. Nothing is downloaded: the ResNet is ours and no torchvision weights are asked for.
    Training draws the short side from min_size per batch; evaluation uses test_size."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    if norm == "frozen":
        backbone = freeze_batchnorm(backbone)
    layers = {f"layer{i}": str(i - 1) for i in range(1, 5)}
    fpn = BackboneWithFPN(backbone, layers, [width // 8, width // 4, width // 2, width], out_channels=256,
                          norm_layer=nn.BatchNorm2d if norm == "train" else None)
    model = FasterRCNN(fpn, num_classes=num_classes, min_size=tuple(min_size), max_size=max_size)
    model.transform.test_size = test_size  # read by detect_shard
    return model


class VOCTarget:
    """VOCDetection's (PIL image, parsed XML) -> (float image [3, H, W] in [0, 1], {"boxes", "labels",
    "difficult"}), with a random horizontal flip for training. The model normalises the image itself."""

    def __init__(self, flip):
        self.flip = flip

    def __call__(self, image, target):
        boxes, labels, difficult = voc_objects(target)
        image = TF.to_tensor(image)
        if self.flip and random.random() < 0.5:
            image = image.flip(-1)
            width = image.shape[-1]
            boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)
        return image, {"boxes": boxes, "labels": labels, "difficult": difficult}


def voc_objects(target):
    """Parsed VOC XML -> (boxes [n, 4] float, labels [n] int64 in 1..20, difficult [n] bool). VOC's
    1-based inclusive pixel corners become continuous coordinates (xmin - 1, ymin - 1, xmax, ymax)."""
    objects = target["annotation"].get("object", [])
    boxes, labels, difficult = [], [], []
    for obj in objects if isinstance(objects, list) else [objects]:
        if obj["name"] not in VOC_CLASSES:
            extract.fail(f"{target['annotation'].get('filename', '?')}: unknown class {obj['name']!r}; "
                         f"VOC has {', '.join(VOC_CLASSES)}")
        b = obj["bndbox"]
        boxes.append([float(b["xmin"]) - 1, float(b["ymin"]) - 1, float(b["xmax"]), float(b["ymax"])])
        labels.append(VOC_CLASSES.index(obj["name"]) + 1)
        difficult.append(obj.get("difficult", "0") == "1")
    return (torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(labels, dtype=torch.int64),
            torch.tensor(difficult, dtype=torch.bool))


def collate_detection(batch):
    return tuple(zip(*batch))


def parse_split(text):
    year, _, split = text.partition(":")
    if year not in [str(y) for y in range(2007, 2013)] or split not in ("train", "val", "trainval", "test"):
        extract.fail(f"{text!r} is not YEAR:SPLIT (e.g. 2007:trainval, 2012:trainval, 2007:test)")
    return year, split


def check_voc_layout(root, year, split, download):
    """One-line error when --data lacks what VOCDetection reads for (year, split)."""
    if download:
        return
    base = os.path.join(root, "VOCdevkit", f"VOC{year}")
    for need in ("JPEGImages", "Annotations", os.path.join("ImageSets", "Main", f"{split}.txt")):
        if not os.path.exists(os.path.join(base, need)):
            extract.fail(f"{os.path.join(base, need)} not found; --data must hold VOCdevkit/VOC<year>/"
                         f"{{JPEGImages,Annotations,ImageSets/Main/<split>.txt}} for {year}:{split} "
                         f"(unpack the VOC tars there, or pass --download)")


def detection_lr(base_lr, it, warmup_iters, steps):
    """Linear warm-up from base_lr / 1000, then x 0.1 at each of `steps` (detectron2's schedule)."""
    factor = 0.1 ** sum(it >= s for s in steps)
    if it < warmup_iters:
        factor *= 0.001 + (1 - 0.001) * it / warmup_iters
    return base_lr * factor


def freeze_batchnorm(module):
    """Replace every BatchNorm2d by a FrozenBatchNorm2d holding the same affine and statistics."""
    from torchvision.ops import FrozenBatchNorm2d
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)
    return module


@torch.no_grad()
def detect_shard(net, dataset, count, device):
    """This process's detections on its contiguous shard of the first `count` test images:
    a list of (image index, boxes [n, 4], scores [n], labels [n] in 0..19) on the CPU."""
    start, end = dsm.shard_range(count, dsm.get_rank(), dsm.get_world_size())
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(start, end)), batch_size=1,
                                         collate_fn=collate_detection)
    net.eval()
    train_sizes, net.transform.min_size = net.transform.min_size, (net.transform.test_size,)
    out = []
    for i, (images, _) in zip(range(start, end), loader):
        (pred,) = net([images[0].to(device)])
        out.append((i, pred["boxes"].float().cpu(), pred["scores"].float().cpu(), pred["labels"].cpu() - 1))
    net.transform.min_size = train_sizes
    return out


def voc_ap(detections, truths, num_classes, thresholds=None, metric="all-point"):
    """VOC-style AP. detections: [(image index, boxes [n, 4], scores [n], labels [n] 0-based)];
    truths[image index] = (boxes [m, 4], labels [m] 1-based, difficult [m]) as voc_objects gives.

    Per class and IoU threshold: detections in descending score order (stable); each is matched to
    the ground truth box of its image and class with the largest IoU. IoU > threshold: a difficult
    box -> ignored, an unmatched box -> true positive (now matched), a matched box -> false positive
    (a duplicate). Below the threshold -> false positive. Recall is over non-difficult boxes.
    Classes without non-difficult boxes are left out of the means (their AP is None).
    Returns AP (in %, mean over classes and the thresholds 0.50:0.05:0.95), AP50, AP75 and the
    per-class AP and AP50."""
    thresholds = np.round(np.arange(0.5, 0.951, 0.05), 2) if thresholds is None else np.asarray(thresholds)
    table = np.full((num_classes, len(thresholds)), np.nan)
    for c in range(num_classes):
        gt = {}
        for i, (boxes, labels, difficult) in enumerate(truths):
            keep = (labels == c + 1).numpy()
            if keep.any():
                gt[i] = (boxes.numpy()[keep].astype(np.float64), difficult.numpy()[keep])
        positives = sum(int((~d).sum()) for _, d in gt.values())
        if positives == 0:
            continue
        dets = [(float(s), i, b.numpy().astype(np.float64))
                for i, boxes, scores, labels in detections
                for b, s, l in zip(boxes, scores, labels) if int(l) == c]
        dets.sort(key=lambda d: -d[0])  # stable: ties keep image order
        matched = {i: np.zeros((len(thresholds), len(d)), bool) for i, (_, d) in gt.items()}
        tp = np.zeros((len(dets), len(thresholds)))
        fp = np.zeros((len(dets), len(thresholds)))
        for k, (_, i, box) in enumerate(dets):
            if i not in gt:
                fp[k] = 1
                continue
            boxes, difficult = gt[i]
            iou = box_iou(box, boxes)
            j = int(iou.argmax())
            hit = iou[j] > thresholds  # strictly, as the VOC devkit
            fresh = hit & ~matched[i][:, j]
            if difficult[j]:
                fp[k] = ~hit
            else:
                tp[k], fp[k] = fresh, ~fresh
                matched[i][:, j] |= fresh
        tp, fp = tp.cumsum(0), fp.cumsum(0)
        for t in range(len(thresholds)):
            recall = tp[:, t] / positives
            precision = tp[:, t] / np.maximum(tp[:, t] + fp[:, t], np.finfo(np.float64).eps)
            table[c, t] = interpolated_ap(recall, precision, metric)
    present = ~np.isnan(table[:, 0])
    column = {round(float(t), 2): n for n, t in enumerate(thresholds)}

    def percent(values):
        return 100.0 * float(np.mean(values)) if np.size(values) else float("nan")

    return {"AP": percent(table[present]),
            "AP50": percent(table[present, column[0.5]]) if 0.5 in column else float("nan"),
            "AP75": percent(table[present, column[0.75]]) if 0.75 in column else float("nan"),
            "per_class_AP": [percent(row) if ok else None for row, ok in zip(table, present)],
            "per_class_AP50": [percent(row[column[0.5]]) if ok else None for row, ok in zip(table, present)]
            if 0.5 in column else None}


def box_iou(box, boxes):
    """IoU of one box [4] against boxes [m, 4], continuous (x0, y0, x1, y1) coordinates."""
    w = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    h = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = w * h
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, np.finfo(np.float64).eps)


def interpolated_ap(recall, precision, metric="all-point"):
    """Area under the precision envelope (max precision at any recall >= r). all-point: at every
    recall step; 11-point: the mean over r = 0, 0.1, ..., 1 (VOC 2007's original metric)."""
    if metric == "11-point":
        return float(np.mean([precision[recall >= r].max() if (recall >= r).any() else 0.0
                              for r in np.linspace(0, 1, 11)]))
    r = np.concatenate([[0.0], recall, [1.0]])
    p = np.concatenate([[0.0], precision, [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]
    steps = np.nonzero(r[1:] != r[:-1])[0]
    return float(((r[steps + 1] - r[steps]) * p[steps + 1]).sum())


# ================================================================ --task report

def report(args):
    """Every result in RUN as one markdown table, the pretrained backbone beside the random-init one
    (04's --pretrained none, 05's --init scratch), then a count of the rows where the pretrained one
    is above; printed and written to RUN/report.md. Reads only the JSON files the stages wrote; a
    protocol that was not run is left out."""
    if not os.path.isdir(args.out):
        extract.fail(f"{args.out} is not a folder; pass the --out of a run")

    def load(name):
        path = os.path.join(args.out, name + ".json")
        if not os.path.isfile(path):
            return None
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            extract.fail(f"cannot read {path} ({e}); rerun the stage that writes it")

    def pct(result, key="top1"):
        return "-" if result is None or result.get(key) is None else f"{result[key]:.1f}"

    rows = []
    knn, knn_random = load("knn"), load("knn_random")
    for k in (knn or knn_random or {}).get("results", {}):
        pair = [r["results"].get(k) if r else None for r in (knn, knn_random)]
        rows.append((f"kNN top-1 (k={k})", pct(pair[0]), pct(pair[1])))
    probe, probe_random = load("linear_eval"), load("linear_eval_random")
    if probe or probe_random:
        rows.append(("linear probe top-1", pct(probe), pct(probe_random)))
        rows.append(("linear probe top-5", pct(probe, "top5"), pct(probe_random, "top5")))
    for fraction in ("0.01", "0.1"):
        semi, semi_random = load(f"semi_{fraction}"), load(f"semi_{fraction}_random")
        if semi or semi_random:
            rows.append((f"semi-supervised {float(fraction):.0%} top-1", pct(semi), pct(semi_random)))
    for name in sorted(os.listdir(args.out)):
        stem = name[:-len(".json")]
        if name.startswith("transfer_classify_") and name.endswith(".json") and not stem.endswith("_random"):
            pre, scratch = load(stem), load(stem + "_random")
            rows.append((f"transfer classify {pre['dataset']} top-1", pct(pre), pct(scratch)))
    detection, detection_scratch = load("transfer_detect_voc"), load("transfer_detect_voc_random")
    for key in ("AP", "AP50", "AP75") if detection or detection_scratch else ():
        rows.append((f"transfer detect voc {key}", pct(detection, key), pct(detection_scratch, key)))

    # ---- the table, with what the run was ----
    about = knn or probe or knn_random or probe_random or {}
    lines = [f"# Results of {args.out}", ""]
    if about:
        lines += [f"{about['arch']} at {about['image_size']} px; {about['train_images']} train / "
                  f"{about['val_images']} val images, {about['classes']} classes (chance top-1 "
                  f"{100 / about['classes']:.1f}%).", ""]
    lines += ["| result | pretrained | random init |", "| --- | --- | --- |"]
    lines += [f"| {label} | {a} | {b} |" for label, a, b in rows]
    compared = [(float(a), float(b)) for _, a, b in rows if "-" not in (a, b)]
    if compared:  # the quickstart's verdict: does pretraining beat a random network here?
        above = sum(a > b for a, b in compared)
        lines += ["", f"pretrained above random init on {above} of {len(compared)} results"]
    hard = load("hard_classes")
    if hard and hard.get("same_class"):
        same = hard["same_class"]
        lines += ["", f"03: {100 * same['share_all_k']:.1f}% of the {hard['k']} hard classes of an instance share "
                      f"its folder class (chance {100 * same['chance']:.1f}%), mined from {hard['source']}."]
    if not rows:
        lines += ["", "no results yet: run 04_linear_eval.py and 05_transfer.py with this --out first"]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    path = os.path.join(args.out, "report.md")
    dsm.atomic_save(text.encode(), path, dump=lambda data, f: f.write(data))
    print(f"wrote {path}")


# ================================================================ --task export

def export(args, device):
    if not dsm.is_main():
        return
    backbone, _, described = linear.load_pretrained_backbone(args.init, args.arch, args.image_size, args.seed)
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    os.makedirs(args.out, exist_ok=True)
    tv_path = os.path.join(args.out, "backbone_torchvision.pth")
    dsm.atomic_save(state, tv_path)
    d2_path = os.path.join(args.out, "backbone_detectron2.pkl")
    d2 = detectron2_names(state)
    dsm.atomic_save({"model": d2, "__author__": "05_transfer.py (instance classification pretraining)",
                     "matching_heuristics": True}, d2_path, dump=lambda obj, f: pickle.dump(obj, f, protocol=4))
    small = state["conv1.weight"].shape[-1] == 3
    print(f"wrote {tv_path} ({len(state)} tensors, torchvision names) and {d2_path} ({len(d2)} arrays, "
          f"detectron2 names)")
    if small:
        print("note: this backbone has the small-image 3x3 stem; detectron2's and mmdetection's default "
              "ResNets have a 7x7 stem and will refuse stem.conv1")
    path = os.path.join(args.out, "transfer_export_backbone.json")
    extract.write_json(path, {"task": "export", "dataset": "backbone", "settings": vars(args), "init": described,
                      "torchvision": tv_path, "detectron2": d2_path, "tensors": len(state),
                      "stem": "3x3 stride 1, no max-pool" if small else "7x7 stride 2 + max-pool"})
    print(f"wrote {path}")


def detectron2_names(state):
    """torchvision ResNet keys -> detectron2 ResNet keys, values as numpy arrays.
    conv1 -> stem.conv1, bn1 -> stem.conv1.norm; layerN.b -> res{N+1}.b; convK/bnK -> convK/convK.norm;
    downsample.0/.1 -> shortcut/shortcut.norm. BN counters (num_batches_tracked) and fc are dropped."""
    out = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked") or key.startswith("fc."):
            continue
        parts = key.split(".")
        if parts[0] in ("conv1", "bn1"):
            name = "stem.conv1" + (".norm" if parts[0] == "bn1" else "") + "." + parts[-1]
        else:
            stage, block, layer = f"res{int(parts[0][5:]) + 1}", parts[1], parts[2]
            if layer == "downsample":
                layer = "shortcut" + (".norm" if parts[3] == "1" else "")
            elif layer.startswith("bn"):
                layer = f"conv{layer[2:]}.norm"
            name = f"{stage}.{block}.{layer}.{parts[-1]}"
        out[name] = value.numpy()
    return out


# ================================================================ shared by the tasks

# ---------------------------------------------------------------- demo VOC data

def make_demo_voc(root, train07=60, test07=30, train12=40, image_size=96, num_classes=4, seed=0):
    """A deterministic VOC-format folder: VOCdevkit/VOC2007 (trainval, test) and VOC2012 (trainval),
    each with JPEGImages/*.jpg, Annotations/*.xml and ImageSets/Main/<split>.txt. Every image holds
    1-3 objects: tiles drawn by 01's demo generator (a shape on its own background), pasted onto a
    noisy gradient; the box is the tile, the class is the shape, labelled with the VOC class of the
    same index (shape 0 -> aeroplane, ...) so the files are valid VOC. Objects under 20 px are
    marked difficult."""
    splits = [("2007", "trainval", train07), ("2007", "test", test07), ("2012", "trainval", train12)]
    for split_id, (year, split, count) in enumerate(splits):
        base = os.path.join(root, "VOCdevkit", f"VOC{year}")
        for sub in ("JPEGImages", "Annotations", os.path.join("ImageSets", "Main")):
            os.makedirs(os.path.join(base, sub), exist_ok=True)
        ids = []
        for n in range(count):
            rng = np.random.default_rng([seed, split_id, n])
            image_id = f"{year}_{split_id}{n:05d}"
            canvas = np.linspace(rng.uniform(40, 200, 3), rng.uniform(40, 200, 3), image_size)[None, :, :]
            canvas = canvas + rng.normal(0, 12, (image_size, image_size, 3))
            image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
            root_el = ET.Element("annotation")
            ET.SubElement(root_el, "filename").text = image_id + ".jpg"
            size = ET.SubElement(root_el, "size")
            for tag, v in (("width", image_size), ("height", image_size), ("depth", 3)):
                ET.SubElement(size, tag).text = str(v)
            placed = []
            for _ in range(rng.integers(1, 4)):
                c = int(rng.integers(num_classes))
                side = int(rng.integers(image_size // 6, image_size // 2))
                x0, y0 = (int(v) for v in rng.integers(0, image_size - side, 2))
                if any(x0 < x + w and x < x0 + side and y0 < y + w and y < y0 + side for x, y, w in placed):
                    continue  # objects do not overlap, so every box shows its whole tile
                placed.append((x0, y0, side))
                tile = extract._demo_image(rng, extract.SHAPES[c % len(extract.SHAPES)], 0, 1, side)
                image.paste(tile, (x0, y0))
                obj = ET.SubElement(root_el, "object")
                ET.SubElement(obj, "name").text = VOC_CLASSES[c]
                ET.SubElement(obj, "difficult").text = "1" if side < 20 else "0"
                box = ET.SubElement(obj, "bndbox")
                for tag, v in (("xmin", x0 + 1), ("ymin", y0 + 1), ("xmax", x0 + side), ("ymax", y0 + side)):
                    ET.SubElement(box, tag).text = str(v)
            image.save(os.path.join(base, "JPEGImages", image_id + ".jpg"), quality=95)
            ET.ElementTree(root_el).write(os.path.join(base, "Annotations", image_id + ".xml"))
            ids.append(image_id)
        with open(os.path.join(base, "ImageSets", "Main", f"{split}.txt"), "w") as f:
            f.write("\n".join(ids) + "\n")
    return root


if __name__ == "__main__":
    main()
