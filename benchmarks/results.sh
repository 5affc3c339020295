#!/usr/bin/env bash
# The runs behind docs/results.md, and the tables it quotes. Every `outcore bench` command
# runs each variant in a fresh process and writes markdown, JSON and a PNG under $OUT;
# --repeat runs the configs round-robin and reports the median run. The last line gathers
# every table into $OUT/tables.md. Run it on a quiet machine (timings move with load); on
# the 2-core CPU machine the two scripts merged into it took about 60 and 45 minutes.
#
#     bash benchmarks/results.sh                 # writes docs/results/current/
#     OUT=/tmp/results bash benchmarks/results.sh
set -euo pipefail
OUT=${OUT:-docs/results/current}
B=".venv/bin/outcore bench"
mkdir -p "$OUT"
# What the swap disk delivers (each command below measures it again at its start).
$B disk --size 2GiB | tee "$OUT/disk.txt"
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
# The quarter budget again, three runs round-robin.
$B curve --model resnet50 --image-size 128 --batch 64 --fractions 0.25 --policies adaptive --thp \
   --baselines in-core --repeat 3 --out "$OUT" --name reference_r50_128_final
# Memory-speed curve, ResNet-50, 64x64, batch 64: every policy at six budgets.
$B curve --model resnet50 --image-size 64 --batch 64 --fractions 1,0.75,0.5,0.25,0.125 --thp --out "$OUT"
# How freed memory goes back to the OS, at a quarter budget: eager, glibc's defaults, and trim without THP.
$B curve --model resnet50 --image-size 64 --batch 64 --fractions 0.25 --policies adaptive --baselines in-core \
   --memory eager --thp --name memory_eager --out "$OUT"
$B curve --model resnet50 --image-size 64 --batch 64 --fractions 0.25 --policies adaptive --baselines in-core \
   --memory keep --thp --name memory_keep --out "$OUT"
$B curve --model resnet50 --image-size 64 --batch 64 --fractions 0.25 --policies adaptive --baselines in-core \
   --name memory_trim_no_thp --out "$OUT"
# ResNet-18 and GPT-2: curve and largest batch.
$B curve --model resnet18 --image-size 64 --batch 128 --fractions 1,0.5,0.25 --policies adaptive --thp --out "$OUT"
$B batch --model resnet18 --image-size 64 --batch 64 --factors 8 --thp --out "$OUT"
$B curve --model gpt2 --seq-len 256 --batch 2 --fractions 0.5,0.25 --policies adaptive --thp --out "$OUT"
$B batch --model gpt2 --seq-len 256 --batch 2 --factors 4,8 --thp --out "$OUT"
.venv/bin/python benchmarks/collect_results.py "$OUT" benchmarks/results.sh > "$OUT/tables.md"
