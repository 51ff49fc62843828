"""Throughput benchmark for ambient.py (`make bench`): a benchmark, not a test.

    python bench.py                      # tiny preset on CPU; on a GPU the GPU rows (--rows gpu)
    python bench.py --rows gpu --best-flags runs/best-flags.txt      # as make gpu-check runs it
    python bench.py --preset small --batch 256 --dtype bf16 --device cuda --graph --compile default

Each case times the training step ambient.py's loop runs (ambient.eager_step through repro_gpu.py's
wrapper for the options: Algorithm 1 batch, forward, backward, Adam, EMA) and Heun sampling
(--steps steps, 2 * steps - 1 network calls per image, at --sample-batch). It prints the first
step's seconds (with --compile: the compilation), training and sampling images/s, model FLOPs per
image from torch's FLOP counter and the share of the device's peak (MFU). The peak is measured
here, as the rate of a large dense matmul in the same dtype, not taken from a data sheet. The GPU
rows put each option beside the eager baseline: --graph, + --compile, + bf16, + channels_last,
then the edm preset and sampling at batch 1024 with the fastest. On CPU each case also runs in a
child process without the Makefile's glibc malloc settings, to show what they change.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

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


PEAKS = {}


def matmul_peak(device, dtype):
    """The rate of a large dense matmul in dtype (TF32 for float32 on CUDA, as runs use), once."""
    if (device.type, dtype) not in PEAKS:
        n = 4096 if device.type == "cuda" else 1024
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        PEAKS[device.type, dtype] = 2 * n**3 / timed(lambda: a @ b, device, 3, 10)
    return PEAKS[device.type, dtype]


def options(cfg):
    """The repro_gpu.py flags of cfg's speed options."""
    flags = ["--graph"] if cfg.graph else []
    flags += ["--compile", cfg.compile] if cfg.compile != "none" else []
    flags += ["--precision", cfg.precision] if cfg.precision != "fp32" else []
    return flags + (["--channels-last"] if cfg.channels_last else [])


def bench(cfg, device, repeat, train=True, sample=True):
    """One row: cfg's training step (train), Heun sampling of cfg.sample_batch images (sample)."""
    step, state, method = G.stand_in_training(cfg, device)
    batch, r = cfg.batch, dict(device=device.type, flags=options(cfg), preset=cfg.preset)
    if train:  # the sampling row compiles only the sampler
        t0 = time.perf_counter()
        step()  # with --compile: compiles here, outside the timing
        sync(device)
        r["first_step_s"] = time.perf_counter() - t0
    with FlopCounterMode(display=False) as train_flops:
        b = A.algorithm1_batch(method.S, method.S_tn, 0.4, batch, state.gen)
        A.algorithm1_loss(state.net, b).mean().backward()
    with FlopCounterMode(display=False) as call_flops, torch.no_grad():
        state.net(method.S[:batch], torch.full((batch,), 0.5, device=device))
    peak = matmul_peak(device, DTYPES[cfg.precision])
    r.update(
        params=sum(p.numel() for p in state.net.parameters()),
        peak_tflops=peak / 1e12,
        gflop_per_image=train_flops.get_total_flops() / batch / 1e9,
        call_gflop=call_flops.get_total_flops() / batch / 1e9,
    )
    if train:
        t_train = timed(step, device, 5, repeat)  # 5: a captured step's 3 warm-up steps and capture
        r.update(
            train_ips=batch / t_train,
            step_ms=1e3 * t_train,
            mfu=r["gflop_per_image"] * 1e9 * batch / t_train / peak,
        )
    if sample:
        count = cfg.sample_batch
        t = timed(lambda: method.generate(state.ema, count, log=lambda m: None), device, 1, 1)
        flops = r["call_gflop"] * 1e9 * (2 * cfg.steps - 1) * count  # Heun: 2 * steps - 1 calls
        r.update(sample_ips=count / t, sample_mfu=flops / t / peak)
    return r


def case(r):
    side = "" if r.get("resolution") is None else f" {r['resolution']}x{r['resolution']}"
    return f"{r['name']}{side} {r['device']} {' '.join(r['flags']) or 'eager'}"


def row(r, note=""):
    def cell(key, fmt, scale=1):
        return "-" if r.get(key) is None else fmt.format(scale * r[key])

    return (
        f"| {case(r)}{note} | {r['params'] / 1e6:.2f}M | {cell('first_step_s', '{:.1f}')} | "
        f"{cell('step_ms', '{:.1f}')} | {cell('train_ips', '{:,.0f}')} | "
        f"{cell('sample_ips', '{:,.0f}')} | {r['gflop_per_image']:.3f} | {r['call_gflop']:.3f} | "
        f"{cell('mfu', '{:.1f}%', 100)} | {cell('sample_mfu', '{:.1f}%', 100)} | "
        f"{r['peak_tflops']:.3g} |"
    )


HEADER = [
    "| case | params | first step s | step ms | train img/s | sample img/s | train GFLOP/img "
    "| h_theta GFLOP/img | MFU train | MFU sample | peak TFLOP/s (measured) |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
]
# The GPU rows, small preset at batch 256, each beside the eager baseline: the captured step, the
# compiled network inside it, then bf16 autocast and channels_last on top.
PAPER_ROWS = [
    ("eager", {}),
    ("graph", dict(graph=True)),
    ("graph + compile", dict(graph=True, compile="default")),
    ("+ bf16", dict(graph=True, compile="default", precision="bf16")),
    ("+ channels_last", dict(graph=True, compile="default", precision="bf16", channels_last=True)),
]


def gpu_rows(args, device):
    """Each GPU row in one run, printed as it finishes: PAPER_ROWS (the eager one also samples, as
    the baseline), Heun-40 sampling at --sample-batch and the edm preset, each with the options of
    the fastest small row before it. A row that fails prints its error and the run goes on; rows
    that would start after --max-s are skipped."""
    t0, done = time.time(), []
    base = dict(preset="small", resolution=32, batch=args.batch or 256, steps=args.steps)
    rows = [(name, dict(base, **o), dict(sample=name == "eager")) for name, o in PAPER_ROWS]
    sampling = f"Heun-{args.steps} sampling at batch {args.sample_batch}"
    # in order of need, should --max-s cut the list: sampling with the fastest options so far
    # after the compiled row, the edm preset last
    rows = rows[:3] + [(sampling, None, dict(train=False))] + rows[3:] + [("edm", None, {})]
    print("\n".join(HEADER), flush=True)
    for name, opts, what in rows:
        if time.time() - t0 > args.max_s:
            print(
                f"| {name}: skipped, the bench's --max-s {args.max_s:g} s has passed |", flush=True
            )
            continue
        trained = [r for r in done if r.get("train_ips")]
        if opts is None and not trained:
            print(f"| {name}: skipped, no small row trained |", flush=True)
            continue
        if opts is None:  # the fastest small row's options
            best = max(trained, key=lambda r: r["train_ips"])
            opts = dict(base, **best["opts"], preset="edm" if name == "edm" else "small")
            what = dict(sample=False) if name == "edm" else what
        cfg = G.Config(**opts, sample_batch=args.sample_batch)
        try:
            r = bench(cfg, device, args.repeat, **what)
        except Exception as e:
            print(
                f"| {name}: failed, {type(e).__name__}: {str(e).strip().splitlines()[0][:200]} |",
                flush=True,
            )
            continue
        finally:
            torch._dynamo.reset()  # each row compiles afresh; torch's recompile limit stays far
            torch.cuda.empty_cache()
        r.update(name=name, resolution=32, opts={k: v for k, v in opts.items() if k not in base})
        done.append(r)
        print(row(r), flush=True)
    return done


def best_flags(rows):
    """repro_gpu.py's flags of the fastest small-preset training row."""
    small = [r for r in rows if r["preset"] == "small" and r.get("train_ips")]
    return max(small, key=lambda r: r["train_ips"])["flags"] if small else []


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--preset",
        choices=tuple(A.PRESETS),
        help="one case with this preset (default: "
        "the tiny preset's CPU cases, and the GPU rows when there is a GPU)",
    )
    p.add_argument(
        "--rows",
        choices=("cpu", "gpu"),
        help="cpu: the tiny preset at batch 32 and 256; "
        "gpu: the small preset eager, --graph, + --compile, + bf16, + channels_last, the edm "
        "preset and Heun-40 sampling, the last two with the fastest small row's options "
        "(default: gpu where there is a GPU, else cpu)",
    )
    p.add_argument("--resolution", type=int, help="image side (default: 16 for tiny, 32 otherwise)")
    p.add_argument(
        "--batch", type=int, help="batch size (default: 32 and 256 for tiny, 256 otherwise)"
    )
    p.add_argument(
        "--sample-batch",
        type=int,
        help="images per sampling batch (default: 1024 for the GPU rows, else --batch)",
    )
    p.add_argument(
        "--dtype", choices=tuple(DTYPES), default="fp32", help="autocast dtype (default fp32)"
    )
    p.add_argument(
        "--device", default=None, help="cpu or cuda (default: cpu for tiny, cuda otherwise)"
    )
    p.add_argument("--steps", type=int, default=40, help="Heun steps per sample (default 40)")
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
        help="capture the training step and sampling as "
        "CUDA graphs, as repro_gpu.py --graph does (GPU only)",
    )
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: one per core)")
    p.add_argument(
        "--max-s",
        type=float,
        default=float("inf"),
        help="GPU rows: skip the rows that would start after this many seconds",
    )
    p.add_argument(
        "--best-flags",
        metavar="FILE",
        help="GPU rows: write the fastest small row's "
        "repro_gpu.py flags to FILE (make gpu-check passes them to table1)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON result instead of the table")
    return p.parse_args()


def one_case(args, preset, device, batch):
    cfg = G.Config(
        preset=preset,
        resolution=args.resolution or (16 if preset == "tiny" else 32),
        batch=batch,
        precision=args.dtype,
        channels_last=args.channels_last,
        compile=args.compile,
        steps=args.steps,
        graph=args.graph,
        sample_batch=args.sample_batch or batch,
    )
    r = bench(cfg, device, args.repeat)
    threads = f" {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    return dict(r, name=f"{preset} b{batch} {args.dtype}{threads}", resolution=cfg.resolution)


def cpu_cases(args, cases):
    """The CPU table; on CPU each case also runs in a child process without the Makefile's glibc
    malloc settings, to show what they change."""
    malloc_set = all(v in os.environ for v in MALLOC_VARS)
    lines = list(HEADER)
    for preset, device, batch in cases:
        r = one_case(args, preset, device, batch)
        if args.json:
            return print(json.dumps(r))
        cpu = r["device"] == "cpu"
        lines.append(row(r, " (malloc vars set)" if cpu and malloc_set else ""))
        if cpu and malloc_set and not args.preset:  # the same case in a child process without them
            env = {k: v for k, v in os.environ.items() if k not in MALLOC_VARS}
            same = [
                f"--{k.replace('_', '-')}={v}"
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
                    f"--batch={batch}",
                    *same,
                ],
                env=env,
                capture_output=True,
                text=True,
            )
            if child.returncode == 0:
                last = child.stdout.strip().splitlines()[-1]
                lines.append(row(json.loads(last), " (malloc defaults)"))
            else:
                err = (child.stderr.strip().splitlines() or ["no output"])[-1][:150]
                lines.append(f"| {case(r)} (malloc defaults): the child process failed: {err} |")
    print("\n".join(lines))


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main():
    args = parse()
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    if args.rows == "gpu" or (args.rows is None and not args.preset and cuda):
        if not cuda:
            fail(
                "--rows gpu: the GPU rows need a CUDA device and there is none here; "
                "run `python bench.py` for the CPU rows"
            )
        args.sample_batch = args.sample_batch or 1024
        rows = gpu_rows(args, torch.device("cuda"))
        if args.best_flags:
            Path(args.best_flags).parent.mkdir(parents=True, exist_ok=True)
            Path(args.best_flags).write_text(" ".join(best_flags(rows)) + "\n")
            print(f"fastest small row's flags: {' '.join(best_flags(rows)) or '(eager)'}")
        return
    # Default on CPU: the tiny preset at the batch of the tests (32) and a large one (256), where
    # glibc's malloc settings matter.
    cases = (
        [(args.preset, args.device, args.batch)]
        if args.preset
        else [("tiny", "cpu", b) for b in ([args.batch] if args.batch else [32, 256])]
    )
    checked = []
    for preset, device, batch in cases:
        device = torch.device(device or ("cpu" if preset == "tiny" else "cuda"))
        if device.type == "cuda" and not cuda:
            fail("--device cuda: no CUDA device here; use --device cpu")
        if (args.graph or args.compile == "cudagraphs") and device.type != "cuda":
            fail(
                "--graph and --compile cudagraphs replay CUDA graphs and need a CUDA "
                "device; drop them on a CPU"
            )
        checked.append((preset, device, batch or (32 if preset == "tiny" else 256)))
    cpu_cases(args, checked)


if __name__ == "__main__":
    main()
