#!/usr/bin/env bash
# The runs behind docs/results.md, in the order they were made. Each `outcore bench`
# command runs every variant in a fresh process and writes markdown, JSON and a PNG
# under docs/results/. About 45 minutes on the 2-core CPU machine; run it on a quiet
# machine (timings move with load).
set -euo pipefail
OUT=${OUT:-docs/results}
B=".venv/bin/outcore bench"
mkdir -p "$OUT"
$B disk --size 2GiB | tee "$OUT/disk.txt"
# Memory-speed curve, ResNet-50, 64x64, batch 64: every policy at six budgets.
$B curve --model resnet50 --image-size 64 --batch 64 --fractions 1,0.75,0.5,0.25,0.125 --thp --out "$OUT"
# How freed memory goes back to the OS, at a quarter budget: eager, glibc's defaults, and trim without THP.
$B curve --model resnet50 --image-size 64 --batch 64 --fractions 0.25 --policies adaptive --baselines in-core \
   --memory eager --thp --name memory_eager --out "$OUT"
$B curve --model resnet50 --image-size 64 --batch 64 --fractions 0.25 --policies adaptive --baselines in-core \
   --memory keep --thp --name memory_keep --out "$OUT"
$B curve --model resnet50 --image-size 64 --batch 64 --fractions 0.25 --policies adaptive --baselines in-core \
   --name memory_trim_no_thp --out "$OUT"
# The paper's experiment: budget = in-core peak at batch 64; outcore at 2x, 4x, 8x.
$B batch --model resnet50 --image-size 64 --batch 64 --thp --out "$OUT"
# The reference case: ResNet-50, 128x128, batch 64, outcore at a quarter budget.
$B curve --model resnet50 --image-size 128 --batch 64 --fractions 0.5,0.25 --policies adaptive --thp \
   --name reference_resnet50_128px_b64 --out "$OUT"
# ResNet-18 and GPT-2: curve and largest batch.
$B curve --model resnet18 --image-size 64 --batch 128 --fractions 1,0.5,0.25 --policies adaptive --thp --out "$OUT"
$B batch --model resnet18 --image-size 64 --batch 64 --factors 8 --thp --out "$OUT"
$B curve --model gpt2 --seq-len 256 --batch 2 --fractions 0.5,0.25 --policies adaptive --thp --out "$OUT"
$B batch --model gpt2 --seq-len 256 --batch 2 --factors 4,8 --thp --out "$OUT"
