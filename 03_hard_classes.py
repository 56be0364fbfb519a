"""Hard-class mining: the k most similar other classes of every instance class (Eq. 2-3).

The paper's third technique smooths the one-hot target of instance i onto H_k(i), the k classes
whose classifier rows are most cosine-similar to w_i (k = 100, alpha = 0.2, refreshed once per
epoch). That is an N x N similarity search over the sharded classifier: 1.28M x 1.28M for
ImageNet-1K, 14.2M x 14.2M for ImageNet-21K. Here it never holds an N x N matrix, nor the N x k
table on one process:

  mine_hard_classes(classifier, k)         every rank streams every rank's normalised rows, in
                                           chunks, and keeps a running top-k for the rows it owns
                                           -> [end - start, k] global ids, most similar first
  lookup_hard_classes(table, labels, clf)  per training step: the k ids of each label of the
                                           local batch, fetched from their owners (2 collectives)

02_pretrain.py calls both at the start of every epoch and every step. Run on its own, this script
mines from the newest classifier rows in a run folder (RUN/checkpoint.pt from 02, else RUN/init.pt
from 01; the dataset is the one they recorded unless --data is given) and writes
  RUN/hard_classes.pt    {"hard_classes": [N, k] int64, "similarity": [N, k] float32, ...}
  RUN/hard_classes.json  cosine of the 1st and k-th hard class (mean, percentiles); share of hard
                         classes from the anchor's own folder class against chance (the paper's
                         "semantically similar instance pairs"); mining time
  RUN/hard_classes.png   --grid-rows anchor images (red frame), each followed by its hardest classes

Commands:
  python 03_hard_classes.py --out runs/demo --hard-k 10 --image-size 64
  torchrun --nproc_per_node=8 03_hard_classes.py --out runs/in1k --data /datasets/imagenet
  torchrun --nnodes=8 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
      03_hard_classes.py --out runs/in1k --data /datasets/imagenet
"""
import argparse
import importlib
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from PIL import Image

import dist_softmax as dsm

extract = importlib.import_module("01_extract_init")

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
extract.add_common_args(parser, epochs=None, batch_size=4096, data_required=False)
parser.add_argument("--hard-k", type=int, default=100, help="hard classes per instance, k of Eq. 2 (paper: 100)")
parser.add_argument("--chunk-size", type=int, default=None,
                    help="rows and columns per similarity block (default: 2048 on CPU, 8192 on GPU)")
parser.add_argument("--grid-rows", type=int, default=8, help="anchors in hard_classes.png (drawn with --seed)")
parser.add_argument("--grid-cols", type=int, default=8, help="hardest negatives shown per anchor")

GROUP = 16  # strided columns per group maximum in the candidate filter (see _candidates)
DEFAULT_CHUNK = {"cpu": 2048, "cuda": 8192}  # rows and columns per similarity block
DENSE = 1024  # columns of a plain top-k that set each row's first threshold


@torch.no_grad()
def main(argv=None):
    args = parser.parse_args(argv)
    owns_group = not dist.is_initialized()  # a caller's group is left to the caller
    device = dsm.init_distributed(args.device)
    log = print if dsm.is_main() else (lambda *a, **k: None)

    # ---- classifier: the newest rows in the run folder ----
    found = [os.path.join(args.out, name) for name in ("checkpoint.pt", "init.pt")]
    found = [path for path in found if os.path.isfile(path)]
    if not found:
        extract.fail(f"no checkpoint.pt or init.pt in {args.out}; run 01_extract_init.py --out {args.out} first")
    source = max(found, key=os.path.getmtime)
    ckpt = torch.load(source, map_location="cpu", mmap=True, weights_only=True)
    if not isinstance(ckpt, dict) or "classifier" not in ckpt:
        extract.fail(f"{source} has no classifier rows; it was not written by 01_extract_init.py or 02_pretrain.py")
    state, epoch = ckpt["classifier"], ckpt.get("epoch")
    data_root = args.data or ckpt.get("args", {}).get("data")
    num_classes, dim = state["weight"].shape
    if not 1 <= args.hard_k < num_classes:
        extract.fail(f"--hard-k {args.hard_k} needs 1 <= k < {num_classes}, the number of classes")
    classifier = dsm.DistCosineSoftmax(num_classes, dim).to(device)
    dsm.load_classifier(classifier, state)
    del ckpt, state

    # ---- data: instance i is paths[i]; folder labels for the diagnostics ----
    if data_root is None:
        extract.fail(f"{source} does not record its dataset; pass --data ROOT (the folder holding train/)")
    paths, labels, classes = extract.list_images(os.path.join(data_root, "train"))
    if len(paths) != num_classes:
        extract.fail(f"{data_root}/train holds {len(paths)} images but {source} has {num_classes} classifier "
                     "rows; pass the --data this run was made from")
    extract.check_data_fingerprint(args.out, paths, data_root)

    # ---- mine ----
    log(f"03_hard_classes: {args.hard_k} hard classes for each of {num_classes} classes ({dim} dims) from "
        f"{source}, {dsm.get_world_size()} process(es) on {device}")
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    similarity, table = _mine(classifier, args.hard_k, args.chunk_size)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    log(f"mined in {seconds:.1f} s")

    # ---- save: the shards travel to rank 0 one at a time ----
    table = dsm.gather_shards(table, num_classes)
    similarity = dsm.gather_shards(similarity, num_classes)
    if dsm.is_main():
        path = os.path.join(args.out, "hard_classes.pt")
        dsm.atomic_save({"hard_classes": table, "similarity": similarity, "k": args.hard_k,
                         "num_classes": num_classes, "source": os.path.basename(source), "epoch": epoch}, path)
        log(f"wrote {path}: [{num_classes}, {args.hard_k}] hard class ids and their cosine similarities")

        # ---- diagnostics ----
        report = {"source": os.path.basename(source), "epoch": epoch, "num_classes": num_classes, "dim": dim,
                  "k": args.hard_k, "world_size": dsm.get_world_size(), "device": device.type,
                  "mine_seconds": round(seconds, 3),
                  "similarity_1st": _summary(similarity[:, 0]), "similarity_kth": _summary(similarity[:, -1]),
                  "same_class": _same_class(table, labels) if len(classes) > 1 else None}
        path = os.path.join(args.out, "hard_classes.json")
        extract.write_json(path, report)
        log(json.dumps(report))

        # ---- image grid: anchors (red frame) followed by their hardest negatives ----
        path = os.path.join(args.out, "hard_classes.png")
        _save_grid(paths, table, path, args)
        log(f"wrote {path}")
    dsm.finish_distributed(owns_group)


# ---------------------------------------------------------------- mining and lookup

@torch.no_grad()
def mine_hard_classes(classifier, k, chunk_size=None):
    """Global ids [end - start, k] of the k classes most cosine-similar to each local row, most
    similar first, never the row itself. Collective: every rank must call it.

    Each owner in turn broadcasts its normalised shard (the buffer is sized by shard_range, so
    uneven shards need no padding exchange); every rank scores its own rows against it in
    chunk x chunk blocks and keeps a running top-k. Memory beyond the result: one shard of rows
    and one chunk x chunk block per CPU thread, whatever N is; never an N x N matrix.
    """
    return _mine(classifier, k, chunk_size)[1]


@torch.no_grad()
def lookup_hard_classes(table, labels, classifier):
    """The hard classes [b, k] of this rank's labels [b] (global ids), read from their owners' rows.

    b must be equal on all ranks. Collective: every rank must call it. Memory O(W b k) on top of
    the [end - start, k] table, which is never replicated.
    """
    if classifier.world_size == 1:
        return table[labels]
    # all_gather: every rank learns the W*b labels of the global batch.
    all_labels = dsm.all_gather_rows(labels)
    # Each rank fills the rows it owns; every other row stays 0, so summing over ranks assembles
    # the table rows of the whole batch exactly (exactly one owner contributes to each row).
    rows = all_labels - classifier.start
    mine = (rows >= 0) & (rows < table.shape[0])
    contrib = table.new_zeros(len(all_labels), table.shape[1])
    contrib[mine] = table[rows[mine]]
    # reduce_scatter (sum): rank r receives the sum over ranks of rows [r*b, (r+1)*b) = its answer.
    return dsm.reduce_scatter_rows(contrib)


def _mine(classifier, k, chunk_size=None):
    """(similarity [n, k] float32, ids [n, k] int64) of the top-k other classes of each local row."""
    w = classifier.weight.detach()
    device, n_local, dim = w.device, w.shape[0], w.shape[1]
    num_classes, world, rank, start = (classifier.num_classes, classifier.world_size,
                                       classifier.rank, classifier.start)
    if not 1 <= k < num_classes:
        raise ValueError(f"k = {k} hard classes need 1 <= k < num_classes = {num_classes}")
    chunk = -(-(chunk_size or DEFAULT_CHUNK.get(device.type, 2048)) // GROUP) * GROUP
    w_norm = F.normalize(w.float(), dim=1)

    best_val = torch.full((n_local, k), float("-inf"), dtype=torch.float32, device=device)
    best_idx = torch.full((n_local, k), -1, dtype=torch.long, device=device)
    threshold = torch.full((n_local,), float("-inf"), dtype=torch.float32, device=device)  # running k-th best per row
    row_chunks = [(r0, min(r0 + chunk, n_local)) for r0 in range(0, n_local, chunk)]
    started = [False] * len(row_chunks)
    # One owner's shard at a time, plus GROUP spare rows so every column block is whole groups.
    shard = torch.zeros(n_local + 1 + GROUP, dim, dtype=torch.float32, device=device)
    local = threading.local()

    def scan(ci, o_start, o_end):
        """Stream the owner's columns [o_start, o_end) past local row chunk ci."""
        r0, r1 = row_chunks[ci]
        rows = slice(r0, r1)
        if not hasattr(local, "scores"):
            local.scores = torch.empty(min(chunk, n_local) * chunk, dtype=torch.float32, device=device)
        pending, pending_count = [], torch.zeros(r1 - r0, dtype=torch.long, device=device)
        for c0 in range(o_start, o_end, chunk):
            c1 = min(c0 + chunk, o_end)
            width = -(-(c1 - c0) // GROUP) * GROUP
            s = local.scores[:(r1 - r0) * width].view(r1 - r0, width)
            torch.mm(w_norm[rows], shard[c0 - o_start:c0 - o_start + width].t(), out=s)
            s[:, c1 - c0:] = float("-inf")  # padding columns
            lo, hi = max(start + r0, c0), min(start + r1, c1)
            if lo < hi:  # a class is never its own hard negative
                diag = torch.arange(lo, hi, device=device)
                s[diag - start - r0, diag - c0] = float("-inf")
            dense = 0
            if not started[ci]:
                # The first columns seen: a plain top-k sets a finite threshold to filter with.
                dense, started[ci] = min(width, DENSE), True
                _merge(best_val[rows], best_idx[rows], threshold[rows],
                       [(s[:, :dense], torch.arange(c0, c0 + dense, device=device).expand(r1 - r0, -1))])
            r, c, v = _candidates(s, threshold[rows], dense)
            if r.numel():
                # r comes out sorted, so each candidate's slot in its row's pending list is the
                # row's earlier count plus its rank within this block.
                counts = torch.bincount(r, minlength=r1 - r0)
                within = torch.arange(r.numel(), device=device) - (torch.cumsum(counts, 0) - counts)[r]
                pending.append((r, pending_count[r] + within, c + c0, v))
                pending_count += counts
                # Merging raises the thresholds but re-sorts k entries per row: merge once the rows
                # hold k pending candidates on average (or one of them holds many).
                if int(pending_count.sum()) >= (r1 - r0) * k or int(pending_count.max()) >= 4 * k:
                    _merge_pending(best_val[rows], best_idx[rows], threshold[rows], pending, pending_count)
                    pending = []
        if pending:
            _merge_pending(best_val[rows], best_idx[rows], threshold[rows], pending, pending_count)

    # On CPU the filter's small ops scale poorly across threads, so the cores take whole row
    # chunks instead (one thread each); on GPU one stream does it all.
    workers = min(torch.get_num_threads(), len(row_chunks)) if device.type == "cpu" else 1
    threads_before = torch.get_num_threads()
    pool = ThreadPoolExecutor(workers) if workers > 1 else None
    try:
        if pool:
            torch.set_num_threads(1)
        for owner in range(world):
            o_start, o_end = dsm.shard_range(num_classes, owner, world)
            if owner == rank:
                shard[:o_end - o_start] = w_norm
            if world > 1:
                dist.broadcast(shard[:o_end - o_start], src=owner)
            if pool:
                list(pool.map(lambda ci: scan(ci, o_start, o_end), range(len(row_chunks))))
            else:
                for ci in range(len(row_chunks)):
                    scan(ci, o_start, o_end)
    finally:
        if pool:
            pool.shutdown()
            torch.set_num_threads(threads_before)

    order = best_val.argsort(dim=1, descending=True)
    return best_val.gather(1, order), best_idx.gather(1, order)


def _candidates(s, thr, skip):
    """(row, column, value) of the entries of s [r, c] at or above their row's threshold, columns
    from `skip` on; rows come out sorted.

    Sorting every row of s would cost more than the product that made it, so this filters instead:
    each row's maxima over GROUP strided columns (j, j + c/GROUP, ...) take one cheap vectorised
    pass, and only the groups whose maximum passes are read again. Past the first few thousand
    columns the threshold is high enough that few groups pass.
    """
    rows, width = s.shape
    if skip:
        r, c = (s[:, skip:] >= thr[:, None]).nonzero(as_tuple=True)
        return r, c + skip, s[r, c + skip]
    stride = width // GROUP
    groups = s.view(rows, GROUP, stride)
    hit_row, hit_col = (groups.amax(1) >= thr[:, None]).nonzero(as_tuple=True)
    if 2 * hit_row.numel() > rows * stride:  # most groups pass: test every entry instead
        r, c = (s >= thr[:, None]).nonzero(as_tuple=True)
        return r, c, s[r, c]
    vals = groups[hit_row, :, hit_col]  # [hits, GROUP]
    pick, member = (vals >= thr[hit_row, None]).nonzero(as_tuple=True)
    return hit_row[pick], member * stride + hit_col[pick], vals[pick, member]


def _merge_pending(best_val, best_idx, threshold, pending, pending_count):
    """Merge pending candidates [(row, slot, column, value), ...] into the rows' running top-k."""
    width = int(pending_count.max())
    new_val = torch.full((best_val.shape[0], width), float("-inf"), dtype=best_val.dtype, device=best_val.device)
    new_idx = torch.full((best_val.shape[0], width), -1, dtype=torch.long, device=best_val.device)
    for row, slot, col, val in pending:
        new_val[row, slot] = val
        new_idx[row, slot] = col
    pending_count.zero_()
    _merge(best_val, best_idx, threshold, [(new_val, new_idx)])


def _merge(best_val, best_idx, threshold, blocks):
    """Running top-k of each row (in place) over itself and dense (values, ids) blocks."""
    merged_val = torch.cat([best_val] + [v for v, _ in blocks], 1)
    merged_idx = torch.cat([best_idx] + [i for _, i in blocks], 1)
    top_val, top_pos = merged_val.topk(best_val.shape[1], dim=1, sorted=False)
    best_val.copy_(top_val)
    best_idx.copy_(merged_idx.gather(1, top_pos))
    threshold.copy_(top_val.amin(1))


# ---------------------------------------------------------------- report helpers

def _summary(values):
    """Mean and percentiles of a 1-D tensor, as plain floats."""
    values = values.double()
    qs = torch.tensor([0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99], dtype=torch.float64)
    return {"mean": round(float(values.mean()), 4),
            **{f"p{int(q * 100)}": round(float(v), 4) for q, v in zip(qs, torch.quantile(values, qs))}}


def _same_class(table, labels):
    """Share of hard negatives in the anchor's own folder class, against chance: a random other
    instance shares the class with probability sum_c n_c (n_c - 1) / (N (N - 1))."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    n = labels.numel()
    sizes = torch.bincount(labels).double()
    same = labels[table] == labels[:, None]
    return {"classes": int(sizes.numel()), "share_1st": round(float(same[:, 0].double().mean()), 4),
            "share_all_k": round(float(same.double().mean()), 4),
            "chance": round(float((sizes * (sizes - 1)).sum() / (n * (n - 1))), 4)}


def _save_grid(paths, table, path, args):
    """One row per anchor: the anchor (red frame), then its hardest negatives in order."""
    generator = torch.Generator().manual_seed(args.seed)
    anchors = torch.randperm(len(paths), generator=generator)[:args.grid_rows].sort().values
    cols = min(args.grid_cols, table.shape[1])
    transform = extract.eval_transform(args.image_size)
    mean = torch.tensor(extract.IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(extract.IMAGENET_STD)[:, None, None]
    tiles = []
    for a in anchors.tolist():
        for j, i in enumerate([a] + table[a, :cols].tolist()):
            with Image.open(paths[i]) as image:
                tile = transform(image.convert("RGB")) * std + mean  # undo the normalisation
            if j == 0:
                frame = max(1, args.image_size // 32)
                tile[:, :frame], tile[:, -frame:], tile[:, :, :frame], tile[:, :, -frame:] = (
                    torch.tensor([1.0, 0.0, 0.0])[:, None, None],) * 4
            tiles.append(tile.clamp(0, 1))
    torchvision.utils.save_image(torch.stack(tiles), path, nrow=cols + 1, padding=2, pad_value=1.0)


if __name__ == "__main__":
    main()
