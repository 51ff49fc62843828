#!/usr/bin/env bash
# The one-call GPU check of NOTES.md's GPU section, within one 600 s device command on an H200:
#     bash gpu_check.sh [RESULTS_DIR]          (or: make gpu-check RESULTS=DIR)
#     bash gpu_check.sh [RESULTS_DIR] resume   (or: make gpu-check RESULTS=DIR MODE=resume)
#     bash gpu_check.sh [RESULTS_DIR] t2i      (or: make gpu-check RESULTS=DIR MODE=t2i)
# First call: the CUDA cases of the trio's tests (the three models captured on forked streams must
# train and sample as each alone, else the trio's numbers mean nothing; at most 45 s), then the
# n = 300 trio (repro_gpu.py table1) with at least 500 s of budget: 6 log-spaced checkpoints, 5,120
# samples each (5 whole batches of 1,024), judged, into runs/gpu-check/table1. Should the trio fail
# before its first checkpoint (the compiled network inside the three-stream capture has never run),
# it starts again without --compile in what is left. Then, with what is left of 585 s, bench.py's
# GPU rows. Each step runs under a timeout, so a slow one cannot take the rest with it.
# `resume`, a second call on the same warm machine (runs/gpu-check/table1 is kept there): the trio
# continued toward the paper's 7.68M images (--iters 30000) with nearly the whole call.
# `t2i`: text_to_image.py gpu-check, SD-2's training step at 768 px and batch 16 with random
# weights (peak memory and img/s), with and without gradient checkpointing; it installs the wheels
# of gpu-data/whl (diffusers, which the GPU image lacks) into /tmp/site first.
# RESULTS_DIR receives the log, table1.md/.json/.png, trio.json and the trio's own log
# (trio-log.txt), or in t2i mode t2i-checkpointing-on|off/gpu-check.json: at most 8 files, what a
# device call returns. It needs
# gpu-data/ (make gpu-data, run where ../shared exists), carried to the GPU machine, and uses that
# machine's own python3 (PYTHON=...), which holds PyTorch.
set -u
PYTHON=${PYTHON:-python3}
results=${1:-runs/gpu-check}
mode=${2:-first}
# the fastest small-preset row measured on the H200 at b3d7c3e (NOTES.md): 11,964 img/s alone
TRIO_FLAGS=${TRIO_FLAGS:---graph --compile default --precision bf16}
TRIO_FALLBACK_FLAGS=${TRIO_FALLBACK_FLAGS:---graph --precision bf16}
if [ ! -f gpu-data/judge/judge.py ]; then
    echo "error: no gpu-data/: run make gpu-data where ../shared exists, and carry gpu-data" >&2
    exit 2
fi
case "$mode" in
first | resume | t2i) ;;
*)
    echo "error: the second argument is resume, t2i or nothing, not '$mode'" >&2
    exit 2
    ;;
esac
trio=runs/gpu-check/table1
mkdir -p "$results" runs/gpu-check
export PYTHONUNBUFFERED=1
start=$(date +%s)
left() { echo $((585 - $(date +%s) + start)); }
# shellcheck disable=SC2206  # the flags hold several words
table1() { # table1 OUT BUDGET FLAGS... : the trio into OUT within BUDGET seconds
    local out=$1 budget=$2
    shift 2
    echo "table1 $* --budget-s $budget --out $out"
    timeout -k 5 $((budget + 20)) "$PYTHON" repro_gpu.py table1 "$@" --checkpoints 6 \
        --samples 5120 --data gpu-data/data/cifar10_train_png4000.npz --judge gpu-data/judge \
        --out "$out" --budget-s "$budget"
    echo "table1 exit status $?"
}
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PYTHON" -c "import torch; print('torch', torch.__version__)"
    if [ "$mode" = resume ] && [ -f "$trio-fallback/table1.json" ]; then
        # shellcheck disable=SC2086  # the first call fell back: continue that trio, its way
        table1 "$trio-fallback" 540 $TRIO_FALLBACK_FLAGS --resume --iters 30000
    elif [ "$mode" = resume ]; then
        # shellcheck disable=SC2086
        table1 "$trio" 540 $TRIO_FLAGS --resume --iters 30000
    elif [ "$mode" = t2i ]; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
            gpu-data/whl/*.whl && export PYTHONPATH=/tmp/site
        for ckpt in on off; do
            timeout 240 "$PYTHON" text_to_image.py gpu-check --grad-checkpointing $ckpt \
                --out "$results/t2i-checkpointing-$ckpt"
        done
    else
        timeout 45 "$PYTHON" -m pytest -q -x test_repro_gpu.py -k "together or trio_cap" ||
            echo "WARNING: the trio's CUDA tests failed or timed out: the trio below is suspect"
        rm -rf "$trio" "$trio-fallback" # a first call starts a fresh trio (a second resumes it)
        budget=$(($(left) - 30))
        [ "$budget" -gt 530 ] && budget=530
        # shellcheck disable=SC2086
        table1 "$trio" "$budget" $TRIO_FLAGS
        if [ ! -f "$trio/table1.json" ] && [ "$(left)" -gt 240 ]; then
            echo "the trio reached no checkpoint with $TRIO_FLAGS; again with $TRIO_FALLBACK_FLAGS"
            # shellcheck disable=SC2086
            table1 "$trio-fallback" $(($(left) - 30)) $TRIO_FALLBACK_FLAGS
        fi
        if [ "$(left)" -gt 30 ]; then
            timeout "$(left)" "$PYTHON" bench.py --rows gpu --max-s $(($(left) - 30))
        else
            echo "bench.py --rows gpu: skipped, $(left) s left"
        fi
    fi
    echo "gpu_check.sh: $(($(date +%s) - start)) s"
} 2>&1 | tee "$results/gpu-check-$mode-log.txt"
# at most 8 files come back from a device call: the report of the trio that reached a checkpoint
dir=$trio
[ -f "$trio-fallback/table1.json" ] && dir=$trio-fallback
for f in table1.md table1.json table1.png trio.json; do
    [ -f "$dir/$f" ] && cp "$dir/$f" "$results/"
done
[ -f "$dir/log.txt" ] && cp "$dir/log.txt" "$results/trio-log.txt"
exit 0
