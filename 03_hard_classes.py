"""Hard-class mining: the k most similar other classes of every instance class (Eq. 2-3).

The paper's third technique smooths the one-hot target of instance i onto H_k(i), the k classes whose
classifier rows are most cosine-similar to w_i (k = 100, alpha = 0.2, refreshed once per epoch): an N x N
search over the sharded classifier (1.28M x 1.28M for ImageNet-1K, 14.2M x 14.2M for ImageNet-21K), done
here without any process holding an N x N matrix or the whole N x k table. 02_pretrain.py calls
  mine_hard_classes(classifier, k)         every epoch: each rank streams all the normalised rows in chunks and keeps a
                                           running top-k of its rows -> ids, similarities [end - start, k], best first
  lookup_hard_classes(table, labels, clf)  every step: each local label's k ids, from their owners (2 collectives)

Run on its own (a report: 02 mines its own table every epoch), it mines the trained rows of RUN/checkpoint.pt (02)
if it exists, else the prior's of RUN/init.pt (01), on the dataset they recorded unless --data is given, and writes
  RUN/hard_classes.pt    {"hard_classes": [N, k] int64, "similarity": [N, k] float32, ...}
  RUN/hard_classes.json  cosine of the 1st and k-th hard class (mean, percentiles); mining time; share of hard
                         classes in the anchor's folder class vs chance (paper: "semantically similar instance pairs")
  RUN/hard_classes.png   --grid-rows anchor images (red frame), each followed by its hardest classes

Commands:
  python 03_hard_classes.py --out runs/demo --hard-k 10 --image-size 64
  torchrun --nproc_per_node=8 03_hard_classes.py --out runs/in1k --data /datasets/imagenet
  torchrun --nnodes=8 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
      03_hard_classes.py --out runs/in1k --data /datasets/imagenet
"""
import importlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
import torchvision

import dist_softmax as dsm

shared = importlib.import_module("01_extract_init")  # 01, and below its banner what every stage shares
fail, log, POSITIVE = shared.fail, shared.log, shared.POSITIVE

parser = shared.Parser(__doc__)
shared.add_common_args(parser, epochs=None, batch_size=4096, data_required=False, network_of_run=True)
parser.add_argument("--hard-k", type=POSITIVE, default=100, help="hard classes per instance, k of Eq. 2 (paper: 100)")
parser.add_argument("--chunk-size", type=POSITIVE, default=None,
                    help="rows and columns per similarity block (default: 1024 on CPU, 8192 on GPU)")
parser.add_argument("--grid-rows", type=POSITIVE, default=8, help="anchors in hard_classes.png (drawn with --seed)")
parser.add_argument("--grid-cols", type=POSITIVE, default=8, help="hardest negatives shown per anchor")

GROUP = 16  # columns summarised by one maximum in the candidate filter (see candidates)
DEFAULT_CHUNK = {"cpu": 1024, "cuda": 8192}  # rows and columns per similarity block (on CPU: cache-sized)


@torch.no_grad()
def main(argv=None):
    args = parser.parse_args(argv)
    with shared.stage(args) as device:
        shared.run_network(args)  # --image-size of the grid: the run's
        # ---- classifier: the trained rows (checkpoint.pt of 02) if any, else the prior's (init.pt of 01) ----
        checkpoint, init = (os.path.join(args.out, name) for name in ("checkpoint.pt", "init.pt"))
        source = checkpoint if os.path.isfile(checkpoint) else init
        if not os.path.isfile(source):
            fail(f"no checkpoint.pt or init.pt in {args.out}; run 01_extract_init.py --out {args.out} first")
        ckpt = shared.load_run_file(source, ("classifier",), "rerun the stage that wrote it "
                                    "(01_extract_init.py for init.pt, 02_pretrain.py for checkpoint.pt)")
        state, epoch, data_root = ckpt["classifier"], ckpt.get("epoch"), args.data or ckpt.get("args", {}).get("data")
        # The data fingerprint (sha256 of the training list) the rows were made from: init.pt's, or the checkpoint's.
        data_sha256 = (ckpt.get("fingerprint") or {}).get("sha256") or (ckpt.get("settings") or {}).get("data")
        log(f"rows of {source}" + (f", after epoch {epoch}" if epoch is not None else ", the prior of 01"))
        num_classes, dim = state["weight"].shape
        if not 1 <= args.hard_k < num_classes:
            fail(f"--hard-k {args.hard_k} needs 1 <= k < {num_classes}, the number of classes")
        classifier = dsm.DistCosineSoftmax(num_classes, dim).to(device)  # here only the rows' shard layout
        dsm.load_classifier(classifier, state)
        del ckpt, state

        # ---- data: instance i is paths[i]; folder labels for the diagnostics ----
        if data_root is None:
            fail(f"{source} does not record its dataset; pass --data ROOT (the folder holding train/)")
        paths, labels, classes = shared.list_images(os.path.join(data_root, "train"))
        if len(paths) != num_classes:
            fail(f"{data_root}/train holds {len(paths)} images but {source} has {num_classes} classifier "
                 "rows; pass the --data this run was made from")
        fingerprint = shared.check_data(args.out, paths, data_root)
        if data_sha256 not in (None, fingerprint["sha256"]):
            fail(f"{source} was made from other training images than {data_root}/train lists; pass the --data "
                 "this run was made from")

        # ---- mine ----
        log(f"03_hard_classes: {args.hard_k} hard classes for each of {num_classes} classes ({dim} dims) from "
            f"{source}, {dsm.get_world_size()} process(es) on {device}")
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)  # time the GPU's work, not its queue
        sync()
        t0 = time.perf_counter()
        table, similarity = mine_hard_classes(classifier, args.hard_k, args.chunk_size)
        sync()
        seconds = time.perf_counter() - t0
        log(f"mined in {seconds:.1f} s")

        # ---- save: the shards travel to rank 0 one at a time ----
        table, similarity = (dsm.gather_shards(shard, num_classes) for shard in (table, similarity))
        if dsm.is_main():
            path = os.path.join(args.out, "hard_classes.pt")
            shared.atomic_save({"hard_classes": table, "similarity": similarity, "k": args.hard_k,
                                "num_classes": num_classes, "source": os.path.basename(source), "epoch": epoch},
                               path)
            log(f"wrote {path}: [{num_classes}, {args.hard_k}] hard class ids and their cosine similarities")
            # ---- diagnostics ----
            report = {"source": os.path.basename(source), "epoch": epoch, "num_classes": num_classes, "dim": dim,
                      "k": args.hard_k, "world_size": dsm.get_world_size(), "device": device.type,
                      "mine_seconds": round(seconds, 3),
                      "similarity_1st": _summary(similarity[:, 0]), "similarity_kth": _summary(similarity[:, -1]),
                      "same_class": _same_class(table, labels) if len(classes) > 1 else None}
            shared.write_json(os.path.join(args.out, "hard_classes.json"), report)
            log(json.dumps(report))
            # ---- image grid: anchors (red frame) followed by their hardest negatives ----
            path = os.path.join(args.out, "hard_classes.png")
            _save_grid(paths, table, path, args)
            log(f"wrote {path}")


# ---------------------------------------------------------------- mining and lookup

@torch.no_grad()
def mine_hard_classes(classifier, k, chunk_size=None):
    """(ids, similarities), each [end - start, k]: the k classes most cosine-similar to each of this rank's
    rows, most similar first, never the row itself (global ids). Collective: every rank calls it. Each owner
    in turn broadcasts its normalised rows; every rank scores its own rows against them in chunk x chunk
    blocks, keeping each row's k best so far (RunningTopK). Memory beyond the result: the normalised local
    rows, one shard, one block of scores per CPU thread, the candidates awaiting a merge; never N x N. On CPU
    each thread takes whole blocks of rows, its alone (the small filter operations gain little from torch's threads)."""
    if not 1 <= k < classifier.num_classes:
        raise ValueError(f"k = {k} hard classes need 1 <= k < num_classes = {classifier.num_classes}")
    w = F.normalize(classifier.weight.detach().float(), dim=1)
    device = w.device
    chunk = -(-(chunk_size or DEFAULT_CHUNK.get(device.type, 1024)) // GROUP) * GROUP  # whole groups
    top = RunningTopK(len(w), k, device)
    row_blocks = [(r0, min(r0 + chunk, len(w))) for r0 in range(0, len(w), chunk)]
    # One owner's rows at a time, plus GROUP spare rows (columns at -inf): every column block is whole groups.
    for o_start, o_end, shard in dsm.each_shard(w, classifier.num_classes, spare=GROUP):
        for_each_block(row_blocks, device, lambda r0, r1: score_rows(
            w, r0, r1, shard, o_start, o_end, classifier.start, chunk, top))
    return top.result()


def score_rows(w, r0, r1, shard, o_start, o_end, start, chunk, top):
    """Scores of local rows r0..r1 against the owner's rows [o_start, o_end), block by block, into top."""
    buffer = torch.empty((r1 - r0) * chunk, dtype=torch.float32, device=w.device)  # reused for every block
    for c0 in range(0, o_end - o_start, chunk):
        c1 = min(c0 + chunk, o_end - o_start)
        width = -(-(c1 - c0) // GROUP) * GROUP
        scores = torch.mm(w[r0:r1], shard[c0:c0 + width].t(), out=buffer[:(r1 - r0) * width].view(r1 - r0, width))
        scores[:, c1 - c0:] = float("-inf")  # padding columns
        lo, hi = max(start + r0, o_start + c0), min(start + r1, o_start + c1)
        if lo < hi:  # a class is never its own hard class
            own = torch.arange(lo, hi, device=w.device)
            scores[own - start - r0, own - o_start - c0] = float("-inf")
        top.add(r0, r1, scores, o_start + c0)
    top.flush(r0, r1)


def for_each_block(row_blocks, device, fn):
    """fn(r0, r1) per block of rows: on CPU in a thread pool, one torch thread each; on GPU in order (one stream)."""
    threads = torch.get_num_threads()
    workers = min(threads, len(row_blocks)) if device.type == "cpu" else 1
    if workers == 1:
        for r0, r1 in row_blocks:
            fn(r0, r1)
        return
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda block: fn(*block), row_blocks))
    finally:
        torch.set_num_threads(threads)


class RunningTopK:
    """Each row's k largest scores so far and their column ids, fed one block of scores at a time.

    Sorting every block would cost more than the product that made it. Once a row holds k scores, its k-th
    best (the threshold) only rises, and an entry below it can never be among the final k; past the first
    few thousand columns few entries pass. add() finds them through the maxima of GROUP columns spread over
    the block (one cheap pass; only groups whose maximum passes are read again; spread, so a run of similar
    neighbours does not fill one group) and parks them; flush() or a full parking merges them with one top-k
    (candidates parked under an older, lower threshold are merely extra). A row's first columns are merged
    whole: until it holds k finite scores its threshold is -inf (padding and self are -inf; k < N guarantees
    k finite scores in the end). The rows r0..r1 of one add() belong to one thread alone."""

    def __init__(self, rows, k, device):
        self.values = torch.full((rows, k), float("-inf"), dtype=torch.float32, device=device)
        self.ids = torch.full((rows, k), -1, dtype=torch.long, device=device)
        self.threshold = torch.full((rows,), float("-inf"), dtype=torch.float32, device=device)  # k-th best
        self.parked = {}  # r0 -> (list of (row, slot, id, value) tensors, count per row)

    def add(self, r0, r1, scores, first_id):
        rows = slice(r0, r1)
        if not torch.isfinite(self.threshold[rows]).all():  # the rows' first columns: merge them all
            ids = torch.arange(first_id, first_id + scores.shape[1], device=scores.device)
            self._merge(rows, scores, ids.expand_as(scores))
            return
        row, col, value = candidates(scores, self.threshold[rows])
        if row.numel() == 0:
            return
        parked, count = self.parked.setdefault(r0, ([], torch.zeros(r1 - r0, dtype=torch.long, device=scores.device)))
        # row comes out sorted, so each candidate's slot is its row's earlier count + its rank in the row.
        per_row = torch.bincount(row, minlength=r1 - r0)
        slot = count[row] + torch.arange(row.numel(), device=row.device) - (torch.cumsum(per_row, 0) - per_row)[row]
        parked.append((row, slot, col + first_id, value))
        count += per_row
        # A merge raises the thresholds but re-sorts k entries per row: wait for k per row on average, or 4k in one.
        if int(count.sum()) >= (r1 - r0) * self.values.shape[1] or int(count.max()) >= 4 * self.values.shape[1]:
            self.flush(r0, r1)

    def flush(self, r0, r1):
        """Merge the parked candidates of rows r0..r1."""
        if r0 not in self.parked:
            return
        parked, count = self.parked.pop(r0)
        values = torch.full((r1 - r0, int(count.max())), float("-inf"), dtype=torch.float32, device=count.device)
        ids = torch.full_like(values, -1, dtype=torch.long)
        for row, slot, col, value in parked:
            values[row, slot], ids[row, slot] = value, col
        self._merge(slice(r0, r1), values, ids)

    def _merge(self, rows, values, ids):
        self.values[rows], self.ids[rows] = dsm.merge_top_k(self.values[rows], self.ids[rows], values, ids,
                                                            self.values.shape[1], sorted=False)
        self.threshold[rows] = self.values[rows].amin(1)

    def result(self):
        """(ids, values) of every row, most similar first."""
        order = self.values.argsort(dim=1, descending=True)
        return self.ids.gather(1, order), self.values.gather(1, order)


def candidates(scores, threshold):
    """(row, column, value) of the entries of scores [r, c] (c a multiple of GROUP) at or above their
    row's threshold, rows sorted: through the maxima of GROUP columns c / GROUP apart."""
    rows, stride = scores.shape[0], scores.shape[1] // GROUP
    groups = scores.view(rows, GROUP, stride)
    hit_row, hit_col = (groups.amax(1) >= threshold[:, None]).nonzero(as_tuple=True)
    if 2 * hit_row.numel() > rows * stride:  # most groups pass: test every entry instead
        r, c = (scores >= threshold[:, None]).nonzero(as_tuple=True)
        return r, c, scores[r, c]
    values = groups[hit_row, :, hit_col]  # [hits, GROUP]
    pick, member = (values >= threshold[hit_row, None]).nonzero(as_tuple=True)
    return hit_row[pick], member * stride + hit_col[pick], values[pick, member]


@torch.no_grad()
def lookup_hard_classes(table, labels, classifier):
    """The hard classes [b, k] of this rank's labels [b] (global ids), read from their owners' rows. b must be
    equal on all ranks. Collective. Memory O(W b k) on top of the [end - start, k] table, never replicated."""
    if classifier.world_size == 1:
        return table[labels]
    all_labels = dsm.all_gather_rows(labels)  # every rank learns the W*b labels of the global batch
    # Each rank fills the rows it owns, the rest stay 0: with one owner per row, the sum over ranks is exact.
    rows = all_labels - classifier.start
    mine = (rows >= 0) & (rows < table.shape[0])
    contrib = table.new_zeros(len(all_labels), table.shape[1])
    contrib[mine] = table[rows[mine]]
    return dsm.reduce_scatter_rows(contrib)  # rank r gets the sum over ranks of rows [r*b, (r+1)*b): its answer


# ---------------------------------------------------------------- report helpers

def _summary(values):
    """Mean and percentiles of a 1-D tensor, as plain floats."""
    values, qs = values.double(), torch.tensor([0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99], dtype=torch.float64)
    return {"mean": round(float(values.mean()), 4),
            **{f"p{int(q * 100)}": round(float(v), 4) for q, v in zip(qs, torch.quantile(values, qs))}}


def _same_class(table, labels):
    """Share of hard negatives in the anchor's own folder class, against chance: a random other
    instance shares the class with probability sum_c n_c (n_c - 1) / (N (N - 1))."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    n, sizes = labels.numel(), torch.bincount(labels).double()
    same = labels[table] == labels[:, None]
    return {"classes": int(sizes.numel()), "share_1st": round(float(same[:, 0].double().mean()), 4),
            "share_all_k": round(float(same.double().mean()), 4),
            "chance": round(float((sizes * (sizes - 1)).sum() / (n * (n - 1))), 4)}


def _save_grid(paths, table, path, args):
    """One row per anchor: the anchor (red frame), then its hardest negatives in order."""
    anchors = torch.randperm(len(paths), generator=torch.Generator().manual_seed(args.seed))[:args.grid_rows]
    cols, transform = min(args.grid_cols, table.shape[1]), shared.eval_transform(args.image_size)
    mean, std = (torch.tensor(v)[:, None, None] for v in (shared.IMAGENET_MEAN, shared.IMAGENET_STD))
    tiles = []
    for a in anchors.sort().values.tolist():
        for j, i in enumerate([a] + table[a, :cols].tolist()):
            tile = transform(shared.load_rgb(paths[i])) * std + mean  # undo the normalisation
            if j == 0:
                frame = max(1, args.image_size // 32)
                tile[:, :frame], tile[:, -frame:], tile[:, :, :frame], tile[:, :, -frame:] = (
                    torch.tensor([1.0, 0.0, 0.0])[:, None, None],) * 4
            tiles.append(tile.clamp(0, 1))
    torchvision.utils.save_image(torch.stack(tiles), path, nrow=cols + 1, padding=2, pad_value=1.0)


if __name__ == "__main__":
    main()
