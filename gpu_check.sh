#!/usr/bin/env bash
# The one-call GPU check of NOTES.md's GPU section, at most about 9 minutes on an H200:
#     bash gpu_check.sh [RESULTS_DIR]        (or: make gpu-check RESULTS=DIR)
# The CUDA cases of the graph tests; bench.py's GPU rows (no row starts after 150 s); then the
# n = 300 trio with the fastest small row's flags, within what is left of 530 s. Each step runs under
# a timeout, so a slow one cannot take the rest with it. RESULTS_DIR receives the log, the flags and
# table1.md/.json/.png. It needs gpu-data/ (make gpu-data, run where ../shared exists), carried to
# the GPU machine, and uses that machine's own python3 (PYTHON=...), which holds PyTorch.
set -u
PYTHON=${PYTHON:-python3}
results=${1:-runs/gpu-check}
if [ ! -f gpu-data/judge/judge.py ]; then
    echo "error: no gpu-data/: run make gpu-data where ../shared exists, and carry gpu-data" >&2
    exit 2
fi
mkdir -p runs/gpu-check "$results"
export PYTHONUNBUFFERED=1
start=$(date +%s)
{
    timeout 120 "$PYTHON" -m pytest -q test_repro_gpu.py -k "graph or captured"
    timeout 330 "$PYTHON" bench.py --rows gpu --max-s 150 --best-flags runs/gpu-check/best-flags.txt
    left=$((530 - $(date +%s) + start))
    [ "$left" -gt 0 ] || left=1
    echo "table1: --budget-s $left"
    # shellcheck disable=SC2046  # the flags file holds several words
    timeout $((left + 20)) "$PYTHON" repro_gpu.py table1 --budget-s "$left" \
        $(cat runs/gpu-check/best-flags.txt 2>/dev/null) \
        --data gpu-data/data/cifar10_train_png4000.npz --judge gpu-data/judge \
        --checkpoints 4 --samples 5000 --out runs/gpu-check/table1
} 2>&1 | tee "$results/gpu-check-log.txt"
for f in runs/gpu-check/best-flags.txt runs/gpu-check/table1/table1.md \
    runs/gpu-check/table1/table1.json runs/gpu-check/table1/table1.png; do
    [ -f "$f" ] && [ "$results" != runs/gpu-check ] && cp "$f" "$results/"
done
exit 0
