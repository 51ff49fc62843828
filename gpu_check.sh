#!/usr/bin/env bash
# The one-call GPU check of NOTES.md's GPU section, within one 600 s device command on an H200:
#     bash gpu_check.sh [RESULTS_DIR]          (or: make gpu-check RESULTS=DIR)
#     bash gpu_check.sh [RESULTS_DIR] resume   (or: make gpu-check RESULTS=DIR MODE=resume)
# First the n = 300 trio (repro_gpu.py table1, --budget-s $TRIO_BUDGET_S, default 530 of the 600):
# 6 log-spaced checkpoints, 5,120 samples each (5 whole batches of 1,024), judged, into
# runs/gpu-check/table1. Then, with what is left of 585 s, the CUDA cases of the GPU tests and
# bench.py's GPU rows. Each step runs under a timeout, so a slow one cannot take the rest with it.
# `resume`, a second call on the same warm machine (runs/gpu-check/table1 is kept there): the
# trio continued toward the paper's 7.68M images (--iters 30000) with nearly the whole call, and
# nothing else. RESULTS_DIR receives the log, table1.md/.json/.png, trio.json and the trio's
# logs. It needs gpu-data/ (make gpu-data, run where ../shared exists), carried to the GPU
# machine, and uses that machine's own python3 (PYTHON=...), which holds PyTorch.
set -u
PYTHON=${PYTHON:-python3}
results=${1:-runs/gpu-check}
mode=${2:-first}
# the fastest small-preset row measured on the H200 at b3d7c3e (NOTES.md): 11,964 img/s alone
TRIO_FLAGS=${TRIO_FLAGS:---graph --compile default --precision bf16}
TRIO_BUDGET_S=${TRIO_BUDGET_S:-530}
if [ ! -f gpu-data/judge/judge.py ]; then
    echo "error: no gpu-data/: run make gpu-data where ../shared exists, and carry gpu-data" >&2
    exit 2
fi
if [ "$mode" != first ] && [ "$mode" != resume ]; then
    echo "error: the second argument is resume or nothing, not '$mode'" >&2
    exit 2
fi
trio=runs/gpu-check/table1
mkdir -p "$results"
export PYTHONUNBUFFERED=1
start=$(date +%s)
left() { echo $((585 - $(date +%s) + start)); }
# shellcheck disable=SC2086  # TRIO_FLAGS holds several words
table1=("$PYTHON" repro_gpu.py table1 $TRIO_FLAGS --checkpoints 6 --samples 5120
    --data gpu-data/data/cifar10_train_png4000.npz --judge gpu-data/judge --out "$trio")
{
    if [ "$mode" = resume ]; then
        echo "table1 --resume: --budget-s 540, toward 7.68M images per model"
        timeout -k 10 580 "${table1[@]}" --resume --budget-s 540 --iters 30000
        echo "table1 exit status $?"
    else
        echo "table1: --budget-s $TRIO_BUDGET_S"
        rm -rf "$trio"  # a first call starts a fresh trio (the second one resumes it)
        timeout -k 10 $((TRIO_BUDGET_S + 40)) "${table1[@]}" --budget-s "$TRIO_BUDGET_S"
        echo "table1 exit status $?"
        if [ "$(left)" -gt 90 ]; then
            timeout $(($(left) - 60)) "$PYTHON" -m pytest -q test_repro_gpu.py \
                -k "graph or captured or together or trio_step or generate"
        else
            echo "the CUDA tests: skipped, $(left) s left"
        fi
        if [ "$(left)" -gt 30 ]; then
            timeout "$(left)" "$PYTHON" bench.py --rows gpu --max-s $(($(left) - 30))
        else
            echo "bench.py --rows gpu: skipped, $(left) s left"
        fi
    fi
    echo "gpu_check.sh: $(($(date +%s) - start)) s"
} 2>&1 | tee "$results/gpu-check-$mode-log.txt"
for f in "$trio"/table1.md "$trio"/table1.json "$trio"/table1.png "$trio"/trio.json; do
    [ -f "$f" ] && cp "$f" "$results/"
done
for f in "$trio"/log.txt "$trio"/*/log.txt; do
    [ -f "$f" ] && cp "$f" "$results/$(basename "$(dirname "$f")")-log.txt"
done
exit 0
