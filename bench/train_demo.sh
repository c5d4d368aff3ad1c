#!/usr/bin/env bash
# Train the bundled demo model (dsv4/demo) from scratch on the CPU, then copy its export there.
# The standard library's .py source is the corpus (1 file in 50 held out for evaluation); one
# thread, niced, so it shares a small machine. Figures land in $OUT/report.json, the curve in $OUT/loss.*
set -euo pipefail
OUT=${OUT:-out/train-demo}
STEPS=${STEPS:-550}
nice -n 10 python -m dsv4.train --out "$OUT" --config demo --steps "$STEPS" --seq-len 512 --batch 4 \
    --accum 1 --lr 3e-3 --min-lr 3e-4 --warmup 50 --bias-u 2e-3 --seed 0 --threads 1 \
    --save-every 50 --log-every 10 --eval-tokens 32768 "$@"
rm -rf dsv4/demo.new && cp -r "$OUT/model" dsv4/demo.new
cp "$OUT"/loss.* "$OUT/report.json" dsv4/demo.new/
[ -f dsv4/demo/README.md ] && cp dsv4/demo/README.md dsv4/demo.new/
rm -rf dsv4/demo && mv dsv4/demo.new dsv4/demo
du -sh dsv4/demo
