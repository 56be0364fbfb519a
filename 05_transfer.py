"""Stage 05: transfer of the pretrained backbone (Tables 8-10): fine-tuned classification, VOC detection, export.

--task classify  fine-tune everything (the backbone plus a new linear head: 04's model) on a labelled set from --data
    (Tables 9-10): an ImageFolder root or torchvision's CIFAR10/100, DTD, Flowers102, SUN397 (first official
    partition), iNaturalist (official json split). The paper gives no recipe; ours: SGD, momentum 0.9, weight decay
    1e-4, lr 0.1 at batch 256 (scaled) for head and backbone (--backbone-lr-scale), cosine over --epochs; top-1 /
    top-5 on the whole test split after every epoch (report the last).
--task detect    VOC07+12 trainval -> VOC07 test (Table 8). The paper follows MoCo (detectron2's Faster R-CNN R50-C4,
    SyncBN); here torchvision's Faster R-CNN, our ResNet under an FPN (not directly comparable; --task export serves
    MoCo's setting). As MoCo: every layer fine-tuned, BN trained (SyncBN on several GPUs; --det-norm frozen keeps
    it), batch 16, lr 0.02, 24k iterations, x0.1 at 18k and 22k, difficult boxes trained on, ignored in the
    evaluation; AP, AP50, AP75 with VOC07's 11-point interpolation (--ap-metric all-point: VOC2010+).
--task export    RUN/backbone_torchvision.pth (torchvision / mmdetection), RUN/backbone_detectron2.pkl (detectron2
    names, numpy arrays: not weights_only; load with RESNETS.STRIDE_IN_1X1 False, INPUT.FORMAT RGB, torchvision's
    pixel mean / std, as MoCo).

--init: RUN/backbone.pt (default), a 02 checkpoint, a torchvision-named state_dict, or random (the baseline; results
suffixed _random); --arch / --image-size: the run's (RUN/init.pt) unless given. Results:
RUN/transfer_<task>_<dataset>[_random].json; classify and detect resume with the same command.

Commands:
  python 05_transfer.py --task classify --data demo_data --out runs/demo --arch resnet18 --image-size 64 --epochs 10
  python 05_transfer.py --task export --out runs/demo --arch resnet18 --image-size 64
  torchrun --nproc_per_node=8 05_transfer.py --task detect --data /datasets/voc --out runs/in1k
  torchrun --nnodes=8 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
      05_transfer.py --task classify --dataset inaturalist --data /datasets/inat --out runs/in1k
"""
import importlib
import json
import os
import pickle
import random
import time
import xml.etree.ElementTree as ET

import numpy as np
import torch
import torch.distributed as dist
import torchvision
from torch import nn
from torchvision import transforms
from torchvision.ops import box_iou
from torchvision.transforms import functional as TF

import dist_softmax as dsm

shared = importlib.import_module("01_extract_init")  # 01, and below its banner what every stage shares
linear_eval = importlib.import_module("04_linear_eval")  # the backbone, the model, the epochs, the evaluation
fail, log, POSITIVE, COUNT = shared.fail, shared.log, shared.POSITIVE, shared.COUNT

CLASSIFY_SETS = ("imagefolder", "cifar10", "cifar100", "dtd", "sun397", "inaturalist", "flowers102")
VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")

parser = shared.Parser(__doc__)
shared.add_common_args(parser, epochs=100, batch_size=None, data_required=False, network_of_run=True)
parser.add_argument("--task", required=True, choices=["classify", "detect", "export"])
parser.add_argument("--init", "--pretrained", metavar="PATH|random", help="backbone to start from: RUN/backbone.pt "
                    "(default), a 02 checkpoint.pt, a torchvision-named ResNet state_dict, or random (the baseline)")
parser.add_argument("--dataset", choices=CLASSIFY_SETS + ("voc",),
                    help="classify: imagefolder (default) or a torchvision set; detect: voc")
parser.add_argument("--download", action="store_true", help="let torchvision download the dataset into --data")
parser.add_argument("--lr", type=shared.RATE, default=None,
                    help="classify: lr at batch 256 (default 0.1); detect: lr at batch 16 (0.02); scaled linearly")
parser.add_argument("--backbone-lr-scale", type=shared.NON_NEGATIVE, default=1.0,
                    help="classify: backbone lr = head lr x this (1: one lr for every layer, for both arms)")
parser.add_argument("--momentum", type=shared.FRACTION, default=0.9)
parser.add_argument("--weight-decay", type=shared.NON_NEGATIVE, default=1e-4)
parser.add_argument("--inat-version", default="2018", choices=["2017", "2018", "2019", "2021"])
parser.add_argument("--iters", type=POSITIVE, default=24000, help="detect: training iterations")
parser.add_argument("--lr-steps", type=COUNT, nargs="*", default=[18000, 22000], help="detect: lr x 0.1 at these")
parser.add_argument("--warmup-iters", type=COUNT, default=100, help="detect: linear warm-up iterations")
parser.add_argument("--min-size", type=POSITIVE, nargs="+", default=list(range(480, 801, 32)),
                    help="detect: training short side, drawn per image from these")
parser.add_argument("--test-size", type=POSITIVE, default=800, help="detect: test short side")
parser.add_argument("--max-size", type=POSITIVE, default=1333, help="detect: longest side cap")
parser.add_argument("--voc-train", nargs="+", default=["2007:trainval", "2012:trainval"], metavar="YEAR:SPLIT")
parser.add_argument("--voc-test", default="2007:test", metavar="YEAR:SPLIT")
parser.add_argument("--det-norm", default="train", choices=["train", "frozen"],
                    help="detect: BN trained (SyncBN over CUDA processes; MoCo's protocol) or frozen")
parser.add_argument("--ap-metric", default="11-point", choices=["11-point", "all-point"],
                    help="detect: VOC07's 11-point interpolation (what detectron2 reports), or all-point (VOC2010+)")
parser.add_argument("--test-limit", type=POSITIVE, default=None, help="detect: evaluate on the first N test images")
parser.add_argument("--ckpt-every", type=POSITIVE, default=1000, help="detect: iterations between checkpoints")
parser.add_argument("--print-freq", type=POSITIVE, default=20, help="steps between progress lines")

# What a resumed fine-tuning must share with the checkpoint (--epochs and --iters may grow).
CLASSIFY_SETTINGS = ("dataset", "arch", "image_size", "batch_size", "lr", "backbone_lr_scale", "momentum",
                     "weight_decay", "seed")
DETECT_SETTINGS = ("arch", "image_size", "batch_size", "lr", "momentum", "weight_decay", "seed", "lr_steps",
                   "warmup_iters", "min_size", "max_size", "voc_train", "det_norm")


def main(argv=None):
    args = parser.parse_args(argv)
    if args.task == "classify" and args.dataset == "voc":
        fail("--dataset voc is for --task detect; pick one of " + ", ".join(CLASSIFY_SETS))
    if args.task == "detect" and args.dataset not in (None, "voc"):
        fail(f"--task detect reads PASCAL VOC only; drop --dataset {args.dataset}")
    args.dataset = args.dataset or {"classify": "imagefolder", "detect": "voc", "export": "backbone"}[args.task]
    if args.task != "export" and args.data is None:
        fail(f"--task {args.task} needs --data ROOT (the dataset's local folder)")
    args.init = args.init or os.path.join(args.out, "backbone.pt")
    args.lr = args.lr if args.lr is not None else {"classify": 0.1, "detect": 0.02}.get(args.task)
    with shared.stage(args) as device:
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        shared.run_network(args)
        {"classify": classify, "detect": detect, "export": export}[args.task](args, device)


def starting_backbone(args, keys):
    """(backbone, width, description, the resume contract's settings: `keys` of args and the backbone)."""
    backbone, width, described = linear_eval.load_pretrained_backbone(args.init, args.arch, args.image_size,
                                                                      args.seed, flag="--init")
    settings = {"stage": f"05_transfer {args.task}", "backbone": linear_eval.state_fingerprint(backbone)}
    return backbone, width, described, {**settings, **{key: getattr(args, key) for key in keys}}


def result_stem(args):
    """RUN/transfer_<task>_<dataset>[_random]: _random marks the random-init baseline (04's word for it)."""
    return os.path.join(args.out, f"transfer_{args.task}_{args.dataset}{'_random' if args.init == 'random' else ''}")


# ================================================================ --task classify

def classify(args, device):
    rank, world = dsm.get_rank(), dsm.get_world_size()
    # ---- data: (image, label) pairs ----
    train_set, test_set, num_classes = classification_sets(args, *classify_transforms(args.image_size))
    args.batch_size = args.batch_size or 256
    local_batch = shared.resolve_rank_batch(args.batch_size, world)
    sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True,
                                                  seed=args.seed, drop_last=True)
    loader = shared.data_loader(train_set, args, device, batch_size=local_batch, sampler=sampler, drop_last=True)
    if len(loader) == 0:
        fail(f"--batch-size {args.batch_size} exceeds the {len(train_set)} training images; use a smaller one")
    # ---- network: the backbone + a new linear head (04's model, nothing frozen) ----
    backbone, width, described, settings = starting_backbone(args, CLASSIFY_SETTINGS)
    probe = linear_eval.Probe(backbone, width, num_classes, frozen=False).to(
        device, memory_format=torch.channels_last if device.type == "cuda" else torch.preserve_format)
    model = dsm.data_parallel(probe, device)
    # ---- optimiser: head at lr, backbone at lr x --backbone-lr-scale, cosine (04's set_lr) ----
    head_lr = args.lr * args.batch_size / 256
    groups = [(probe.fc, head_lr), (probe.backbone, head_lr * args.backbone_lr_scale)]
    optimizer = torch.optim.SGD([{"params": m.parameters(), "lr": g, "base_lr": g} for m, g in groups],
                                momentum=args.momentum, weight_decay=args.weight_decay)
    log(f"05_transfer classify: {args.dataset}, {len(train_set)} train / {len(test_set)} test images, {num_classes} "
        f"classes, {world} process(es) on {device}, batch {args.batch_size} ({local_batch} per process), {len(loader)} "
        f"steps/epoch, head lr {args.lr:g} x {args.batch_size}/256 = {head_lr:.6g}, backbone lr x "
        f"{args.backbone_lr_scale:g}, backbone {described}")

    # ---- epochs (04's fit): train (04's image_epoch), top-1/top-5 on the whole test split, resumable ----
    def train_epoch(epoch):
        shared.seed_everything(shared.step_seed(args.seed, epoch, rank))  # resumed = uninterrupted epoch
        sampler.set_epoch(epoch)
        return linear_eval.image_epoch(model, optimizer, loader, args, epoch, device)

    def write_result(history):
        if dsm.is_main():
            shared.write_json(result_stem(args) + ".json", {
                "task": "classify", "dataset": args.dataset, "settings": settings, "init": described,
                "num_classes": num_classes, "train_images": len(train_set), "test_images": history[-1]["val_images"],
                "head_lr": head_lr, "backbone_lr": head_lr * args.backbone_lr_scale, "epochs_done": len(history),
                "world_size": world, "top1": history[-1]["top1"], "top5": history[-1]["top5"],
                "best_top1": max(h["top1"] for h in history), "history": history})
    linear_eval.fit(args, result_stem(args), settings, probe, optimizer, train_epoch,
                    lambda: linear_eval.evaluate(probe, test_set, local_batch, args, device), write_result)
    log(f"wrote {result_stem(args)}.json")


def classify_transforms(image_size):
    """(train, test) transforms. <= 64 px images keep their scale (pad-and-crop, the CIFAR custom), larger ones get
    random resized crops; both flip. Test: resize + centre crop (01's eval_transform above 64 px; at <= 64 px no
    enlargement, matching the training scale)."""
    normalise = [transforms.ToTensor(), transforms.Normalize(shared.IMAGENET_MEAN, shared.IMAGENET_STD)]
    if image_size > 64:
        return linear_eval.probe_train_transform(image_size), shared.eval_transform(image_size)
    fit = [transforms.Resize(image_size), transforms.CenterCrop(image_size)]
    train = [*fit, transforms.RandomCrop(image_size, padding=image_size // 8, padding_mode="reflect"),
             transforms.RandomHorizontalFlip()]
    return transforms.Compose([*train, *normalise]), transforms.Compose([*fit, *normalise])


def classification_sets(args, train_tf, test_tf):
    """(train set, test set, number of classes) for --dataset, read from --data; items (image, label)."""
    name, root, dl, tv = args.dataset, args.data, args.download, torchvision.datasets
    if name == "imagefolder":
        train_paths, train_labels, classes = shared.list_images(os.path.join(root, "train"))
        val_paths, val_labels = shared.list_val_images(root, classes)
        return (shared.ImageList(train_paths, train_tf, train_labels),
                shared.ImageList(val_paths, test_tf, val_labels), len(classes))
    try:
        if name in ("cifar10", "cifar100"):
            cls = tv.CIFAR10 if name == "cifar10" else tv.CIFAR100
            train = cls(root, train=True, transform=train_tf, download=dl)
            return train, cls(root, train=False, transform=test_tf, download=dl), len(train.classes)
        if name in ("dtd", "flowers102"):
            cls, extra = (tv.DTD, {"partition": 1}) if name == "dtd" else (tv.Flowers102, {})
            train = torch.utils.data.ConcatDataset([cls(root, split=s, transform=train_tf, download=dl, **extra)
                                                    for s in ("train", "val")])
            return train, cls(root, split="test", transform=test_tf, download=dl, **extra), 47 if name == "dtd" else 102
        if name == "sun397":
            return sun397_sets(root, train_tf, test_tf, dl)
        return inaturalist_sets(root, args.inat_version, train_tf, test_tf, dl)
    except RuntimeError as e:
        fail(f"--dataset {name} not found under --data {root} ({str(e).splitlines()[0]}); "
             f"download it there or pass --download")


def sun397_sets(root, train_tf, test_tf, download):
    """SUN397 has no split in torchvision: the first official partition (50 train and 50 test images per class), read
    from Training_01.txt / Testing_01.txt in --data or --data/SUN397."""
    full = torchvision.datasets.SUN397(root, download=download)
    lists = []
    for file in ("Training_01.txt", "Testing_01.txt"):
        found = [p for p in (os.path.join(root, file), os.path.join(root, "SUN397", file)) if os.path.isfile(p)]
        if not found:
            fail(f"{file} not found in {root} or {root}/SUN397; unpack SUN397's Partitions.zip there")
        with open(found[0]) as f:
            lists.append({line.strip().lstrip("/") for line in f if line.strip()})
    relative = [os.path.relpath(p, full._data_dir).replace(os.sep, "/") for p in full._image_files]
    train, test = ([i for i, r in enumerate(relative) if r in listed] for listed in lists)
    return TransformedSubset(full, train, train_tf), TransformedSubset(full, test, test_tf), len(full.classes)


def inaturalist_sets(root, version, train_tf, test_tf, download):
    """2021: the 2021_train and 2021_valid folders. 2017-2019: torchvision reads train and val images from one folder
    (--data/<year>); the official split comes from train<year>.json / val<year>.json."""
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
            fail(f"{path} not found; put iNaturalist {version}'s {split}{version}.json in --data")
        with open(path) as f:  # file_name is "train_val2018/<super>/<id>/<file>": drop the first folder
            names = {image["file_name"].split("/", 1)[1] for image in json.load(f)["images"]}
        subsets.append(TransformedSubset(full, [i for i, r in enumerate(relative) if r in names], transform))
    return subsets[0], subsets[1], len(full.all_categories)


class TransformedSubset(torch.utils.data.Dataset):
    """Items `indices` of a dataset built without a transform, with `transform` applied (one file scan, two splits)."""

    def __init__(self, dataset, indices, transform):
        self.dataset, self.indices, self.transform = dataset, indices, transform

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, index):
        image, label = self.dataset[self.indices[index]]
        return self.transform(image.convert("RGB")), label


# ================================================================ --task detect

def detect(args, device):
    world = dsm.get_world_size()
    # ---- data: VOC 07+12 trainval for training, 07 test for testing; every annotation checked first ----
    train_splits, test_split = [parse_split(s) for s in args.voc_train], parse_split(args.voc_test)
    for year, split in train_splits + [test_split]:  # one line if --data lacks what VOCDetection reads
        base = os.path.join(args.data, "VOCdevkit", f"VOC{year}")
        for need in ("JPEGImages", "Annotations", os.path.join("ImageSets", "Main", f"{split}.txt")):
            if not args.download and not os.path.exists(os.path.join(base, need)):
                fail(f"{os.path.join(base, need)} not found; --data must hold VOCdevkit/VOC<year>/"
                     f"{{JPEGImages,Annotations,ImageSets/Main/<split>.txt}} for {year}:{split} "
                     f"(unpack the VOC tars there, or pass --download)")
    train_set = torch.utils.data.ConcatDataset([voc_images(args, *split, flip=True) for split in train_splits])
    test_set = voc_images(args, *test_split, flip=False)
    test_count = min(len(test_set), args.test_limit or len(test_set))
    args.batch_size = args.batch_size or 16
    local_batch = shared.resolve_rank_batch(args.batch_size, world)
    # ---- network: Faster R-CNN, our ResNet under an FPN ----
    backbone, width, described, settings = starting_backbone(args, DETECT_SETTINGS)
    net = build_detector(backbone, width, len(VOC_CLASSES) + 1, args.min_size, args.test_size, args.max_size,
                         args.det_norm)
    if args.image_size <= 64:
        log(f"note: --image-size {args.image_size} builds the small-image stem (stride 1, no max-pool): at detection "
            "sizes layer1 runs at full resolution; pass the 224 px backbone's --image-size for VOC")
    sync_bn = args.det_norm == "train" and world > 1 and device.type == "cuda"
    if sync_bn:  # BN statistics over the whole batch of 16, as on MoCo's 8 GPUs
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    elif args.det_norm == "train" and world > 1:
        log("note: SyncBatchNorm needs CUDA; on CPU each process normalises over its own images")
    net = net.to(device)
    model = dsm.data_parallel(net, device)
    base_lr = args.lr * args.batch_size / 16
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=base_lr,
                                momentum=args.momentum, weight_decay=args.weight_decay)
    log(f"05_transfer detect: VOC {' + '.join(args.voc_train)} ({len(train_set)} images) -> {args.voc_test} "
        f"({test_count}), {world} process(es) on {device}, batch {args.batch_size}, {args.iters} iterations, lr "
        f"{args.lr:g} x {args.batch_size}/16 = {base_lr:.6g}, BN {args.det_norm}{' (SyncBN)' if sync_bn else ''}, "
        f"backbone {described}")
    # ---- resume, train, evaluate ----
    ckpt_path = result_stem(args) + "_checkpoint.pt"
    it = (shared.resume_from(ckpt_path, settings, net, optimizer) or {}).get("iteration", 0)
    it = train_detector(model, net, optimizer, train_set, args, settings, base_lr, local_batch, it, ckpt_path, device)
    t0 = time.perf_counter()
    dsm.broadcast_buffers(net)
    detections = detect_shard(net, test_set, test_count, device)
    if dist.is_initialized():
        shards = [None] * world
        dist.all_gather_object(shards, detections)
        detections = [d for shard in shards for d in shard]
    if dsm.is_main():
        ap = voc_ap(detections, test_set.objects[:test_count], len(VOC_CLASSES), metric=args.ap_metric)
        log(f"VOC {args.voc_test} ({test_count} images, {time.perf_counter() - t0:.1f} s): AP {ap['AP']:.2f} "
            f"AP50 {ap['AP50']:.2f} AP75 {ap['AP75']:.2f} ({args.ap_metric} interpolation)")
        shared.write_json(result_stem(args) + ".json", {
            "task": "detect", "dataset": "voc", "settings": settings, "init": described,
            "train_images": len(train_set), "test_images": test_count, "iterations": it, "lr": base_lr,
            "AP": ap["AP"], "AP50": ap["AP50"], "AP75": ap["AP75"], "ap_metric": args.ap_metric,
            "per_class": {c: {"AP": a, "AP50": a50} for c, a, a50 in
                          zip(VOC_CLASSES, ap["per_class_AP"], ap["per_class_AP50"])}})
        log(f"wrote {result_stem(args)}.json")


def train_detector(model, net, optimizer, train_set, args, settings, base_lr, local_batch, it, ckpt_path, device):
    """Iterations it..--iters: warm-up and step lr, a checkpoint every --ckpt-every. An epoch's order
    is fixed by (seed, epoch), so a resumed run skips exactly the batches taken."""
    world, rank = dsm.get_world_size(), dsm.get_rank()
    sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True,
                                                  seed=args.seed, drop_last=True)
    steps_per_epoch, meter = len(sampler) // local_batch, shared.Meter()
    if steps_per_epoch == 0:
        fail(f"--batch-size {args.batch_size} exceeds the {len(train_set)} training images; use a smaller one")
    while it < args.iters:
        epoch, skip = divmod(it, steps_per_epoch)
        shared.PROGRESS["where"] = (f"at iteration {it} of {args.iters} (saved every {args.ckpt_every} in "
                                    f"{os.path.basename(ckpt_path)})")
        shared.seed_everything(shared.step_seed(args.seed, it, rank))
        sampler.set_epoch(epoch)
        order = list(sampler)
        batches = [order[i * local_batch:(i + 1) * local_batch] for i in range(skip, steps_per_epoch)]
        loader = shared.data_loader(train_set, args, device, batch_sampler=batches, collate_fn=shared.collate_lists)
        model.train()
        for (images, targets), wait in shared.timed_batches(loader):
            factor = 0.1 ** sum(it >= s for s in args.lr_steps)  # detectron2's schedule: x 0.1 at each step,
            if it < args.warmup_iters:  # after a linear warm-up from base_lr / 1000
                factor *= 0.001 + (1 - 0.001) * it / args.warmup_iters
            lr = base_lr * factor
            for group in optimizer.param_groups:
                group["lr"] = lr
            losses = model([im.to(device, non_blocking=True) for im in images],
                           [{k: v.to(device) for k, v in t.items() if k != "difficult"} for t in targets])
            loss = sum(losses.values())
            value = linear_eval.mean_over_ranks(loss.item(), device)  # equal on every rank: all stop together
            shared.stop_if_not_finite(value, f"iteration {it}", f"{ckpt_path} holds the last checkpoint; "
                                      "lower --lr or raise --warmup-iters and rerun to resume")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            it += 1
            meter.add(value, wait)
            if it % args.print_freq == 0 or it == args.iters:
                parts = " ".join(f"{k.removeprefix('loss_')} {v.item():.3f}" for k, v in losses.items())
                meter.line(f"iter {it}/{args.iters}", lr, args.batch_size, args.iters - it, device, f" ({parts})")
            if it % args.ckpt_every == 0 or it == args.iters:
                shared.save_for_resume(ckpt_path, settings, net, optimizer, iteration=it)
            if it == args.iters:
                break
    return it


def build_detector(backbone, width, num_classes, min_size, test_size, max_size, norm="train"):
    """torchvision Faster R-CNN on `backbone` (a ResNet, weights loaded) under an FPN over layer1-4 (+ a max-pooled
    P6); all layers trained, nothing downloaded, each training image's short side drawn from min_size. norm "train":
    BN everywhere trainable, FPN with BN too (MoCo's protocol); "frozen": the backbone's BN frozen, FPN without norm."""
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


class VOCImages(torch.utils.data.Dataset):
    """VOC images with their checked objects: (float image [3, H, W] in [0, 1], {"boxes", "labels", "difficult"}),
    randomly flipped for training. The model normalises the image itself."""

    def __init__(self, images, objects, flip):
        self.images, self.objects, self.flip = images, objects, flip

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        image = TF.to_tensor(shared.load_rgb(self.images[index]))
        boxes, labels, difficult = self.objects[index]
        if self.flip and random.random() < 0.5:
            image, width = image.flip(-1), image.shape[-1]
            boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)
        return image, {"boxes": boxes, "labels": labels, "difficult": difficult}


def voc_images(args, year, split, flip):
    """The VOCImages of one year:split: the files torchvision's VOCDetection lists (it downloads with --download),
    every annotation parsed and checked now (voc_objects), before any training."""
    listed = torchvision.datasets.VOCDetection(args.data, year, split, download=args.download)
    return VOCImages(listed.images, [voc_objects(path) for path in listed.annotations], flip)


def voc_objects(path):
    """One VOC annotation file -> (boxes [n, 4] float, labels [n] int64 in 1..20, difficult [n] bool), VOC's 1-based
    inclusive corners as continuous coordinates (xmin - 1, ymin - 1, xmax, ymax). A file that does not parse, an
    object without a known <name> or a <bndbox> with xmin < xmax, ymin < ymax inside the image: one line naming it."""
    fix = "fix or restore it from the VOC tar"
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        fail(f"{path} is not a readable VOC annotation ({e}); {fix}")
    width, height = (float(root.findtext(f"size/{key}") or 0) for key in ("width", "height"))
    boxes, labels, difficult = [], [], []
    for obj in root.iter("object"):
        name, box = obj.findtext("name"), obj.find("bndbox")
        if name not in VOC_CLASSES:
            fail(f"{path}: unknown class {name!r}; VOC has {', '.join(VOC_CLASSES)}; {fix}")
        try:
            x0, y0, x1, y1 = (float(box.findtext(key)) for key in ("xmin", "ymin", "xmax", "ymax"))
        except (AttributeError, TypeError, ValueError):
            fail(f"{path}: a {name} has no <bndbox> with numeric xmin, ymin, xmax, ymax; {fix}")
        if not (0 <= x0 < x1 and 0 <= y0 < y1) or (width and x1 > width) or (height and y1 > height):
            fail(f"{path}: the {name} box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) is empty or outside the "
                 f"{width:g} x {height:g} image; {fix}")
        boxes.append([x0 - 1, y0 - 1, x1, y1])
        labels.append(VOC_CLASSES.index(name) + 1)
        difficult.append(obj.findtext("difficult", "0").strip() == "1")
    return (torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(labels, dtype=torch.int64),
            torch.tensor(difficult, dtype=torch.bool))


def parse_split(text):
    year, _, split = text.partition(":")
    if year not in [str(y) for y in range(2007, 2013)] or split not in ("train", "val", "trainval", "test"):
        fail(f"{text!r} is not YEAR:SPLIT (e.g. 2007:trainval, 2012:trainval, 2007:test)")
    return year, split


def freeze_batchnorm(module):
    """Replace every BatchNorm2d by a FrozenBatchNorm2d holding the same affine and statistics."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = torchvision.ops.FrozenBatchNorm2d(child.num_features, eps=child.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)
    return module


@torch.no_grad()
def detect_shard(net, dataset, count, device):
    """This process's detections on its contiguous shard of the first `count` test images: a list of (image index,
    boxes [n, 4], scores [n], labels [n] in 0..19) on the CPU."""
    net.eval()
    train_sizes, net.transform.min_size = net.transform.min_size, (net.transform.test_size,)
    out = []
    for i in range(*dsm.shard_range(count, dsm.get_rank(), dsm.get_world_size())):
        (pred,) = net([dataset[i][0].to(device)])
        out.append((i, pred["boxes"].float().cpu(), pred["scores"].float().cpu(), pred["labels"].cpu() - 1))
    net.transform.min_size = train_sizes
    return out


def voc_ap(detections, truths, num_classes, metric):
    """VOC-style AP. detections: [(image index, boxes [n, 4], scores [n], labels [n] 0-based)]; truths[image index] =
    (boxes [m, 4], labels [m] 1-based, difficult [m]) as voc_objects gives. Per class and IoU threshold, detections in
    descending score order (stable) are matched to the ground truth box of their image and class with the largest IoU.
    IoU > threshold: a difficult box -> ignored, an unmatched box -> true positive, a matched one -> false positive (a
    duplicate); below -> false positive. Recall counts non-difficult boxes; classes without any are left out (AP None).
    Returns AP (%, mean over classes and 0.50:0.05:0.95), AP50, AP75 and the per-class AP and AP50."""
    thresholds = np.round(np.arange(0.5, 0.951, 0.05), 2)  # column 0: IoU 0.50, column 5: 0.75
    table = np.full((num_classes, len(thresholds)), np.nan)
    for c in range(num_classes):
        gt = {i: (boxes[labels == c + 1], difficult[labels == c + 1].numpy())
              for i, (boxes, labels, difficult) in enumerate(truths) if (labels == c + 1).any()}
        positives = sum(int((~d).sum()) for _, d in gt.values())
        if positives == 0:
            continue
        dets = sorted([(float(s), i, b) for i, boxes, scores, labels in detections
                       for b, s, l in zip(boxes, scores, labels) if int(l) == c], key=lambda d: -d[0])
        matched = {i: np.zeros((len(thresholds), len(d)), bool) for i, (_, d) in gt.items()}
        tp, fp = np.zeros((len(dets), len(thresholds))), np.zeros((len(dets), len(thresholds)))
        for k, (_, i, box) in enumerate(dets):
            if i not in gt:
                fp[k] = 1
                continue
            boxes, difficult = gt[i]
            iou = box_iou(box[None].double(), boxes.double())[0].numpy()
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
            precision = tp[:, t] / np.maximum(tp[:, t] + fp[:, t], np.finfo(np.float64).eps)
            table[c, t] = interpolated_ap(tp[:, t] / positives, precision, metric)
    present = ~np.isnan(table[:, 0])

    def percent(values):
        return 100.0 * float(np.mean(values)) if np.size(values) else float("nan")
    return {"AP": percent(table[present]), "AP50": percent(table[present, 0]), "AP75": percent(table[present, 5]),
            "per_class_AP": [percent(row) if ok else None for row, ok in zip(table, present)],
            "per_class_AP50": [percent(row[0]) if ok else None for row, ok in zip(table, present)]}


def interpolated_ap(recall, precision, metric):
    """Area under the precision envelope (max precision at any recall >= r). all-point: at every recall step;
    11-point: the mean over r = 0, 0.1, ..., 1 (VOC 2007's original metric)."""
    if metric == "11-point":
        return float(np.mean([precision[recall >= r].max() if (recall >= r).any() else 0.0
                              for r in np.linspace(0, 1, 11)]))
    r = np.concatenate([[0.0], recall, [1.0]])
    p = np.maximum.accumulate(np.concatenate([[0.0], precision, [0.0]])[::-1])[::-1]
    steps = np.nonzero(r[1:] != r[:-1])[0]
    return float(((r[steps + 1] - r[steps]) * p[steps + 1]).sum())


# ================================================================ --task export

def export(args, device):
    if not dsm.is_main():
        return
    backbone, _, described = linear_eval.load_pretrained_backbone(args.init, args.arch, args.image_size, args.seed,
                                                                  flag="--init")
    state = shared.cpu_state(backbone)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "backbone" + ("_random" if args.init == "random" else ""))
    tv_path, d2_path = stem + "_torchvision.pth", stem + "_detectron2.pkl"
    shared.atomic_save(state, tv_path)
    d2 = detectron2_names(state)
    shared.atomic_save({"model": d2, "__author__": "05_transfer.py (instance classification pretraining)",
                        "matching_heuristics": True}, d2_path, dump=lambda o, f: pickle.dump(o, f, protocol=4))
    small = state["conv1.weight"].shape[-1] == 3
    print(f"wrote {tv_path} ({len(state)} tensors, torchvision names) and {d2_path} ({len(d2)} arrays, "
          f"detectron2 names)")
    if small:
        print("note: this backbone has the small-image 3x3 stem; detectron2's and mmdetection's default "
              "ResNets have a 7x7 stem and skip stem.conv1 with only a warning")
    path = result_stem(args) + ".json"
    shared.write_json(path, {"task": "export", "dataset": "backbone", "settings": vars(args), "init": described,
                             "torchvision": tv_path, "detectron2": d2_path, "tensors": len(state),
                             "stem": "3x3 stride 1, no max-pool" if small else "7x7 stride 2 + max-pool"})
    print(f"wrote {path}")


def detectron2_names(state):
    """torchvision ResNet keys -> detectron2's, values as numpy arrays: conv1 -> stem.conv1, bn1 -> stem.conv1.norm;
    layerN.b -> res{N+1}.b; convK/bnK -> convK/convK.norm; downsample.0/.1 -> shortcut/shortcut.norm; fc and BN
    counters (num_batches_tracked) dropped."""
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


if __name__ == "__main__":
    main()
