"""Throughput benchmark for ambient.py (`make bench`): a benchmark, not a test.

    python bench.py                      # tiny preset on CPU; on a GPU the GPU rows (--rows gpu)
    python bench.py --rows gpu --best-flags runs/best-flags.txt      # as make gpu-check runs it
    python bench.py --preset small --batch 256 --dtype bf16 --device cuda --graph --compile default
    python bench.py --preset small --dtype bf16 --device cuda --graph --compile default --trio

Each case times the training step ambient.py's loop runs (ambient.eager_step through repro_gpu.py's
wrapper for the options: Algorithm 1 batch, forward, backward, Adam, EMA) and Heun sampling
(--steps steps, 2 * steps - 1 network calls per image, at --sample-batch). It prints the first
step's seconds (with --compile: the compilation), training and sampling images/s, model FLOPs per
image from torch's FLOP counter and the share of the device's peak (MFU). The peak is measured
here, as the rate of a large dense matmul in the same dtype, not taken from a data sheet. A trio
row (--trio) times table1's three models stepped together (repro_gpu.trio_step: with --graph one
CUDA graph, the three on concurrent streams) and sampled together (trio_generate): its training
images/s are summed over the three, its sampling images/s are per model, its MFU counts all three,
and on a GPU issue 24's targets are printed beside them. The GPU rows: one model with the options
measured fastest (--graph --compile default, bf16), the trio with the same (training, sampling,
then + channels_last), then each option beside the eager baseline (--graph, + --compile, sampling
at batch 1024 and + channels_last with the fastest) and the edm preset. On CPU each one-model case
also runs in a child process without the Makefile's glibc malloc settings, to show what they
change.
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


def flop_counts(state, method, cfg, device):
    """Model FLOPs per image of one training step and of one network call (torch's counter), the
    parameter count and the measured peak in cfg's dtype."""
    batch = cfg.batch
    with FlopCounterMode(display=False) as train_flops:
        b = A.algorithm1_batch(method.S, method.S_tn, 0.4, batch, state.gen)
        A.algorithm1_loss(state.net, b).mean().backward()
    with FlopCounterMode(display=False) as call_flops, torch.no_grad():
        state.net(method.S[:batch], torch.full((batch,), 0.5, device=device))
    peak = matmul_peak(device, DTYPES[cfg.precision])
    return dict(
        params=sum(p.numel() for p in state.net.parameters()),
        peak_tflops=peak / 1e12,
        gflop_per_image=train_flops.get_total_flops() / batch / 1e9,
        call_gflop=call_flops.get_total_flops() / batch / 1e9,
    )


def first_step_s(step, device):
    """Seconds of the first step: with --compile, the compilation."""
    t0 = time.perf_counter()
    step()
    sync(device)
    return time.perf_counter() - t0


def rates(r, models, step, generate, cfg, device, repeat):
    """Fills r's training rate (images/s over `models` models) and MFU from timing step(), and
    its sampling rate per model and MFU (over all the models) from timing generate(), each if
    given."""
    peak = r["peak_tflops"] * 1e12
    if step:
        t = timed(step, device, 5, repeat)  # 5: a captured step's 3 warm-up steps and capture
        images = models * cfg.batch
        r.update(
            train_ips=images / t,
            step_ms=1e3 * t,
            mfu=r["gflop_per_image"] * 1e9 * images / t / peak,
        )
    if generate:
        t = timed(generate, device, 1, 1)
        calls = 2 * cfg.steps - 1  # Heun: 2 * steps - 1 network calls per image
        flops = r["call_gflop"] * 1e9 * calls * cfg.sample_batch * models
        r.update(sample_ips=cfg.sample_batch / t, sample_mfu=flops / t / peak)
    return r


def bench(cfg, device, repeat, train=True, sample=True):
    """One row: cfg's training step (train), Heun sampling of cfg.sample_batch images (sample)."""
    step, state, method = G.stand_in_training(cfg, device)
    r = dict(device=device.type, flags=options(cfg), preset=cfg.preset)
    if train:  # the sampling row compiles only the sampler
        r["first_step_s"] = first_step_s(step, device)
    r.update(flop_counts(state, method, cfg, device))

    def generate():
        method.generate(state.ema, cfg.sample_batch, log=lambda m: None)

    return rates(r, 1, train and step, sample and generate, cfg, device, repeat)


def bench_trio(cfg, device, repeat, train=True, sample=True):
    """A trio row: table1's three models stepped together at cfg.batch each (repro_gpu.trio_step),
    timed as one step, train img/s the sum over the three; sampling: repro_gpu.trio_generate of
    cfg.sample_batch images per model, sample img/s per model (each model's images over the time
    the three take together); MFU over all three."""
    step, members = G.stand_in_trio(cfg, device)
    r = dict(device=device.type, flags=options(cfg), preset=cfg.preset, trio=True)
    if train:
        r["first_step_s"] = first_step_s(step, device)
    r.update(flop_counts(members[0].state, members[0].method, cfg, device))

    def generate():
        G.trio_generate(members, cfg.sample_batch, log=lambda m: None)

    return rates(r, len(members), train and step, sample and generate, cfg, device, repeat)


def case(r):
    side = "" if r.get("resolution") is None else f" {r['resolution']}x{r['resolution']}"
    return f"{r['name']}{side} {r['device']} {' '.join(r['flags']) or 'eager'}"


# Issue 24's targets for table1's trio on one H200 (small preset, batch 256 per model): training
# images/s summed over the three models stepped together, Heun-40 sampling images/s per model.
TRIO_TRAIN_TARGET, TRIO_TRAIN_STRETCH, TRIO_SAMPLE_TARGET = 30_000, 45_000, 1_500


def trio_note(r):
    """What a trio row's rates mean and, on a GPU, the targets beside them."""
    if not r.get("trio"):
        return ""
    gpu = r["device"] == "cuda"
    notes = []
    if r.get("train_ips"):
        target = f" against the target {TRIO_TRAIN_TARGET:,} (stretch {TRIO_TRAIN_STRETCH:,})"
        notes.append(f"train {r['train_ips']:,.0f} img/s summed over the 3" + target * gpu)
    if r.get("sample_ips"):
        target = f" against the target {TRIO_SAMPLE_TARGET:,}"
        notes.append(f"sample {r['sample_ips']:,.0f} img/s per model" + target * gpu)
    return f" ({'; '.join(notes)})"


def row(r, note=""):
    def cell(key, fmt, scale=1):
        return "-" if r.get(key) is None else fmt.format(scale * r[key])

    return (
        f"| {case(r)}{note}{trio_note(r)} | {r['params'] / 1e6:.2f}M | "
        f"{cell('first_step_s', '{:.1f}')} | "
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
# The one-model GPU rows, small preset at batch 256, each beside the eager baseline: the captured
# step, the compiled network inside it, then bf16 autocast and channels_last on top.
FASTEST = dict(graph=True, compile="default", precision="bf16")  # measured so at b3d7c3e
ONE_MODEL_ROWS = [
    ("eager", {}),
    ("graph", dict(graph=True)),
    ("graph + compile", dict(graph=True, compile="default")),
    ("graph + compile + bf16", FASTEST),
    ("+ channels_last", dict(FASTEST, channels_last=True)),
]


def gpu_row_list(args):
    """(name, options, what to time) in order of need, should --max-s cut the list: one model with
    the options measured fastest at b3d7c3e (the trio's baseline: models in turn train at its
    rate), the trio stepped together with them (trio: True), the trio's sampling, the trio with
    channels_last, then the one-model rows from eager up (eager also samples), one model's sampling
    and the edm preset. Options None: the fastest one-model row's so far."""
    base = dict(preset="small", resolution=32, batch=args.batch or 256, steps=args.steps)
    one = {
        name: (name, dict(base, **o), dict(sample=name == "eager")) for name, o in ONE_MODEL_ROWS
    }
    trio = dict(base, **FASTEST)
    sampling = f"Heun-{args.steps} sampling at batch {args.sample_batch}"
    return base, [
        one["graph + compile + bf16"],
        ("trio together", trio, dict(trio=True, sample=False)),
        (f"trio {sampling}", trio, dict(trio=True, train=False)),
        ("trio together", dict(trio, channels_last=True), dict(trio=True, sample=False)),
        one["eager"],
        one["graph"],
        one["graph + compile"],
        (sampling, None, dict(train=False)),
        one["+ channels_last"],
        ("edm", None, {}),
    ]


def gpu_row(args, device, base, opts, what):
    """One GPU row's result; each row compiles afresh."""
    cfg = G.Config(**opts, sample_batch=args.sample_batch)
    what = dict(what)
    timing = bench_trio if what.pop("trio", False) else bench
    try:
        r = timing(cfg, device, args.repeat, **what)
    finally:
        torch._dynamo.reset()  # torch's recompile limit stays far
        torch.cuda.empty_cache()
    return dict(r, resolution=32, opts={k: v for k, v in opts.items() if k not in base})


def gpu_rows(args, device):
    """Each GPU row in one run (gpu_row_list), printed as it finishes. A row that fails prints its
    error and the run goes on; rows that would start after --max-s are skipped."""
    t0, done = time.time(), []
    base, rows = gpu_row_list(args)
    print("\n".join(HEADER), flush=True)
    for name, opts, what in rows:
        if time.time() - t0 > args.max_s:
            print(
                f"| {name}: skipped, the bench's --max-s {args.max_s:g} s has passed |", flush=True
            )
            continue
        trained = [r for r in done if r.get("train_ips") and not r.get("trio")]
        if opts is None and not trained:
            print(f"| {name}: skipped, no small row trained |", flush=True)
            continue
        if opts is None:  # the fastest one-model small row's options
            best = max(trained, key=lambda r: r["train_ips"])
            opts = dict(base, **best["opts"], preset="edm" if name == "edm" else "small")
            what = dict(sample=False) if name == "edm" else what
        try:
            r = dict(gpu_row(args, device, base, opts, what), name=name)
        except Exception as e:
            why = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
            print(f"| {name}: failed, {why} |", flush=True)
            continue
        done.append(r)
        print(row(r), flush=True)
    return done


def best_flags(rows):
    """repro_gpu.py's flags of the fastest one-model small-preset training row."""
    small = [r for r in rows if r["preset"] == "small" and r.get("train_ips") and not r.get("trio")]
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
        help="cpu: the tiny preset at batch 32 and 256, and table1's trio stepped together at 32; "
        "gpu: the small preset with --graph --compile default --precision bf16, the trio stepped "
        "together with those options (training, Heun-40 sampling; then + channels_last), then "
        "eager, --graph, + --compile, Heun-40 sampling, + channels_last and the edm preset, the "
        "last two with the fastest one-model row's options (default: gpu where there is a GPU, "
        "else cpu)",
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
    p.add_argument(
        "--trio",
        action="store_true",
        help="with --preset: table1's three models stepped together (repro_gpu.trio_step), train "
        "img/s summed over the three, sampling (trio_generate) img/s per model",
    )
    p.add_argument("--json", action="store_true", help="print one JSON result instead of the table")
    return p.parse_args()


def one_case(args, preset, device, batch, trio=False):
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
    r = (bench_trio if trio else bench)(cfg, device, args.repeat)
    threads = f" {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    name = f"{'trio ' * trio}{preset} b{batch} {args.dtype}{threads}"
    return dict(r, name=name, resolution=cfg.resolution)


def cpu_cases(args, cases):
    """The CPU table; on CPU each one-model case also runs in a child process without the
    Makefile's glibc malloc settings, to show what they change."""
    malloc_set = all(v in os.environ for v in MALLOC_VARS)
    lines = list(HEADER)
    for preset, device, batch, trio in cases:
        r = one_case(args, preset, device, batch, trio)
        if args.json:
            return print(json.dumps(r))
        cpu = r["device"] == "cpu"
        lines.append(row(r, " (malloc vars set)" if cpu and malloc_set else ""))
        if cpu and malloc_set and not args.preset and not trio:  # in a child process without them
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
    # glibc's malloc settings matter, and the trio stepped together at 32 (the code path runs).
    if args.trio and not args.preset:
        fail("--trio times one case: give --preset too (the default tables have trio rows)")
    if args.preset:
        cases = [(args.preset, args.device, args.batch, args.trio)]
    else:
        cases = [("tiny", "cpu", b, False) for b in ([args.batch] if args.batch else [32, 256])]
        cases.append(("tiny", "cpu", args.batch or 32, True))
    checked = []
    for preset, device, batch, trio in cases:
        device = torch.device(device or ("cpu" if preset == "tiny" else "cuda"))
        if device.type == "cuda" and not cuda:
            fail("--device cuda: no CUDA device here; use --device cpu")
        if (args.graph or args.compile == "cudagraphs") and device.type != "cuda":
            fail(
                "--graph and --compile cudagraphs replay CUDA graphs and need a CUDA "
                "device; drop them on a CPU"
            )
        checked.append((preset, device, batch or (32 if preset == "tiny" else 256), trio))
    cpu_cases(args, checked)


if __name__ == "__main__":
    main()
