#!/usr/bin/env bash
# The runs behind docs/results.md, "Current figures", in the order they were made. Every config
# runs in a fresh process; --repeat runs them round-robin and reports the median run.
# About 60 minutes on the 2-core CPU machine; run it on a quiet machine.
set -euo pipefail
OUT=${OUT:-docs/results/stop8}
B=".venv/bin/outcore bench"
mkdir -p "$OUT"
# Budget above the in-core peak (2x) and at it: what following the step costs.
$B curve --model resnet50 --image-size 64 --batch 64 --fractions 2,1 --policies adaptive \
   --baselines in-core,in-core-heap --repeat 5 --steps 5 --out "$OUT" --name passive_r50_64
# The reference case: ResNet-50, 128x128, batch 64, a quarter budget and others.
$B curve --model resnet50 --image-size 128 --batch 64 --fractions 1,0.5,0.25 --policies adaptive --thp \
   --baselines in-core,in-core-heap,checkpoint,offload-hooks --repeat 3 --out "$OUT" --name reference_r50_128
# The same at 64x64, where the optimizer state is a larger share of the traffic.
$B curve --model resnet50 --image-size 64 --batch 64 --fractions 1,0.5,0.25 --policies adaptive,fixed --thp \
   --baselines in-core,in-core-heap,checkpoint,offload-hooks --repeat 3 --out "$OUT" --name curve_r50_64
# A quarter budget without THP_MEM_ALLOC_ENABLE (what a user gets without setting it).
$B curve --model resnet50 --image-size 128 --batch 64 --fractions 0.25 --policies adaptive \
   --baselines in-core --repeat 3 --out "$OUT" --name reference_r50_128_no_thp
# The paper's experiment: budget = in-core peak at batch 64; outcore at 2x, 4x, 8x.
$B batch --model resnet50 --image-size 64 --batch 64 --thp --out "$OUT" --name batch_r50_64
# GPT-2 (seq 256).
$B curve --model gpt2 --seq-len 256 --batch 2 --fractions 1,0.5,0.25 --policies adaptive --thp \
   --baselines in-core,in-core-heap,checkpoint --repeat 3 --out "$OUT" --name curve_gpt2
# GPT-2 with a budget above its in-core peak (2x): nothing moves.
$B curve --model gpt2 --seq-len 256 --batch 2 --fractions 2 --policies adaptive --baselines in-core \
   --repeat 5 --steps 5 --out "$OUT" --name passive_gpt2
# The quarter budget again with the final trim governor (the smaller slack under tight budgets).
$B curve --model resnet50 --image-size 128 --batch 64 --fractions 0.25 --policies adaptive --thp \
   --baselines in-core --repeat 3 --out "$OUT" --name reference_r50_128_final
.venv/bin/python benchmarks/collect_results.py "$OUT" benchmarks/results_stop8.sh > "$OUT/tables.md"
