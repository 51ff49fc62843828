"""Throughput benchmark for ambient.py (`make bench`): a benchmark, not a test.

    python bench.py                                        # tiny on CPU, paper on the GPU if any
    python bench.py --preset paper --batch 256 --dtype bf16 --device cuda
    python bench.py --preset paper --graph                 # the whole step as one CUDA graph
    python bench.py --preset edm --graph --channels-last   # EDM's DDPM++ size (54M)

Each case times the training step ambient.py's loop runs (ambient.eager_step through repro_gpu.py's
wrapper for the options: Algorithm 1 batch, forward, backward, Adam, EMA) and Heun sampling (--steps
steps, 2 * steps - 1 network calls per image). It prints the first step's seconds (with --compile:
the compilation), training images/s, sampling images/s, model FLOPs per image from torch's FLOP
counter and the share of the device's peak (MFU). The peak is measured here, as the rate of a large
dense matmul in the same dtype, not taken from a data sheet. On CPU each case also runs in a child
process without the Makefile's glibc malloc settings, to show what they change.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import ambient as A
import repro_gpu as G

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MALLOC_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, warmup, repeat):
    """Median seconds of `repeat` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def matmul_peak(device, dtype):
    n = 4096 if device.type == "cuda" else 1024
    a, b = (
        torch.randn(n, n, device=device, dtype=dtype),
        torch.randn(n, n, device=device, dtype=dtype),
    )
    return 2 * n**3 / timed(lambda: a @ b, device, 3, 10)


def bench(args, preset, device, batch):
    cfg = G.Config(
        preset=preset,
        resolution=args.resolution or (16 if preset == "tiny" else 32),
        batch=batch,
        precision=args.dtype,
        channels_last=args.channels_last,
        compile=args.compile,
        steps=args.steps,
        graph=args.graph,
        sample_batch=batch,
    )
    step, state, method = G.stand_in_training(cfg, device)
    t0 = time.perf_counter()
    step()  # with --compile: compiles here, outside the timing
    sync(device)
    first_s = time.perf_counter() - t0
    with FlopCounterMode(display=False) as train_flops:
        A.algorithm1_loss(
            state.net, A.algorithm1_batch(method.S, method.S_tn, 0.4, batch, state.gen)
        ).mean().backward()
    with FlopCounterMode(display=False) as call_flops, torch.no_grad():
        state.net(method.S[:batch], torch.full((batch,), 0.5, device=device))
    t_train = timed(step, device, 3, args.repeat)
    t_sample = timed(
        lambda: method.generate(state.ema, batch, log=lambda m: None),
        device,
        1,
        max(2, args.repeat // 5),
    )
    peak = matmul_peak(device, DTYPES[args.dtype])
    options = " channels_last" if args.channels_last else ""
    options += f" compile={args.compile}" if args.compile != "none" else ""
    options += " graph" if args.graph else ""
    options += f" {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    return dict(
        case=(
            f"{preset} {cfg.resolution}x{cfg.resolution} b{batch} {args.dtype} "
            f"{device.type}{options}"
        ),
        device=device.type,
        first_step_s=first_s,
        params=sum(p.numel() for p in state.net.parameters()),
        train_ips=batch / t_train,
        step_ms=1e3 * t_train,
        sample_ips=batch / t_sample,
        gflop_per_image=train_flops.get_total_flops() / batch / 1e9,
        call_gflop=call_flops.get_total_flops() / batch / 1e9,
        mfu=train_flops.get_total_flops() / t_train / peak,
        peak_tflops=peak / 1e12,
    )


def row(r, note=""):
    return (
        f"| {r['case']}{note} | {r['params'] / 1e6:.2f}M | {r['first_step_s']:.1f} | "
        f"{r['step_ms']:.0f} | {r['train_ips']:.0f} | {r['sample_ips']:.1f} | "
        f"{r['gflop_per_image']:.3f} | {r['call_gflop']:.3f} | {100 * r['mfu']:.1f}% "
        f"of {r['peak_tflops']:.2f} TFLOP/s |"
    )


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--preset",
        choices=tuple(A.PRESETS),
        help="one case with this preset (default: tiny on CPU, "
        "and paper on the GPU when there is one)",
    )
    p.add_argument(
        "--resolution", type=int, help="image side (default: 16 for tiny, 32 for the others)"
    )
    p.add_argument(
        "--batch", type=int, help="batch size (default: 32 and 256 for tiny, 256 for the others)"
    )
    p.add_argument(
        "--dtype", choices=tuple(DTYPES), default="fp32", help="autocast dtype (default fp32)"
    )
    p.add_argument(
        "--device", default=None, help="cpu or cuda (default: cpu for tiny, cuda for the others)"
    )
    p.add_argument(
        "--steps", type=int, default=40, help="Heun steps per sample (default 40, as ambient.py)"
    )
    p.add_argument("--repeat", type=int, default=20, help="timed training steps (default 20)")
    p.add_argument("--channels-last", action="store_true", help="NHWC layout for the network")
    p.add_argument(
        "--compile",
        choices=("none", "default", "cudagraphs"),
        default="none",
        help="torch.compile the network as repro_gpu.py --compile does (default none)",
    )
    p.add_argument(
        "--graph",
        action="store_true",
        help="capture the training step and sampling as CUDA graphs, "
        "as repro_gpu.py --graph does (GPU only)",
    )
    p.add_argument(
        "--threads", type=int, help="CPU threads for torch (default: torch's choice, one per core)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON result instead of the table")
    return p.parse_args()


def main():
    args = parse()
    if args.threads:
        torch.set_num_threads(args.threads)
    # Default: the tiny preset on CPU at the batch of the tests (32) and a large one (256), where
    # glibc's malloc settings matter; the paper preset on the GPU when there is one.
    cases = (
        [(args.preset, args.device, args.batch)]
        if args.preset
        else [("tiny", "cpu", b) for b in ([args.batch] if args.batch else [32, 256])]
        + ([("paper", "cuda", args.batch)] if torch.cuda.is_available() else [])
    )
    results = []
    for preset, device, batch in cases:
        device = torch.device(device or ("cpu" if preset == "tiny" else "cuda"))
        if device.type == "cuda" and not torch.cuda.is_available():
            sys.exit("error: --device cuda: no CUDA device here; use --device cpu")
        if args.graph and device.type != "cuda":
            sys.exit(
                "error: --graph captures CUDA graphs and needs a CUDA device; drop it on a CPU"
            )
        results.append(bench(args, preset, device, batch or (32 if preset == "tiny" else 256)))
    if args.json:
        return print(json.dumps(results[0]))
    malloc_set = all(v in os.environ for v in MALLOC_VARS)
    lines = [
        "| case | params | first step s | step ms | train img/s | sample img/s | train GFLOP/img "
        "| h_theta GFLOP/img | MFU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        cpu = r["device"] == "cpu"
        lines.append(row(r, " (malloc vars set)" if cpu and malloc_set else ""))
        if cpu and malloc_set and not args.preset:  # the same case in a child process without them
            env = {k: v for k, v in os.environ.items() if k not in MALLOC_VARS}
            same = [
                f"--{k}={v}"
                for k, v in vars(args).items()
                if k in ("resolution", "steps", "repeat", "dtype", "compile", "threads") and v
            ]
            same += ["--channels-last"] if args.channels_last else []
            child = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--preset",
                    "tiny",
                    "--device",
                    "cpu",
                    "--json",
                    f"--batch={r['case'].split()[2][1:]}",
                    *same,
                ],
                env=env,
                capture_output=True,
                text=True,
            )
            if child.returncode == 0:
                lines.append(
                    row(json.loads(child.stdout.strip().splitlines()[-1]), " (malloc defaults)")
                )
            else:
                lines.append(
                    f"| {r['case']} (malloc defaults): the child process failed: "
                    f"{(child.stderr.strip().splitlines() or ['no output'])[-1][:150]} |"
                )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
