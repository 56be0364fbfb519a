#!/usr/bin/env bash
# The tutorial in miniature: every stage of the paper, in order, on two CPU processes.
#   bash tests/quickstart.sh [DATA [OUT]]     DATA: an ImageFolder root with train/ and val/
# Without DATA it generates demo_data/ (10 shape classes, 400 train and 500 val images); SEED=1
# bash tests/quickstart.sh repeats it with other initial networks, crops and batches.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-demo_data}
OUT=${2:-runs/quick}
T="torchrun --nproc_per_node=2"                                   # two processes (gloo; DEVICE=auto: a GPU each)
R="--data $DATA --out $OUT --workers 1 --seed ${SEED:-0} --device ${DEVICE:-cpu}"
N="--arch resnet18 --image-size 16"                               # small images: the 3x3 stem
[ -d "$DATA" ] || python tests/demo_data.py "$DATA"               # generated images with real classes

# 01: the contrastive prior: the random network embeds every image once (running BN), rows = embeddings
$T 01_extract_init.py $R $N --batch-size 200
# 02: instance classification over all images (Eq. 1-3), the rows sharded over the processes
$T 02_pretrain.py $R $N --batch-size 16 --epochs 40 --warmup-epochs 1 --lr 4 --hard-k 10
# 03: which classes the classifier finds hardest (Eq. 2), as a table and an image grid
$T 03_hard_classes.py --out "$OUT" --hard-k 10 --device ${DEVICE:-cpu}
for B in "$OUT/backbone.pt" random; do                            # the pretrained backbone, then a random one
  # 04: weighted kNN and a linear probe on frozen features (Tables 2-6)
  $T 04_linear_eval.py $R --pretrained "$B" --knn
  $T 04_linear_eval.py $R --pretrained "$B" --cached-features --standardize --lr 1 --epochs 30 --batch-size 100
  # 05: fine-tune everything on the labelled images (Tables 9-10)
  $T 05_transfer.py --task classify $R $N --init "$B" --lr 0.3 --epochs 5 --batch-size 32
done
python tests/report.py "$OUT"                                     # the table: pretrained beside random
