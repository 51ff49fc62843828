#!/usr/bin/env bash
# Run-identity check for refactors: bash .ci/bitcheck.sh REPO OUTFILE
#
# Trains every method of REPO for 50 steps on CPU (tiny preset, the bundled demo data, 16 images at
# 8x8, batch 16, 16 samples with 10 Heun steps, seed 0) in a temp dir, then writes to OUTFILE one line
# per (run, part): sha256 of the checkpoint's tensors (net, ema, opt, rng, dropout_rng, S_tn, masks,
# step; loaded with torch.load and hashed tensor by tensor, since a pickle's bytes may differ), of
# the config (paths dropped), of samples.npz's images, and of an eval_memorization.py --pixels-only
# report on the first run (its report.json numbers and per_sample arrays). Runs:
#   ambient-released  ambient.py --sigma-tn 1 --ambient-weight released   (Algorithm 1)
#   ambient-x0        ambient.py --sigma-tn 1 --ambient-weight x0
#   ddpm              ambient.py --sigma-tn 0
#   noisy-only        baselines.py --method noisy-only --sigma-tn 1
#   masking           baselines.py --method masking --mask-p 0.4
#   conditional       conditional.py --n-per-class 2 --sigma-tn 1 --guidance 1.5
# Compare two trees:  bash .ci/bitcheck.sh OLD_CHECKOUT a.txt; bash .ci/bitcheck.sh . b.txt;
#                     diff a.txt b.txt && echo IDENTICAL
# PYTHON (default REPO/.venv/bin/python) and THREADS (default 1: the same thread count in both runs,
# so that CPU reductions sum in the same order) can be set in the environment.
set -euo pipefail
if [ $# -ne 2 ]; then
    echo "usage: $0 REPO OUTFILE" >&2
    exit 2
fi
REPO=$(cd "$1" && pwd)
OUTFILE=$(realpath -m "$2")
PY=${PYTHON:-$REPO/.venv/bin/python}
export OMP_NUM_THREADS=${THREADS:-1} MKL_NUM_THREADS=${THREADS:-1}
TMP=$(mktemp -d /tmp/bitcheck.XXXXXX)
trap 'rm -rf "$TMP"' EXIT
cd "$TMP"

COMMON=(--data demo --n 16 --preset tiny --resolution 8 --iters 50 --batch 16 --lr 1e-3
        --samples 16 --sample-batch 16 --steps 10 --device cpu --seed 0 --log-every 50 --ckpt-every 50)
train() {  # name script args...
    local name=$1 script=$2
    shift 2
    "$PY" "$REPO/$script" "${COMMON[@]}" "$@" --out "runs/$name" > "log-$name.txt" 2>&1 \
        || { cat "log-$name.txt" >&2; echo "bitcheck: $name failed" >&2; exit 1; }
}
train ambient-released ambient.py --sigma-tn 1 --ambient-weight released
train ambient-x0 ambient.py --sigma-tn 1 --ambient-weight x0
train ddpm ambient.py --sigma-tn 0
train noisy-only baselines.py --method noisy-only --sigma-tn 1
train masking baselines.py --method masking --mask-p 0.4
"$PY" "$REPO/conditional.py" --data demo --n-per-class 2 --preset tiny --resolution 8 --iters 50 \
    --batch 16 --lr 1e-3 --samples 16 --sample-batch 16 --steps 10 --device cpu --seed 0 \
    --log-every 50 --ckpt-every 50 --sigma-tn 1 --guidance 1.5 --out runs/conditional \
    > log-conditional.txt 2>&1 || { cat log-conditional.txt >&2; echo "bitcheck: conditional failed" >&2; exit 1; }

"$PY" "$REPO/eval_memorization.py" runs/ambient-released --pixels-only --out eval \
    --cache-dir eval-cache > log-eval.txt 2>&1 || { cat log-eval.txt >&2; exit 1; }

"$PY" - "$TMP" > "$OUTFILE" <<'EOF'
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

PATH_KEYS = {"data_path", "out", "data_dir"}  # differ between temp dirs, not between methods


def feed(h, obj):
    """Feeds a canonical byte form of nested dicts/lists/tensors/arrays/scalars into h."""
    if isinstance(obj, dict):
        h.update(b"{")
        for k in sorted(obj, key=str):
            h.update(repr(k).encode())
            feed(h, obj[k])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for v in obj:
            feed(h, v)
        h.update(b"]")
    elif isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, np.ndarray):
        h.update(f"A{obj.dtype}{obj.shape}".encode())
        h.update(np.ascontiguousarray(obj).tobytes())
    else:
        h.update(repr(obj).encode())


def sha(obj):
    h = hashlib.sha256()
    feed(h, obj)
    return h.hexdigest()


tmp = Path(sys.argv[1])
for run in sorted((tmp / "runs").iterdir()):
    ck = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    for part in sorted(ck):
        value = ck[part]
        if part == "config":
            value = {k: v for k, v in value.items() if k not in PATH_KEYS}
        print(f"{run.name} checkpoint.{part} {sha(value)}")
    config = json.loads((run / "config.json").read_text())
    print(f"{run.name} config.json {sha({k: v for k, v in config.items() if k not in PATH_KEYS})}")
    with np.load(run / "samples.npz") as f:
        print(f"{run.name} samples.npz {sha({k: f[k] for k in f.files})}")
report = json.loads((tmp / "eval" / "report.json").read_text())
print(f"eval report.json.runs {sha(report['runs'])}")
for name, row in sorted(report["runs"]["ambient-released"].items()):
    print(f"eval row.{name} {row!r}")
for f in sorted((tmp / "eval").glob("per_sample_*.npz")):
    with np.load(f) as z:
        print(f"eval {f.name} {sha({k: z[k] for k in z.files})}")
EOF
echo "bitcheck: wrote $(wc -l < "$OUTFILE") lines to $OUTFILE ($REPO at $(git -C "$REPO" rev-parse --short HEAD)$(git -C "$REPO" diff --quiet HEAD || echo ', with uncommitted changes'))" >&2
