"""GPU speed for ambient.py's runs, and Table 1's CIFAR-10 pair at the paper's budget in one command.

    python repro_gpu.py train --data cifar --n 300 --sigma-tn 0.4 --graph        # ambient.py's flags and more
    torchrun --nproc_per_node=4 -- repro_gpu.py train --data cifar --n 300 --sigma-tn 0.4
    python repro_gpu.py table1 [--budget-s 600] [ambient.py's flags, e.g. --ambient-weight x0 or --preset edm]

`train` runs ambient.py's own loop (ambient.run, ambient.train) with the method object wrapped: the
wrapper splits each batch over the processes, evaluates the loss through the compiled or multi-GPU
network under autocast, and samples under the same settings. `--graph` captures the whole training
step, batch draw to EMA, as one CUDA graph, and the sampling of each full batch as another. `table1`
trains the n = 300 DDPM / Algorithm 1 pair side by side on one GPU, samples 50,000 images from each
and scores them with eval_memorization.py. The `--` keeps torchrun from reading --n as its own flag.
ambient.py knows nothing of this file.
"""

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

import ambient as A
import conditional as C
from ambient import UserError, option


@dataclass
class Config(A.Config):
    precision: str = option(
        "fp32",
        "bf16: the network under bfloat16 autocast; weights, optimizer and losses stay "
        "float32 (measured slower than TF32 on an H200 for the paper preset: NOTES.md)",
        choices=("fp32", "bf16"),
    )
    channels_last: bool = option(
        False, "NHWC memory layout for the network, as GPU tensor cores read it"
    )
    compile: str = option(
        "none",
        "torch.compile the network: default fuses its kernels, cudagraphs (without "
        "--graph) replays the network's calls as CUDA graphs",
        choices=("none", "default", "cudagraphs"),
    )
    graph: bool = option(
        False,
        "capture each training step (batch, forward, backward, Adam, EMA) as one CUDA graph, "
        "and Heun sampling of each full batch as another (one GPU; the fastest path)",
    )


def distributed(backend="gloo"):
    """(rank, world size). Under torchrun (WORLD_SIZE > 1) the first call joins the process group."""
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def autocast(device, precision):
    return torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16")


def compiled(module, mode="none", replay=True):
    """torch.compile fuses the network's elementwise work; `cudagraphs` (reduce-overhead) also replays its
    calls as CUDA graphs. replay=False (sampling): guidance reads two outputs of one step, and a replay
    would overwrite the first with the second."""
    if mode == "none":
        return module
    return torch.compile(
        module, mode="reduce-overhead" if mode == "cudagraphs" and replay else "default"
    )


@contextlib.contextmanager
def compile_errors(active):
    """torch.compile builds its kernels on the first call; a machine that cannot gets one line."""
    try:
        yield
    except Exception as e:
        if not active:
            raise
        raise UserError(
            f"--compile could not build the kernels ({type(e).__name__}: {str(e).strip()[:160]}); "
            "run without --compile"
        ) from e


def to_channels_last(net):
    """NHWC weights, and NHWC inputs to the raw network (only then: a layout copy changes the rounding)."""
    net.to(memory_format=torch.channels_last)
    net.net.register_forward_pre_hook(
        lambda m, args: (args[0].contiguous(memory_format=torch.channels_last), *args[1:])
    )
    return net


# ------------------------------------------------------------------------------------------------
# The whole training step as one CUDA graph. A graph replays recorded kernels with no host work, so
# everything that changes from step to step must live on the device: the batch's random numbers come
# from a generator registered with the graph, the learning rate and the EMA weight are device scalars
# filled in before each replay, Adam is the fused kernel (which reads its step count and learning
# rate on the device), and the EMA is foreach arithmetic on a device weight instead of lerp_ with a
# Python number, which a graph would freeze at its captured value.
# ------------------------------------------------------------------------------------------------
def graphed_step(state, method, cfg, capture=True):
    """ambient.eager_step in the form a CUDA graph holds, held in one on CUDA after three warm-up steps
    (on a side stream, as capture needs). capture=False, or a CPU, runs the same body eagerly: the
    test compares that with eager_step."""
    device = next(state.net.parameters()).device
    lr, ema_weight = torch.full((), cfg.lr, device=device), torch.zeros((), device=device)
    for group in state.opt.param_groups:  # capturable: Adam's own check before it may be captured
        group["lr"], group["capturable"] = (
            lr,
            group["capturable"] or (capture and device.type == "cuda"),
        )
    net_params, ema_params = list(state.net.parameters()), list(state.ema.parameters())

    def body():
        loss = method.loss(state.net, method.batch(state.gen)).mean()
        loss.backward()
        state.opt.step()
        with torch.no_grad():
            change = torch._foreach_sub(net_params, ema_params)
            torch._foreach_mul_(change, ema_weight)
            torch._foreach_add_(ema_params, change)
        return loss.detach()

    graph, out, warm_up = None, None, 3

    def step():
        nonlocal graph, out, warm_up
        seen = state.step * cfg.batch  # ambient.learning_rate and ambient.ema_update's half-life
        lr.fill_(A.learning_rate(cfg, seen))
        ema_weight.fill_(1 - 0.5 ** (cfg.batch / max(min(500_000, 0.05 * seen), 1e-8)))
        if not capture or device.type != "cuda" or warm_up:
            warm_up -= device.type == "cuda" and capture
            with side_stream(device):
                state.opt.zero_grad(set_to_none=True)
                return body()
        if (
            graph is None
        ):  # grads set to None: the captured backward writes them afresh at each replay
            state.opt.zero_grad(set_to_none=True)
            graph = torch.cuda.CUDAGraph()
            graph.register_generator_state(state.gen)
            with torch.cuda.graph(graph):
                out = body()
        graph.replay()
        return out

    return step


@contextlib.contextmanager
def side_stream(device):
    """CUDA: run the block on a fresh stream and wait for it (graph warm-up); elsewhere: do nothing."""
    if device.type != "cuda":
        yield
        return
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        yield
    torch.cuda.current_stream().wait_stream(side)


def graphed_sampler(method, h_theta, batch):
    """method.sample_batch with a full batch's Heun (or Euler) integration captured once as a CUDA graph
    and replayed: the starting noise (and the classes) are copied into the graph's input as the eager
    sampler draws them, so the samples are the eager ones up to floating-point order. Guidance's two
    network calls sit in one graph and cannot overwrite each other. Other methods (the baselines) and
    partial batches sample eagerly."""
    cfg, device, inner = (
        method.cfg,
        next(h_theta.parameters()).device,
        getattr(method, "method", method),
    )
    if device.type != "cuda" or type(inner) not in (A.Algorithm1, C.ClassConditional):
        return lambda k, rows: method.sample_batch(h_theta, k, rows)
    side = h_theta.resolution
    x_T, labels = (
        torch.zeros(batch, 3, side, side, device=device),
        torch.zeros(batch, dtype=torch.long, device=device),
    )
    h = (
        C.conditioned(h_theta, labels, cfg.guidance)
        if isinstance(inner, C.ClassConditional)
        else h_theta
    )
    with side_stream(device):
        A.sample(
            h, x_T, cfg.steps, cfg.sampler
        )  # warm-up: cuDNN picks its kernels outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = A.sample(h, x_T, cfg.steps, cfg.sampler)

    def sample_batch(k, rows):
        if len(rows) < batch:  # the last, partial batch
            return method.sample_batch(h_theta, k, rows)
        x_T.copy_(method.noise(h_theta, k, rows))
        if isinstance(inner, C.ClassConditional):
            labels.copy_(torch.arange(rows.start, rows.stop) % cfg.num_classes)
        graph.replay()
        return out.clone()

    return sample_batch


class Fast:
    """A method object (ambient.Algorithm1 or an extension's) run fast: this process's slice of each
    batch, the loss through the compiled (and DistributedDataParallel) network under autocast, CUDA
    graphs with --graph."""

    def __init__(self, method, cfg, rank=0, world=1):
        self.method, self.cfg, self.rank, self.world, self.forward, self.samplers = (
            method,
            cfg,
            rank,
            world,
            None,
            {},
        )

    def __getattr__(self, name):
        return getattr(self.method, name)

    def network(self):
        net = self.method.network()
        return to_channels_last(net) if self.cfg.channels_last else net

    def batch(
        self, gen
    ):  # every rank draws the same global batch and keeps its slice: DDP averages the gradients
        b = self.method.batch(gen)
        return (
            b
            if self.world == 1
            else {
                k: v.chunk(self.world)[self.rank] if torch.is_tensor(v) and v.dim() else v
                for k, v in b.items()
            }
        )

    def loss(self, h_theta, b):
        with autocast(self.S.device, self.cfg.precision):
            return self.method.loss(self.forward, b)

    def generate(self, h_theta, count, log=print):
        if not self.cfg.graph:
            with (
                autocast(self.S.device, self.cfg.precision),
                compile_errors(self.cfg.compile != "none"),
            ):
                return self.method.generate(
                    compiled(h_theta, self.cfg.compile, replay=False), count, log
                )
        batch = min(self.cfg.sample_batch, count)
        with (
            autocast(self.S.device, self.cfg.precision),
            compile_errors(self.cfg.compile != "none"),
        ):
            if (
                id(h_theta),
                batch,
            ) not in self.samplers:  # captured once per network and batch size
                h = compiled(h_theta, "default" if self.cfg.compile != "none" else "none")
                self.samplers[id(h_theta), batch] = graphed_sampler(self.method, h, batch)
            return A.generate(self.samplers[id(h_theta), batch], count, batch, log)

    def make_step(self, state, method, cfg):
        net = nn.parallel.DistributedDataParallel(state.net) if self.world > 1 else state.net
        self.forward = compiled(
            net, "default" if cfg.graph and cfg.compile != "none" else cfg.compile
        )
        step, first = (graphed_step if cfg.graph else A.eager_step)(state, method, cfg), [True]

        def guarded():
            with compile_errors(first.pop() if first else False):
                return step()

        return guarded


def check_device(cfg, device, world):
    if (cfg.compile == "cudagraphs" or cfg.graph) and device.type != "cuda":
        raise UserError(
            f"{'--graph' if cfg.graph else '--compile cudagraphs'} replays CUDA graphs and needs a CUDA "
            "device; drop it (on a CPU, --compile default still fuses kernels)"
        )
    if cfg.graph and world > 1:
        raise UserError("--graph captures one GPU's step; with torchrun use --compile instead")
    if (
        cfg.compile != "none"
        and device.type == "cpu"
        and not any(map(shutil.which, ("g++", "c++", "clang++")))
    ):
        raise UserError(
            "--compile on CPU builds C++ kernels and no C++ compiler is installed; install g++ or drop "
            "--compile"
        )


def start(cfg, method_of=A.Algorithm1):
    """ambient.run with the options of this file; under torchrun, one process per GPU."""
    device = A.pick_device(cfg.device)
    rank, world = distributed("nccl" if device.type == "cuda" else "gloo")
    check_device(cfg, device, world)
    if cfg.batch % world:
        raise UserError(
            f"--batch {cfg.batch} does not split over {world} processes; use a multiple of {world}"
        )
    if world > 1 and device.type == "cuda":
        cfg.device = f"cuda:{os.environ.get('LOCAL_RANK', rank)}"
    fast = Fast(method_of(cfg), cfg, rank, world)
    out = A.run(cfg, fast, fast.make_step, main_process=rank == 0)
    if world > 1:
        torch.distributed.destroy_process_group()
    return out


def train(argv=None):
    return A.main(argv, Config, start)


# ------------------------------------------------------------------------------------------------
# Table 1's CIFAR-10 pair in one command: DDPM and Algorithm 1 at n = 300, trained side by side on
# one GPU, 50,000 samples each, scored by eval_memorization.py. --budget-s scales the images seen
# so that the whole command fits; the report says what share of the paper's budget that was.
# ------------------------------------------------------------------------------------------------
PAPER_IMAGES = 30_000 * 256  # the paper: 30k iterations at batch 256


def stand_in_training(cfg, device):
    """ambient.py's training step with cfg's options on random stand-in images, for timing (here and in
    bench.py): (one step that also counts it, the TrainState, the method). TF32 on CUDA, as ambient.run."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    method = Fast(A.Algorithm1(cfg), cfg)
    method.use_data(
        torch.randn(max(cfg.batch, 64), 3, cfg.resolution, cfg.resolution, device=device)
    )
    state = A.training_state(method.network().to(device), cfg, 3 * cfg.resolution**2)
    step = method.make_step(state, method, cfg)

    def one():
        step()
        state.step += 1

    return one, state, method


def measure(cfg, steps=20):
    """(training images/s of one model with cfg's options, sampling images/s), measured in this process
    on a stand-in dataset. Both models train at once, so the pair gets about twice the first's time."""
    device = A.pick_device(cfg.device)
    one, state, method = stand_in_training(cfg, device)

    def timed(fn, n, warm_up=5):  # the warm-up covers compilation and capture
        for _ in range(warm_up):
            fn()
        torch.cuda.synchronize() if device.type == "cuda" else None
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize() if device.type == "cuda" else None
        return (time.perf_counter() - t0) / n

    train_s = timed(one, steps)
    sample_s = timed(
        lambda: method.generate(state.ema, cfg.sample_batch, log=lambda m: None), 2, warm_up=1
    )
    return cfg.batch / train_s, cfg.sample_batch / sample_s


def table1_args(argv):
    p = argparse.ArgumentParser(
        description="Table 1's CIFAR-10 pair (DDPM, Algorithm 1) at n = 300 in one command; "
        "other flags go to both runs (ambient.py's and `train`'s)"
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="fit the whole command in about this many seconds "
        "by training on fewer images than the paper's 7.68M (default: the paper's budget)",
    )
    p.add_argument(
        "--sigma-tn", type=float, default=0.4, help="Algorithm 1's sigma_tn (default 0.4)"
    )
    p.add_argument("--samples", type=int, default=50_000, help="samples per model (paper: 50,000)")
    p.add_argument(
        "--out",
        default="runs/table1",
        help="folder for the two runs and the report (default runs/table1)",
    )
    known, rest = p.parse_known_args(argv)
    return known, rest


def iterations_for(budget_s, train_ips, sample_ips, samples, batch, max_iters):
    """Training iterations per model so that the pair trains, samples and is scored in budget_s seconds:
    the two models share the device, so each trains and samples at half its measured rate, and scoring
    is given a tenth of the budget."""
    left = 0.9 * budget_s - 2 * samples / sample_ips
    if left <= 0:
        need = 2 * samples / sample_ips
        raise UserError(
            f"--budget-s {budget_s:g}: sampling 2 x {samples:,} images alone takes about {need:.0f} s at the "
            f"measured {sample_ips:.0f} img/s; pass at least --budget-s {1.1 * need / 0.9:.0f} or fewer --samples"
        )
    return int(max(1, min(max_iters, left * train_ips / 2 / batch)))


def plan(args, rest):
    """The runs' common flags, with --iters scaled to the budget from measured rates: a plan dict."""
    flags = ["--n", "300"] + ([] if "--data" in rest else ["--data", "cifar"]) + rest
    flags += ["--graph"] if torch.cuda.is_available() and "--graph" not in rest else []
    cfg = A.build_parser(Config).parse_args(flags + ["--samples", str(args.samples)])
    cfg = Config(**vars(cfg))
    cfg.check()
    cfg.resolution = cfg.resolution or 32
    train_ips, sample_ips = measure(cfg) if args.budget_s else (None, None)
    iters = (
        iterations_for(args.budget_s, train_ips, sample_ips, args.samples, cfg.batch, cfg.iters)
        if args.budget_s
        else cfg.iters
    )
    return dict(
        flags=flags,
        iters=iters,
        images=iters * cfg.batch,
        share=iters * cfg.batch / PAPER_IMAGES,
        train_ips=train_ips,
        sample_ips=sample_ips,
    )


def score(argv):
    """eval_memorization.py on the runs, in this process: its Markdown table, or one line if it fails."""
    import io
    import eval_memorization

    table, notes = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(table), contextlib.redirect_stderr(notes):
            eval_memorization.main(argv)
    except SystemExit:
        raise UserError(
            f"scoring failed: {(notes.getvalue().strip().splitlines() or ['no output'])[-1]}"
        )
    return table.getvalue()


def table1(argv):
    args, rest = table1_args(argv)
    t0, out = time.time(), Path(args.out)
    p = plan(args, rest)
    rates = (
        f" (measured for one model: {p['train_ips']:.0f} train img/s, {p['sample_ips']:.0f} sample img/s)"
        if p["train_ips"]
        else ""
    )
    print(
        f"training {p['images']:,} images per model, {100 * p['share']:.1f}% of the paper's 7.68M{rates}",
        flush=True,
    )
    common = [
        sys.executable,
        __file__,
        "train",
        *p["flags"],
        "--iters",
        str(p["iters"]),
        "--samples",
        str(args.samples),
    ]
    runs = {
        "ddpm": ["--sigma-tn", "0"],
        f"ambient-{args.sigma_tn:g}": ["--sigma-tn", f"{args.sigma_tn:g}"],
    }
    out.mkdir(parents=True, exist_ok=True)
    procs = {
        name: subprocess.Popen(
            common + extra + ["--out", str(out / name)],
            stdout=open(out / f"{name}.log", "w"),
            stderr=subprocess.STDOUT,
        )
        for name, extra in runs.items()
    }
    for name, proc in procs.items():
        if proc.wait():
            raise UserError(f"the {name} run failed; see {out / f'{name}.log'}")
    t_train = time.time() - t0
    table = score(
        [str(out / name) for name in runs]
        + [
            "--samples",
            str(args.samples),
            "--out",
            str(out / "eval"),
            "--cache-dir",
            str(out / "eval-cache"),
            "--no-download",
        ]
    )
    report = dict(
        plan=p,
        wall_s=dict(
            train_and_sample=t_train, score=time.time() - t0 - t_train, total=time.time() - t0
        ),
        scores=json.loads((out / "eval" / "report.json").read_text()),
    )
    (out / "table1.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "table1.md").write_text(
        f"Table 1's CIFAR-10 pair, n = 300: {p['images']:,} images seen per model "
        f"({100 * p['share']:.1f}% of the paper's), {args.samples:,} samples each.\n\n"
        + table
        + f"\nwall time: training and sampling {t_train:.0f} s, "
        f"scoring {report['wall_s']['score']:.0f} s, total {report['wall_s']['total']:.0f} s\n"
    )
    print((out / "table1.md").read_text())
    return report


def main(argv):
    if argv[:1] == ["train"]:
        return train(argv[1:])
    if argv[:1] == ["table1"]:
        try:
            return table1(argv[1:])
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    print(
        "usage: python repro_gpu.py train [ambient.py's flags] [--graph] [--precision bf16] [--channels-last] "
        "[--compile default|cudagraphs]\n       python repro_gpu.py table1 [--budget-s S] [flags for both runs]",
        file=sys.stderr,
    )
    sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
