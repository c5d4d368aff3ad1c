#!/usr/bin/env bash
# Train a DSpark draft (the 0731 releases' draft) on the bundled demo model's frozen backbone, then
# put its export in dsv4/demo-dspark: a 0731-layout folder whose index lists the backbone's tensors in
# dsv4/demo's shards, so only the draft (~8 MB) is stored. One thread, niced. Figures land in
# $OUT/report.json (teacher-forced agreement with the backbone on held-out files), the curve in $OUT/loss.png.
set -euo pipefail
OUT=${OUT:-out/train-dspark}
STEPS=${STEPS:-600}
nice -n 10 python -m dsv4.train.dspark --backbone dsv4/demo --out "$OUT" --export dsv4/demo-dspark.new \
    --steps "$STEPS" --seq-len 256 --batch 2 --anchors 48 --stages 3 --rank 64 --lr 2e-3 --min-lr 2e-4 \
    --warmup 20 --seed 0 --threads 1 --log-every 20 --eval-windows 32 "$@"
cp "$OUT/report.json" dsv4/demo-dspark.new/
[ -f "$OUT/loss.png" ] && cp "$OUT/loss.png" dsv4/demo-dspark.new/
[ -f dsv4/demo-dspark/README.md ] && cp dsv4/demo-dspark/README.md dsv4/demo-dspark.new/
rm -rf dsv4/demo-dspark && mv dsv4/demo-dspark.new dsv4/demo-dspark
du -sh dsv4/demo-dspark
