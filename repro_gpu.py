"""GPU speed for ambient.py's runs, and Table 1's CIFAR-10 trio as curves in one command.

    python repro_gpu.py train --data cifar --n 300 --sigma-tn 0.4 --graph   # ambient.py's flags too
    torchrun --nproc_per_node=4 -- repro_gpu.py train --data cifar --n 300 --sigma-tn 0.4
    python repro_gpu.py table1 --data FILE.npz --judge DIR [--budget-s 480] [ambient.py's flags]

`train` runs ambient.py's own loop (ambient.run, ambient.train) with the method object wrapped: the
wrapper splits each batch over the processes, evaluates the loss through the compiled or multi-GPU
network under autocast, and samples under the same settings. `--graph` captures the whole training
step, batch draw to EMA, as one CUDA graph (with --compile: the compiled network inside it), and the
sampling of each full batch as another. `table1` trains the n = 300 trio (DDPM, Algorithm 1 under
the released and the x0 weight) in turns on one device to log-spaced checkpoints, samples each
model at each (Heun) and scores it: ambient.py's pixel metrics and, with --judge, the offline
judge's fd_judge and similarity. The `--` keeps torchrun from reading --n as its own flag.
ambient.py knows nothing of this file.
"""

import contextlib
import dataclasses
import functools
import json
import os
import shlex
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
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
        "float32 (measured slower than TF32 on an H200 for the small preset: NOTES.md)",
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
    """(rank, world size). Under torchrun (WORLD_SIZE > 1) the first call joins the process
    group."""
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def autocast(device, precision):
    return torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16")


def compiled(module, mode="none", replay=True):
    """torch.compile fuses the network's elementwise work; `cudagraphs` (reduce-overhead) also
    replays its calls as CUDA graphs. replay=False (sampling): guidance reads two outputs of one
    step, and a replay would overwrite the first with the second."""
    if mode == "none":
        return module
    limit = (
        "recompile_limit"
        if hasattr(torch._dynamo.config, "recompile_limit")
        else "cache_size_limit"
    )
    # table1: 6+ nets
    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 64))
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
    """NHWC weights, and NHWC inputs to the raw network (only then: a layout copy changes the
    rounding)."""
    net.to(memory_format=torch.channels_last)
    net.net.register_forward_pre_hook(
        lambda m, args: (args[0].contiguous(memory_format=torch.channels_last), *args[1:])
    )
    return net


# ------------------------------------------------------------------------------------------------
# The whole training step as one CUDA graph. A graph replays recorded kernels with no host work, so
# everything that changes from step to step must live on the device: the batch's random numbers come
# from a generator registered with the graph, the learning rate and the EMA weight are device
# scalars filled in before each replay, Adam is the fused kernel (which reads its step count and
# learning rate on the device), and the EMA is foreach arithmetic on a device weight instead of
# lerp_ with a Python number, which a graph would freeze at its captured value.
# ------------------------------------------------------------------------------------------------
def step_body(state, method, cfg, capturable):
    """ambient.eager_step split in the two parts a CUDA graph needs: fill() writes this step's
    learning rate and EMA weight into the device scalars, from state.step, and body() runs the step
    (batch, loss, backward, Adam, EMA), reading them there. The gradients must be None before body:
    it writes them afresh."""
    device = next(state.net.parameters()).device
    lr, ema_weight = torch.full((), cfg.lr, device=device), torch.zeros((), device=device)
    for group in state.opt.param_groups:  # capturable: Adam's own check before it may be captured
        group["lr"] = lr
        group["capturable"] = group["capturable"] or capturable
    net_params, ema_params = list(state.net.parameters()), list(state.ema.parameters())

    def fill():
        seen = state.step * cfg.batch  # ambient.learning_rate and ambient.ema_update's half-life
        lr.fill_(A.learning_rate(cfg, seen))
        ema_weight.fill_(1 - 0.5 ** (cfg.batch / max(min(500_000, 0.05 * seen), 1e-8)))

    def body():
        loss = method.loss(state.net, method.batch(state.gen)).mean()
        loss.backward()
        state.opt.step()
        with torch.no_grad():
            change = torch._foreach_sub(net_params, ema_params)
            torch._foreach_mul_(change, ema_weight)
            torch._foreach_add_(ema_params, change)
        return loss.detach()

    return fill, body


def graphed_step(state, method, cfg, capture=True):
    """ambient.eager_step in the form a CUDA graph holds, held in one on CUDA after three warm-up
    steps (on a side stream, as capture needs). capture=False, or a CPU, runs the same body eagerly:
    the test compares that with eager_step."""
    device = next(state.net.parameters()).device
    capture = capture and device.type == "cuda"
    fill, body = step_body(state, method, cfg, capture)
    graph, out, warm_up = None, None, 3

    def step():
        nonlocal graph, out, warm_up
        fill()
        if not capture or warm_up:
            warm_up -= capture
            with side_stream(device):
                state.opt.zero_grad(set_to_none=True)
                return body()
        # grads set to None: the captured backward writes them afresh at each replay
        if graph is None:
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
    """CUDA: run the block on a fresh stream and wait for it (graph warm-up); elsewhere: do
    nothing."""
    if device.type != "cuda":
        yield
        return
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        yield
    torch.cuda.current_stream().wait_stream(side)


def graphed_sampler(method, h_theta, batch):
    """method.sample_batch with a full batch's Heun (or Euler) integration captured once as a CUDA
    graph and replayed: the starting noise (and the classes) are copied into the graph's input as
    the eager sampler draws them, so the samples are the eager ones up to floating-point order.
    Guidance's two network calls sit in one graph and cannot overwrite each other. Other methods
    (the baselines) and partial batches sample eagerly."""
    cfg = method.cfg
    device = next(h_theta.parameters()).device
    inner = getattr(method, "method", method)
    if device.type != "cuda" or type(inner) not in (A.Algorithm1, C.ClassConditional):
        return lambda k, rows: method.sample_batch(h_theta, k, rows)
    side = h_theta.resolution
    x_T = torch.zeros(batch, 3, side, side, device=device)
    labels = torch.zeros(batch, dtype=torch.long, device=device)
    h = (
        C.conditioned(h_theta, labels, cfg.guidance)
        if isinstance(inner, C.ClassConditional)
        else h_theta
    )
    with side_stream(device):
        # warm-up: cuDNN picks its kernels outside the capture
        A.sample(h, x_T, cfg.steps, cfg.sampler)
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
        self.method = method
        self.cfg = cfg
        self.rank = rank
        self.world = world
        self.forward = None
        self.samplers = {}

    def __getattr__(self, name):
        return getattr(self.method, name)

    def network(self):
        net = self.method.network()
        return to_channels_last(net) if self.cfg.channels_last else net

    # every rank draws the same global batch and keeps its slice: DDP averages the gradients
    def batch(self, gen):
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
            # captured once per network and batch size
            if (id(h_theta), batch) not in self.samplers:
                h = compiled(h_theta, "default" if self.cfg.compile != "none" else "none")
                self.samplers[id(h_theta), batch] = graphed_sampler(self.method, h, batch)
            return A.generate(self.samplers[id(h_theta), batch], count, batch, log)

    def use_network(self, net, cfg):
        """The network the loss calls: DDP across processes, compiled as cfg says (inside a
        captured step: the default mode, whose kernels a graph can hold)."""
        net = nn.parallel.DistributedDataParallel(net) if self.world > 1 else net
        self.forward = compiled(
            net, "default" if cfg.graph and cfg.compile != "none" else cfg.compile
        )

    def make_step(self, state, method, cfg):
        self.use_network(state.net, cfg)
        step = (graphed_step if cfg.graph else A.eager_step)(state, method, cfg)
        first = [True]

        def guarded():
            with compile_errors(first.pop() if first else False):
                return step()

        return guarded


def check_device(cfg, device, world):
    if (cfg.compile == "cudagraphs" or cfg.graph) and device.type != "cuda":
        raise UserError(
            f"{'--graph' if cfg.graph else '--compile cudagraphs'} replays CUDA graphs and needs a "
            "CUDA device; drop it (on a CPU, --compile default still fuses kernels)"
        )
    if cfg.graph and world > 1:
        raise UserError("--graph captures one GPU's step; with torchrun use --compile instead")
    if (
        cfg.compile != "none"
        and device.type == "cpu"
        and not any(map(shutil.which, ("g++", "c++", "clang++")))
    ):
        raise UserError(
            "--compile on CPU builds C++ kernels and no C++ compiler is installed; install g++ or "
            "drop --compile"
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
# Three models stepped together. One small-preset model at batch 256 keeps an H200 only partly busy
# (16% MFU with --graph --compile default --precision bf16), so table1's trio steps as one CUDA
# graph that holds the three members' step bodies, each captured on a stream of its own that forks
# from the capture stream and joins back into it: one replay runs the three concurrently. Each
# member keeps its own batch generator (registered with the graph), device scalars, fused Adam and
# EMA, so each takes exactly the step it takes alone. Sampling does the same with the three EMAs'
# Heun integrations. Without --graph the members take turns; on a CPU the bodies run in turn.
# ------------------------------------------------------------------------------------------------
def forked(fns, streams):
    """Each fn() on its own stream, forked from the current one and joined back into it; inside a
    capture the graph holds them side by side. -> their results."""
    fork = torch.cuda.current_stream()
    results = []
    for fn, stream in zip(fns, streams, strict=True):
        stream.wait_stream(fork)
        with torch.cuda.stream(stream):
            results.append(fn())
    for stream in streams:
        fork.wait_stream(stream)
    return results


def capture_together(fns, device, generators=()):
    """One CUDA graph holding each fn() on its own stream (forked), with `generators` registered so
    that each replay draws fresh numbers from them. -> (graph, the fns' outputs)."""
    graph = torch.cuda.CUDAGraph()
    for gen in generators:
        graph.register_generator_state(gen)
    streams = [torch.cuda.Stream(device) for _ in fns]
    with torch.cuda.graph(graph):
        outs = forked(fns, streams)
    return graph, outs


def trio_step(members, cfg):
    """-> step(): every member one training step, the list of their losses (on the device). Each
    member's step is its own (ambient.eager_step through Fast, or graphed_step's body): its own
    batch generator, learning rate and EMA from its own Config and state.step. With cfg.graph on
    CUDA the bodies run as one graph (three warm-up steps on side streams first, as graphed_step);
    without --graph the members' own steps take turns. The caller adds 1 to each state.step."""
    if not cfg.graph:
        steps = [m.method.make_step(m.state, m.method, m.cfg) for m in members]
        return lambda: [step() for step in steps]
    device = next(members[0].state.net.parameters()).device
    capture = device.type == "cuda"
    for m in members:
        m.method.use_network(m.state.net, m.cfg)
    parts = [step_body(m.state, m.method, m.cfg, capture) for m in members]
    graph, outs, warm_up, first = None, None, 3, True

    def in_turn(state, body):
        with side_stream(device):
            state.opt.zero_grad(set_to_none=True)  # the body writes the gradients afresh
            return body()

    def step():
        nonlocal graph, outs, warm_up, first
        with compile_errors(first and cfg.compile != "none"):  # the first call compiles
            first = False
            for fill, _ in parts:
                fill()
            if not capture or warm_up:
                warm_up -= capture
                return [in_turn(m.state, body) for m, (_, body) in zip(members, parts, strict=True)]
            if graph is None:
                for m in members:
                    m.state.opt.zero_grad(set_to_none=True)
                bodies = [body for _, body in parts]
                graph, outs = capture_together(bodies, device, [m.state.gen for m in members])
            graph.replay()
            return list(outs)

    return step


def trio_sampler(members, batch):
    """-> sample_batches(k, rows): each member's batch k of samples (numbers `rows`), from its EMA
    and its own noise (seed + k), as a list. With --graph, full batches run one graph that holds
    the members' Heun integrations side by side (CUDA; on a CPU the same in turn), their starting
    noise copied into its inputs; the last, partial batch samples eagerly."""
    cfg = members[0].cfg
    device = next(members[0].state.ema.parameters()).device
    capture = device.type == "cuda"
    nets = [compiled(m.state.ema, "none" if cfg.compile == "none" else "default") for m in members]
    side = members[0].state.ema.resolution
    x_T = [torch.zeros(batch, 3, side, side, device=device) for _ in members]

    def integrations():
        return [
            partial(A.sample, h, x, m.cfg.steps, m.cfg.sampler)
            for m, h, x in zip(members, nets, x_T, strict=True)
        ]

    graph, outs = None, None
    if capture:
        with side_stream(device):  # warm-up: compilation and cuDNN's choices, outside the capture
            for run in integrations():
                run()
        graph, outs = capture_together(integrations(), device)

    def sample_batches(k, rows):
        if len(rows) < batch:
            return [m.method.sample_batch(h, k, rows) for m, h in zip(members, nets, strict=True)]
        for m, h, x in zip(members, nets, x_T, strict=True):
            x.copy_(m.method.noise(h, k, rows))
        if graph is None:
            return [run() for run in integrations()]
        graph.replay()
        return [out.clone() for out in outs]

    return sample_batches


def trio_generate(members, count, log=print):
    """-> each member's `count` samples (in [-1, 1], NCHW), what member.method.generate(
    member.state.ema, count, log) gives: with --graph the three EMAs sample together (trio_sampler,
    captured once per batch size), without it in turn."""
    cfg = members[0].cfg
    if not cfg.graph:
        return [m.method.generate(m.state.ema, count, log) for m in members]
    batch = min(cfg.sample_batch, count)
    device = next(members[0].state.ema.parameters()).device
    cache = members[0].method.samplers  # captured once per trio of networks and batch size
    key = (*(id(m.state.ema) for m in members), batch)
    with autocast(device, cfg.precision), compile_errors(cfg.compile != "none"):
        if key not in cache:
            cache[key] = trio_sampler(members, batch)
        samples = [[] for _ in members]
        for k, start in enumerate(range(0, count, batch)):
            rows = range(start, min(count, start + batch))
            for kept, x in zip(samples, cache[key](k, rows), strict=True):
                kept.append(x.clamp(-1, 1).cpu())  # as ambient.generate keeps them
            log(f"sampled {rows.stop}/{count} per model")
    return [torch.cat(kept) for kept in samples]


def stand_in_trio(cfg, device):
    """table1's three members (TRIO's settings over cfg, one seed: the same initial weights) on
    random stand-in images, for timing in bench.py: (one trio_step that also counts it, the
    members). TF32 on CUDA, as ambient.run."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    side = cfg.resolution
    torch.manual_seed(0)
    images = torch.randn(max(cfg.batch, 64), 3, side, side, device=device)
    members = []
    for name, extra in TRIO.items():
        member_cfg = dataclasses.replace(cfg, **extra)
        torch.manual_seed(0)
        method = Fast(A.Algorithm1(member_cfg), member_cfg)
        method.use_data(images)
        state = A.training_state(method.network().to(device), member_cfg, 3 * side**2)
        members.append(SimpleNamespace(name=name, cfg=member_cfg, method=method, state=state))
    step = trio_step(members, cfg)

    def one():
        losses = step()
        for m in members:
            m.state.step += 1
        return losses

    return one, members


# ------------------------------------------------------------------------------------------------
# Table 1's CIFAR-10 trio in one command: DDPM and Algorithm 1 under both loss weights at n = 300,
# the same subset, seed, initialisation and batches, stepped together (trio_step) to log-spaced
# checkpoints; at each checkpoint the trio's state is saved, each model samples with Heun-40 and is
# scored, so the report is a curve of copying and quality against images seen, and a reading of
# the two at matched quality. --budget-s measures the trio's own first steps and plans the images
# seen that fit; a stop saves the trio and --resume continues it, or extends its curve.
# ------------------------------------------------------------------------------------------------
PAPER_IMAGES = 30_000 * 256  # the paper: 30k iterations at batch 256
TRIO = {
    "ddpm": dict(sigma_tn=0.0),
    "released": dict(ambient_weight="released"),
    "x0": dict(ambient_weight="x0"),
}
TRIO_FILE = "trio.json"  # the trio's record: its settings, schedule, saved step and scored rows
PROGRESS_S = 30.0  # while training, a progress line at least this often (seconds of wall time)
MEASURE_MAX_S = 30.0  # the longest timed training --measure-s may ask for
# what table1 calls in a --judge folder's judge.py
JUDGE_API = ("load_judge", "features", "nn_cosine", "pixel_ratio", "frechet")


class Stopped(Exception):  # SIGINT or SIGTERM, the trio saved: one line, exit 130
    pass


def stand_in_training(cfg, device):
    """ambient.py's training step with cfg's options on random stand-in images, for timing (here
    and in bench.py): (one step that also counts it, the TrainState, the method). TF32 on CUDA, as
    ambient.run."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    method = Fast(A.Algorithm1(cfg), cfg)
    side = cfg.resolution
    method.use_data(torch.randn(max(cfg.batch, 64), 3, side, side, device=device))
    state = A.training_state(method.network().to(device), cfg, 3 * side**2)
    step = method.make_step(state, method, cfg)

    def one():
        step()
        state.step += 1

    return one, state, method


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    """Seconds that fn() takes, the device's queue drained before and after."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


@dataclass
class Rates:
    train_ips: float  # training images/s of the three models together (the sum over the trio)
    sample_ips: float  # sampling images/s of the three together (Heun, whole sampling batches)
    setup_s: float  # first steps and sampling batches beyond their timed cost: compile, capture


class Stops:
    """SIGINT and SIGTERM, noted when they come and raised as KeyboardInterrupt at the next safe
    point (`check`): after a whole training step and its count, between sampling batches, after a
    line of the log. There the three models' state is whole and no file is half written."""

    def __init__(self):
        self.pending = False

    def __call__(self, signum, frame):
        self.pending = True

    def check(self):
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt


def measure(trio, measure_s, budget_s, t0, room):
    """The trio's rates, measured on the trio itself: its first steps (the graphs' warm-up and
    capture, the compilation: set-up), then measure_s seconds of timed steps, all of them the run's
    own first steps and at most the `room` steps left to the target; then two sampling batches per
    model, the first with its set-up, the second timed. Refuses, naming what it measured, once the
    measurement alone has spent the budget; None when the target is too near to measure."""
    cfg, device = trio.cfg, trio.device
    warm = 5 if device.type == "cuda" else 1  # a captured step: 3 warm-up steps, then the capture
    if room < warm + 3:
        trio.log(f"{room} step(s) to the target: too few to measure; the plan is the target")
        return None
    trio.log(
        f"measuring speed on the trio ({cfg.preset} preset, batch {cfg.batch} per model, on "
        f"{device}): {warm} set-up step(s), about {measure_s:g} s of timed steps (the run's first "
        f"steps), two sampling batches of {cfg.sample_batch} per model"
    )
    first_s = timed(lambda: trio.advance(warm), device)
    over_budget(budget_s, t0, f"{warm} set-up step(s) of the trio took {first_s:.1f} s")
    step_s = timed(lambda: trio.advance(1), device)
    steps = max(2, min(int(measure_s / max(step_s, 1e-6)), room - warm - 1))
    train_ips = 3 * cfg.batch * steps / timed(lambda: trio.advance(steps), device)

    def batch():
        trio_generate(trio.members, cfg.sample_batch, log=trio.quiet)

    warm_s = timed(batch, device)
    over_budget(budget_s, t0, f"the first sampling batches took {warm_s:.1f} s")
    sample_s = timed(batch, device)
    setup_s = max(first_s - warm * 3 * cfg.batch / train_ips, 0.0) + max(warm_s - sample_s, 0.0)
    rates = Rates(train_ips, 3 * cfg.sample_batch / sample_s, setup_s)
    trio.log(
        f"measured: {rates.train_ips:,.0f} training img/s over the trio, {rates.sample_ips:,.0f} "
        f"sampling img/s over the trio, {setup_s:.1f} s of set-up (compile, capture)"
    )
    return rates


def over_budget(budget_s, t0, what):
    spent = time.time() - t0
    if spent > 0.9 * budget_s:
        raise UserError(
            f"--budget-s {budget_s:g}: {what}, {spent:.0f} s spent before training; pass a larger "
            "--budget-s, or take a smaller --preset, --batch or --sample-batch"
        )


def plan_target(budget_s, spent_s, rates, first, last, cost_of_points, batch, models=3):
    """The most iterations in [first, last] (first: the step the trio has reached) whose training
    and whose checkpoints' sampling, at the measured rates, fit 90% of budget_s after the spent_s
    already gone (scoring and saving: the other 10%). cost_of_points(T): the samples that the
    checkpoints to T still need, per model. Refuses, naming the budget that fits, when the sampling
    alone does not."""

    def cost(target):
        training = (target - first) * models * batch / rates.train_ips
        return training + models * cost_of_points(target) / rates.sample_ips

    left = 0.9 * budget_s - spent_s
    sampling = models * cost_of_points(last) / rates.sample_ips
    if sampling > left:
        raise UserError(
            f"--budget-s {budget_s:g}: sampling the checkpoints alone takes about {sampling:.0f} s "
            f"at the measured {rates.sample_ips:,.0f} img/s, after {spent_s:.0f} s spent; pass at "
            f"least --budget-s {1.1 * (spent_s + sampling) / 0.9:.0f}, or fewer --samples or "
            "--checkpoints"
        )
    low, high = first, last  # the largest target whose cost fits (cost grows with the target)
    while low < high:
        mid = (low + high + 1) // 2
        if cost(mid) <= left:
            low = mid
        else:
            high = mid - 1
    return low


def checkpoint_schedule(iters, count):
    """`count` log-spaced iterations ending at iters, each twice the one before (fewer where the
    early ones would round to the same iteration, so never more than log2(iters) + 2); never
    below 1."""
    count = min(count, iters.bit_length() + 1)
    return sorted({max(1, round(iters / 2 ** (count - 1 - k))) for k in range(count)})


def extend_schedule(schedule, target, count):
    """The checkpoints of a trio to `target`: a fresh one's checkpoint_schedule; a resumed one
    keeps its own below target and continues their doubling beyond the last, then ends at target
    (which takes the place of a doubling less than a quarter below it: two samplings so close
    would show nothing new)."""
    if not schedule:
        return checkpoint_schedule(target, count)
    kept, point = [p for p in schedule if p < target], schedule[-1]
    while 2 * point < target:
        point *= 2
        kept.append(point)
    if kept and kept[-1] > schedule[-1] and 4 * kept[-1] > 3 * target:
        kept.pop()
    return kept + [target]


def table1_args(argv):
    p = A.Parser(
        prog="repro_gpu.py table1",
        description="Table 1's CIFAR-10 trio at n = 300 in one command: DDPM (sigma_tn 0) and "
        "Algorithm 1 under the released and the x0 weight, stepped together to log-spaced "
        "checkpoints, sampled (Heun) and scored at each. Other flags go to all three runs "
        "(ambient.py's and `train`'s). SIGINT or SIGTERM saves the trio; --resume continues it.",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="fit the whole command in about this many seconds by training on fewer images than "
        "the paper's 7.68M, planned from the trio's measured speed (default: --iters)",
    )
    p.add_argument(
        "--measure-s",
        type=float,
        default=None,
        help="with --budget-s: seconds of timed training steps when measuring speed, at most "
        f"{MEASURE_MAX_S:g} (default: a 200th of the budget, at most 5)",
    )
    p.add_argument(
        "--sigma-tn", type=float, default=0.4, help="Algorithm 1's sigma_tn (default 0.4)"
    )
    p.add_argument(
        "--samples",
        type=int,
        default=5000,
        help="samples per model and checkpoint (default 5000; the paper: 50,000 at the end)",
    )
    p.add_argument(
        "--checkpoints",
        type=int,
        default=6,
        help="log-spaced checkpoints, each at twice the images of the one before (default 6; "
        "at most log2(iterations) + 2 are distinct)",
    )
    p.add_argument(
        "--judge",
        default=None,
        help="folder of the offline judge (judge.py, "
        "cifar10_judge.pt; ../shared/judge): fd_judge and judge similarity",
    )
    p.add_argument(
        "--ref",
        default=None,
        help="held-out images for fd_judge (default: JUDGE/../data/cifar10_test_png1000.npz)",
    )
    p.add_argument(
        "--out",
        default="runs/table1",
        help="folder for the runs and the report (default runs/table1)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the stopped or finished trio in --out with its settings; a larger --iters "
        "or a --budget-s extends its curve, doubling beyond its last checkpoint",
    )
    args, rest = p.parse_known_args(argv)
    check_table1_args(args, rest)
    return args, rest


def given(rest, dest):
    """Whether ambient's flags `rest` set the setting `dest`, read as argparse reads them (so an
    abbreviation such as --iter counts too)."""
    unset = object()
    parser = A.build_parser(Config)
    parser.set_defaults(**{dest: unset})
    return getattr(parser.parse_known_args(rest)[0], dest) is not unset


def check_table1_args(args, rest):
    """The flags, and whether --out may take the trio, before anything loads."""
    if args.budget_s is not None and not args.budget_s > 0:
        raise UserError(
            f"--budget-s {args.budget_s:g} must be positive: the seconds the whole command "
            "may take, e.g. --budget-s 480"
        )
    if args.measure_s is not None and not 0 < args.measure_s <= MEASURE_MAX_S:
        raise UserError(
            f"--measure-s {args.measure_s:g} must be above 0 and at most {MEASURE_MAX_S:g}"
        )
    for key in ("samples", "checkpoints"):
        if getattr(args, key) < 1:
            raise UserError(f"--{key} {getattr(args, key)} must be at least 1")
    for flag in ("--ambient-weight", "--out"):
        if given(rest, flag[2:].replace("-", "_")):
            raise UserError(f"table1 sets {flag} itself (the trio: DDPM, released, x0); drop it")
    out = Path(args.out)
    if any(p.exists() and not p.is_dir() for p in (out, *out.parents)):
        raise UserError(f"--out {out} is or lies in a file; name a folder for the trio")
    older = (out / "table1.json").exists() or any(next((out / n).glob("*.pt"), 0) for n in TRIO)
    if (out / TRIO_FILE).exists():
        if not args.resume:
            raise UserError(
                f"{out} holds a stopped or finished trio ({TRIO_FILE}); continue it with --resume "
                "(a larger --iters or a --budget-s extends it), or choose another --out"
            )
    elif args.resume:
        why = ", an older table1's, which cannot resume" if older else ""
        raise UserError(f"--resume: no trio to continue in {out} (no {TRIO_FILE}{why}); drop it")
    elif older:
        raise UserError(
            f"{out} holds an older table1's runs (no {TRIO_FILE}); choose another --out"
        )


def trio_config(args, rest):
    """The three runs' common Config, checked: n = 300, the GPU's fast path and a sampling batch of
    its own on CUDA, unless the flags say otherwise."""
    flags = ["--n", "300"] + ([] if given(rest, "data") else ["--data", "cifar"])
    if (
        torch.cuda.is_available()
        and A.pick_device(A.build_parser(Config).parse_args(rest).device).type == "cuda"
    ):
        flags += [] if given(rest, "graph") else ["--graph"]
        flags += [] if given(rest, "sample_batch") else ["--sample-batch", "1024"]
    cfg = Config(**vars(A.build_parser(Config).parse_args(flags + rest)))
    # replace: Config's own checks of each value's type and range
    cfg = dataclasses.replace(cfg, sigma_tn=args.sigma_tn, samples=args.samples)
    cfg.check()
    if cfg.iters < 1:
        raise UserError(f"--iters {cfg.iters}: the trio needs at least one iteration")
    cfg.data_path = str(Path(cfg.data).resolve()) if cfg.data not in ("demo", "cifar") else None
    # a partial batch would compile the network anew
    if cfg.graph and cfg.samples % cfg.sample_batch:
        cfg.samples = args.samples = -(-cfg.samples // cfg.sample_batch) * cfg.sample_batch
        print(
            f"sampling {cfg.samples:,} images per checkpoint: whole batches of {cfg.sample_batch}"
        )
    return cfg


def trio_data(cfg):
    """The dataset and the n-image subset, checked before anything slow; fills cfg.resolution."""
    images, _ = A.load_images(cfg.data, cfg.data_dir)
    A.check_resolution(cfg, images)
    return images, A.choose_subset(len(images), cfg.n, cfg.seed)


def as_judged(x):
    """Images in [-1, 1] (NCHW) as the judge reads them: uint8 NHWC, upsampled (nearest) to 32."""
    x = x.cpu().float()
    x = torch.nn.functional.interpolate(x, size=32, mode="nearest") if x.shape[-1] < 32 else x
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


@dataclass
class Judge:
    """The offline judge (../shared/judge/judge.py) with the features of the training images and of
    the held-out ones computed once: each checkpoint's samples need only their own."""

    module: object
    net: nn.Module
    train: np.ndarray  # the run's training images as the judge reads them
    f_train: np.ndarray
    f_ref: np.ndarray

    def score(self, gen):
        """judge.score(train, gen, ref) from the stored features (test: the same numbers)."""
        j = self.module
        f_gen = j.features(self.net, gen)
        sim, _ = j.nn_cosine(f_gen, self.f_train)
        res = {
            "n_gen": int(len(gen)),
            "n_train": int(len(self.train)),
            "sim_mean": float(sim.mean()),
            "sim_median": float(np.median(sim)),
            **{f"sim>{th}": float((sim > th).mean()) for th in (0.8, 0.9, 0.95)},
            "copy_d1/d2<1/3": float((j.pixel_ratio(gen, self.train) < 1 / 3).mean()),
        }
        res["fd_judge"] = j.frechet(f_gen, self.f_ref)
        return res


def load_judge(args, cfg, device):
    """judge.py's module, its network and held-out uint8 images, or None without --judge; checked up
    front, before anything slow."""
    if args.judge is None:
        return None
    folder = Path(args.judge)
    if not (folder / "judge.py").is_file():
        raise UserError(
            f"--judge {folder}: no judge.py there; pass the folder that holds judge.py "
            "and cifar10_judge.pt (../shared/judge)"
        )
    ref = Path(args.ref or folder.parent / "data" / "cifar10_test_png1000.npz")
    if not ref.is_file():
        raise UserError(f"no held-out images for fd_judge at {ref}; pass --ref FILE.npz")
    import importlib.util

    spec = importlib.util.spec_from_file_location("judge", folder / "judge.py")
    judge = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(judge)
        missing = [f for f in JUDGE_API if not callable(getattr(judge, f, None))]
        net = None if missing else judge.load_judge(device=device)
    except Exception as e:
        raise UserError(
            f"--judge {folder}: cannot load the judge ({type(e).__name__}: {str(e).strip()[:120]})"
        ) from None
    if missing:
        raise UserError(
            f"--judge {folder}: its judge.py has no {missing[0]}() (table1 calls "
            f"{', '.join(JUDGE_API)}); pass the offline judge's folder (../shared/judge)"
        )
    held_out, _ = A.load_images(str(ref))
    return judge, net, as_judged(A.prepare(held_out, cfg.resolution))


def judge_for(loaded, S):
    """A Judge for the training images S (in [-1, 1]), from load_judge's triple."""
    module, net, held_out = loaded
    train = as_judged(S)
    return Judge(module, net, train, module.features(net, train), module.features(net, held_out))


@dataclass
class Member:
    """One of the trio: its method object, training state and folder."""

    name: str
    cfg: Config
    method: Fast
    state: A.TrainState
    folder: Path


def trio_member(name, cfg, S, indices, out, saved=None):
    """Set up as ambient.run sets up a run: the same seed before the network, so the three start
    from the same weights and draw the same batches; or from `saved`, its checkpoint."""
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    method = Fast(A.Algorithm1(cfg), cfg)
    method.use_data(S, saved)
    state = A.training_state(method.network().to(S.device), cfg, S[0].numel(), saved)
    if saved is None:
        (folder / "config.json").write_text(json.dumps(cfg.saved(), indent=1))
        (folder / "indices.json").write_text(json.dumps(indices.tolist()))
    return Member(name, cfg, method, state, folder)


def write_atomic(path, write):
    """write(file object) to path.tmp, then rename: a stop mid-write keeps the previous file."""
    with open(str(path) + ".tmp", "wb") as f:
        write(f)
    os.replace(str(path) + ".tmp", path)


class Trio:
    """The three members stepped together, their record (TRIO_FILE) and the checks of
    ambient.train: a non-finite loss or weights stop the run, naming the step and the model, and
    the last checkpoint is kept."""

    def __init__(self, members, cfg, out, record, stops):
        self.members = members
        self.cfg = cfg
        self.out = out
        self.record = record
        self.stops = stops
        self.device = next(members[0].state.net.parameters()).device
        self.step_fn = None  # built at the first step: trio_step may compile and capture
        self.bad = [torch.zeros((), dtype=torch.long, device=self.device) for _ in members]

    @property
    def step(self):
        return self.members[0].state.step

    def log(self, msg):
        print(msg, flush=True)
        self.quiet(msg)

    def quiet(self, msg):
        """The trio's log.txt; also the sampling's log, so a stop lands between batches."""
        with open(self.out / "log.txt", "a") as f:
            f.write(msg + "\n")
        self.stops.check()

    def advance(self, steps):
        """`steps` steps of the three together; a stop lands after a step and its count."""
        self.step_fn = self.step_fn or trio_step(self.members, self.cfg)
        for _ in range(steps):
            losses = self.step_fn()
            for m in self.members:
                m.state.step += 1
            self.bad = [
                torch.where(torch.isfinite(loss) | (bad > 0), bad, self.step)
                for loss, bad in zip(losses, self.bad, strict=True)
            ]
            self.stops.check()

    def check_finite(self):
        for m, bad in zip(self.members, self.bad, strict=True):
            if bad.item() or not A.weights_finite(m.state.net):
                kept = (
                    f"the trio's last checkpoint, at step {self.record['step']}, is kept"
                    if (self.out / TRIO_FILE).exists()
                    else "no checkpoint had been saved"
                )
                raise UserError(
                    f"{m.name}: training is not finite from step {bad.item() or self.step} on (a "
                    f"finite loss can still give infinite gradients); {kept}. Lower --lr in a new "
                    "--out, or check the data"
                )

    def train_to(self, target, final, rates):
        """Steps to `target`, a progress line at least every PROGRESS_S seconds."""
        t_start, first, shown = time.time(), self.step, time.time()
        while self.step < target:
            self.advance(1)
            if time.time() - shown >= PROGRESS_S:
                self.check_finite()  # also waits for the queued steps: the rate is true
                shown = time.time()
                self.log(progress(self, final, (self.step - first) / (shown - t_start), rates))
        self.check_finite()

    def save(self):
        """Each member's training state (ambient.save_checkpoint: atomic), then the record that
        names the step: a trio resumes only at a step that all three saved."""
        self.check_finite()
        name = f"checkpoint-{self.step * self.cfg.batch:09d}.pt"
        for m in self.members:
            A.save_checkpoint(m.state, m.method, m.cfg, m.folder / name)
        self.record["step"] = self.step
        self.write_record()
        for m in self.members:
            for old in m.folder.glob("checkpoint-*.pt"):
                if old.name != name:
                    old.unlink()

    def write_record(self):
        text = json.dumps(self.record, indent=1).encode()
        write_atomic(self.out / TRIO_FILE, lambda f: f.write(text))


def progress(trio, final, steps_per_s, rates):
    """One line: images seen, the trio's training images/s, and the time left to train (and, with
    measured rates, to sample the checkpoints still ahead)."""
    batch = trio.cfg.batch
    eta = (final - trio.step) / max(steps_per_s, 1e-9)
    ahead = [p for p in trio.record["schedule"] if p > trio.step]
    if rates:
        eta += len(ahead) * 3 * trio.cfg.samples / rates.sample_ips
    return (
        f"{trio.step * batch:,} of {final * batch:,} images per model "
        f"({100 * trio.step * batch / PAPER_IMAGES:.1f}% of the paper's 7.68M), "
        f"{3 * batch * steps_per_s:,.0f} img/s over the trio, eta {eta / 60:.1f} min"
        + ("" if rates else " of training")
    )


def score_samples(samples, S, judged):
    """The pixel metrics eval_memorization.py reports (ambient.py's) and, with a Judge, its fd_judge
    and similarity shares."""
    pixel, _ = A.memorization_report(samples, S)
    scores = dict(
        pixel_cosine_above_0_9=pixel["cosine_above_0.9"],
        pixel_cosine_above_0_95=pixel["cosine_above_0.95"],
        pixel_copy_rate=pixel["copy_rate"],
        roughness_vs_train=A.roughness(samples) / max(A.roughness(S), 1e-12),
    )
    if judged:
        j = judged.score(as_judged(samples))
        scores.update({f"judge_{k}": v for k, v in j.items() if not k.startswith("n_")})
    return scores


def score_checkpoint(trio, judged, S):
    """At a checkpoint: each member's EMA weights and samples kept, the samples scored."""
    images = trio.step * trio.cfg.batch
    row = dict(iters=trio.step, images=images, models={})
    samples = trio_generate(trio.members, trio.cfg.samples, log=trio.quiet)
    for m, x in zip(trio.members, samples, strict=True):
        ema = m.state.ema.state_dict()
        write_atomic(m.folder / f"ema-{images:09d}.pt", functools.partial(torch.save, ema))
        uint8 = ((x + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        write_atomic(
            m.folder / f"samples-{images:09d}.npz", functools.partial(np.savez, images=uint8)
        )
        row["models"][m.name] = score_samples(x, S, judged)
    return row


def trio_settings(cfg, judged):
    """What defines a trio's curves, which a --resume must repeat: ambient.py's same-run settings,
    the data file, the sampling, the precision, and whether the judge scores them."""
    keys = [f.name for f in dataclasses.fields(cfg) if f.metadata.get("same_run")]
    keys += ["samples", "steps", "sampler", "sample_batch", "precision"]
    return {
        **{k: getattr(cfg, k) for k in keys},
        "data": cfg.data_path or cfg.data,
        "judged": judged,
    }


def read_record(out):
    """A trio's TRIO_FILE, checked: settings, schedule, saved step, scored rows."""
    file = out / TRIO_FILE
    fix = "the trio cannot be resumed; start it again in another --out"
    try:
        record = json.loads(file.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise UserError(f"cannot read {file} ({type(e).__name__}); {fix}") from None

    def counts(xs):
        return isinstance(xs, list) and all(type(x) is int and x > 0 for x in xs)

    record = record if isinstance(record, dict) else {}
    rows = record.get("rows")
    ok = (
        isinstance(record.get("settings"), dict)
        and counts(record.get("schedule"))
        and record["schedule"] == sorted(set(record["schedule"]))
        and type(record.get("step")) is int
        and record["step"] >= 0
        and isinstance(rows, list)
        and all(isinstance(r, dict) and r.get("iters") in record["schedule"] for r in rows)
        and all(isinstance(r.get("models"), dict) and set(r["models"]) == set(TRIO) for r in rows)
    )
    if not ok:
        raise UserError(f"{file} is not a trio record that table1 wrote; {fix}")
    return record


def resumed_members(cfg, record, S, indices, out):
    """The three members from their checkpoints at the record's step, read through
    ambient.load_checkpoint (tensors and plain values only, every entry checked)."""
    fix = "the trio cannot be resumed; start it again in another --out"
    name = f"checkpoint-{record['step'] * cfg.batch:09d}.pt"
    members = []
    for member, extra in TRIO.items():
        path = out / member / name
        if not path.is_file():
            raise UserError(f"--resume: {path} is missing; {fix}")
        saved = A.load_checkpoint(path, S.device, A.RESUME_KEYS, fix)
        if saved["step"] != record["step"]:
            raise UserError(f"--resume: {path} holds step {saved['step']}, not its record's; {fix}")
        member_cfg = dataclasses.replace(cfg, **extra)
        members.append(trio_member(member, member_cfg, S, indices, out, saved))
    return members


def open_record(args, cfg, out, judged):
    """A fresh trio's record, or with --resume the saved one, whose settings these flags must
    repeat: a trio's curves never mix two settings."""
    settings = json.loads(json.dumps(trio_settings(cfg, judged)))  # as the record stores them
    if not args.resume:
        return dict(settings=settings, schedule=[], step=0, rows=[], plan=None)
    record = read_record(out)
    saved = record["settings"]
    differ = [k for k in sorted(set(settings) | set(saved)) if settings.get(k) != saved.get(k)]
    if differ:
        listed = ", ".join(f"{k}: {saved.get(k)!r} there, {settings.get(k)!r} here" for k in differ)
        raise UserError(
            f"--resume: the trio in {out} was run with other settings ({listed}); repeat its "
            "flags, or choose another --out"
        )
    return record


def open_trio(args, cfg, record, S, indices, out, stops):
    """The three members, fresh or from their checkpoints, and their Trio."""
    out.mkdir(parents=True, exist_ok=True)
    if args.resume:
        members = resumed_members(cfg, record, S, indices, out)
    else:
        (out / "log.txt").write_text("")
        members = [
            trio_member(name, dataclasses.replace(cfg, **extra), S, indices, out)
            for name, extra in TRIO.items()
        ]
    trio = Trio(members, cfg, out, record, stops)
    if args.resume:
        trio.log(f"resuming the trio in {out} at {trio.step * cfg.batch:,} images per model")
    return trio


def first_target(trio, args, rest):
    """Without --budget-s: --iters, or a resumed trio's own last checkpoint when --iters is not
    given. Refuses a target behind the trio, and a run with nothing left to do."""
    record, cfg = trio.record, trio.cfg
    explicit = given(rest, "iters")
    target = cfg.iters if explicit or not record["schedule"] or args.budget_s else None
    target = record["schedule"][-1] if target is None else target
    done = {r["iters"] for r in record["rows"]}
    if target < trio.step or (target == trio.step and trio.step in done):
        images = trio.step * cfg.batch
        raise UserError(
            f"--resume: the trio in {trio.out} has trained to {images:,} images per model and "
            f"--iters {target} would not extend it; pass --iters above {trio.step}"
            + ("" if args.budget_s else " or a --budget-s")
        )
    return target


def plan(trio, args, target, rates, t0):
    """The checkpoints of this call (the record's schedule) and the plan it reports; with
    --budget-s the target is what fits at the measured rates."""
    record, cfg = trio.record, trio.cfg
    done = {r["iters"] for r in record["rows"]}
    step = trio.step

    def samples_needed(target):
        points = extend_schedule(record["schedule"], target, args.checkpoints)
        return cfg.samples * sum(p >= step and p not in done for p in points)

    if rates:
        spent = time.time() - t0
        target = plan_target(args.budget_s, spent, rates, step, target, samples_needed, cfg.batch)
    schedule = extend_schedule(record["schedule"], target, args.checkpoints)
    passed = [p for p in schedule if p < step and p not in done]
    if passed:  # the measurement's steps went past them: a budget below the measurement's scale
        trio.log(f"note: the measurement trained past {len(passed)} checkpoint(s); skipped")
    if not record["schedule"] and len(schedule) < args.checkpoints:
        trio.log(
            f"--checkpoints {args.checkpoints}: {target} iterations hold {len(schedule)} distinct "
            f"doubling checkpoints; using {len(schedule)}"
        )
    record["schedule"] = [p for p in schedule if p not in passed]
    record["plan"] = dict(
        iters=target,
        images=target * cfg.batch,
        share=target * cfg.batch / PAPER_IMAGES,
        checkpoints_images=[p * cfg.batch for p in record["schedule"]],
        samples=cfg.samples,
        rates=dataclasses.asdict(rates) if rates else None,
        judge=args.judge,
        config=cfg.saved(),
    )
    ahead = [p * cfg.batch for p in record["schedule"] if p >= step and p not in done]
    images = target * cfg.batch
    trio.log(
        f"training {images:,} images per model ({100 * images / PAPER_IMAGES:.2f}% of the "
        f"paper's 7.68M){f', from {step * cfg.batch:,}' if step else ''}, checkpoints at "
        f"{', '.join(f'{i:,}' for i in ahead)} images, {cfg.samples:,} samples each"
    )
    return target


def table1(argv):
    """The command: its signal handlers for as long as it runs, then the ones it found."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # as Ctrl-C, until the trio opens
    try:
        return stoppable_table1(argv, time.time())
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)


def stoppable_table1(argv, t0):
    """Everything is checked before the trio opens; from then on a stop saves it."""
    args, rest = table1_args(argv)
    cfg = trio_config(args, rest)
    images, indices = trio_data(cfg)
    device = A.pick_device(cfg.device)
    check_device(cfg, device, 1)
    loaded = load_judge(args, cfg, device)
    out = Path(args.out)
    record = open_record(args, cfg, out, loaded is not None)
    if device.type == "cuda":  # TF32, as ambient.run
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    S = A.prepare(images[indices], cfg.resolution)
    stops = Stops()
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, stops)
    trio = None
    try:
        trio = open_trio(args, cfg, record, S.to(device), indices, out, stops)
        return run_trio(trio, args, rest, loaded, S, t0)
    except KeyboardInterrupt:
        if trio is None:
            raise
        trio.save()
        again = [a for a in argv if a != "--resume"] + ["--resume"]
        raise Stopped(
            f"stopped (SIGINT or SIGTERM) at {trio.step * cfg.batch:,} images per model, the "
            f"trio saved in {out}; continue it with: python repro_gpu.py table1 "
            + " ".join(map(shlex.quote, again))
        ) from None


def run_trio(trio, args, rest, loaded, S, t0):
    """Measure (with --budget-s), plan, then train to each checkpoint, save, sample and score."""
    record = trio.record
    judged = judge_for(loaded, S) if loaded else None  # the features of the fixed sets, once
    target = first_target(trio, args, rest)
    done = {r["iters"] for r in record["rows"]}
    if trio.step in record["schedule"] and trio.step not in done:  # stopped while it sampled
        add_row(trio, score_checkpoint(trio, judged, S), t0, judged)
    rates = None
    if args.budget_s:
        measure_s = args.measure_s or min(5.0, args.budget_s / 200)
        rates = measure(trio, measure_s, args.budget_s, t0, target - trio.step)
    target = plan(trio, args, target, rates, t0)
    for point in record["schedule"]:
        if point in {r["iters"] for r in record["rows"]}:
            continue
        trio.train_to(point, target, rates)
        trio.save()
        add_row(trio, score_checkpoint(trio, judged, S), t0, judged)
    print((trio.out / "table1.md").read_text())
    return json.loads((trio.out / "table1.json").read_text())


def add_row(trio, row, t0, judged):
    """A checkpoint's scores into the record and the report, and one line."""
    trio.record["rows"] = sorted(trio.record["rows"] + [row], key=lambda r: r["iters"])
    trio.write_record()
    write_report(trio.out, trio.record, time.time() - t0, judged is not None)
    trio.log(
        f"{row['images']:,} images seen: "
        + "; ".join(f"{name} {summary(s)}" for name, s in row["models"].items())
    )


METRICS = [
    ("judge_sim>0.95", "judge: share with similarity > 0.95 (to the n training images)", True),
    ("judge_sim>0.9", "judge: share with similarity > 0.9", True),
    ("judge_fd_judge", "judge: fd_judge against the held-out images (lower is better)", False),
    ("pixel_cosine_above_0_95", "pixels: share with centred cosine > 0.95", True),
    ("pixel_copy_rate", "pixels: copy rate (d1/d2 < 1/3)", True),
    (
        "roughness_vs_train",
        "pixels: roughness against the training images (1 = as the data)",
        False,
    ),
]


def summary(scores):
    if "judge_sim>0.95" in scores:
        return (
            f"judge sim>0.95 {100 * scores['judge_sim>0.95']:.1f}%, "
            f"fd_judge {scores['judge_fd_judge']:.1f}"
        )
    return f"pixel cosine>0.95 {100 * scores['pixel_cosine_above_0_95']:.1f}%"


def copy_key(judged):
    return "judge_sim>0.95" if judged else "pixel_cosine_above_0_95"


def matched_quality(rows, copy, quality="judge_fd_judge"):
    """The trio read at equal quality. DDPM's best (lowest) fd_judge, the images seen there and its
    copy share there (early-stopped DDPM); for each ambient weight, where its fd_judge first
    reaches that value: None if it never does, else (copy share there, the checkpoints' images
    before and after the crossing), the share interpolated linearly in fd_judge between the two
    checkpoints (before is None when the first checkpoint already reaches it)."""
    fd = {n: [r["models"][n][quality] for r in rows] for n in rows[0]["models"]}
    share = {n: [r["models"][n][copy] for r in rows] for n in rows[0]["models"]}
    best = min(range(len(rows)), key=lambda i: fd["ddpm"][i])
    target = fd["ddpm"][best]
    weights = {}
    for name in (n for n in fd if n != "ddpm"):
        i = next((i for i, f in enumerate(fd[name]) if f <= target), None)
        if i is None:
            weights[name] = None
        elif i == 0:
            weights[name] = (share[name][0], None, rows[0]["images"])
        else:
            t = (fd[name][i - 1] - target) / (fd[name][i - 1] - fd[name][i])
            interpolated = share[name][i - 1] + t * (share[name][i] - share[name][i - 1])
            weights[name] = (interpolated, rows[i - 1]["images"], rows[i]["images"])
    return dict(fd=target, images=rows[best]["images"], copy=share["ddpm"][best], weights=weights)


def matched_quality_lines(rows, judged):
    """table1.md's reading at matched quality: one sentence for DDPM, one per ambient weight."""
    if not judged:
        return ["At matched quality: needs fd_judge (--judge DIR); not read.", ""]
    copy = copy_key(judged)
    m = matched_quality(rows, copy)
    lines = [
        f"At matched quality (copy share: judge similarity > 0.95; quality: fd_judge). DDPM's best "
        f"fd_judge is {m['fd']:.2f}, at {m['images']:,} images, where it copies "
        f"{100 * m['copy']:.1f}%: early-stopped DDPM, the baseline the paper leaves out."
        + (
            " It is DDPM's last checkpoint: its quality was still improving, so this reading is "
            "provisional."
            if m["images"] == rows[-1]["images"]
            else ""
        ),
        "",
    ]
    for name, hit in m["weights"].items():
        fd = [r["models"][name]["judge_fd_judge"] for r in rows]
        own = min(range(len(rows)), key=lambda i: fd[i])
        at_best = (
            f"its own best is {fd[own]:.2f} at {rows[own]['images']:,} images, copying "
            f"{100 * rows[own]['models'][name][copy]:.1f}%"
        )
        if hit is None:
            reads = f"never reaches fd_judge {m['fd']:.2f} within the run ({at_best})"
        elif hit[1] is None:
            reads = (
                f"reaches fd_judge {m['fd']:.2f} by its first checkpoint ({hit[2]:,} images), "
                f"copying {100 * hit[0]:.1f}% there ({at_best})"
            )
        else:
            reads = (
                f"first reaches fd_judge {m['fd']:.2f} between {hit[1]:,} and {hit[2]:,} images, "
                f"copying {100 * hit[0]:.1f}% there (linear in fd_judge between the two; {at_best})"
            )
        lines += [f"- {name}: {reads}.", ""]
    return lines


def markdown(plan, rows, judged):
    names = list(rows[0]["models"])
    lines = [
        f"Table 1's CIFAR-10 trio at n = {plan['config']['n']}: {plan['images']:,} images seen per "
        f"model at the end ({100 * plan['share']:.2f}% of the paper's 7.68M), "
        f"{plan['samples']:,} Heun samples per model and checkpoint, the same subset, seed and "
        "batches for the three.",
        "",
    ]
    if not judged:
        lines += ["The judge was skipped (no --judge DIR): pixel metrics only.", ""]
    lines += matched_quality_lines(rows, judged)
    for key, label, percent in METRICS:
        if key not in rows[0]["models"][names[0]]:
            continue
        lines += [
            f"{label}:",
            "",
            "| images seen | " + " | ".join(names) + " |",
            "|---" * (len(names) + 1) + "|",
        ]
        for r in rows:
            cells = [r["models"][n][key] for n in names]
            fmt = [f"{100 * v:.1f}%" if percent else f"{v:.2f}" for v in cells]
            lines.append(f"| {r['images']:,} | " + " | ".join(fmt) + " |")
        lines.append("")
    return "\n".join(lines)


def figure(rows, judged, path):
    """Copy share and fd_judge against images seen, and copy share against fd_judge (matched
    quality: DDPM's best fd_judge dashed); without the judge, the pixel copy share alone."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # a GPU machine's own python may lack it: the tables still come
        path.with_suffix(".png.txt").write_text("no table1.png: matplotlib is not installed\n")
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    seen = [r["images"] for r in rows]
    copy = copy_key(judged)
    for name in rows[0]["models"]:
        shares = [100 * r["models"][name][copy] for r in rows]
        axes[0].plot(seen, shares, "o-", label=name)
        if judged:
            fd = [r["models"][name]["judge_fd_judge"] for r in rows]
            axes[1].plot(seen, fd, "o-", label=name)
            axes[2].plot(fd, shares, "o-", label=name)
    axes[0].set_ylabel(("judge similarity" if judged else "pixel cosine") + " > 0.95 (%)")
    axes[1].set_ylabel("fd_judge (lower is better)")
    axes[2].set_ylabel(axes[0].get_ylabel())
    axes[2].set_xlabel("fd_judge (lower is better), through the checkpoints")
    for ax in axes[:2]:
        ax.set_xscale("log")
        ax.set_xlabel("images seen")
    if judged:
        axes[2].axvline(matched_quality(rows, copy)["fd"], color="grey", ls="--", lw=1)
        axes[2].invert_xaxis()  # better quality to the right, as training goes
    for ax in axes[1:] if not judged else ():
        ax.text(0.5, 0.5, "judge skipped (no --judge)", ha="center", transform=ax.transAxes)
    for ax in axes if judged else axes[:1]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(out, record, wall_s, judged):
    """table1.json, .md and .png, rewritten at each checkpoint: a run cut short keeps them."""
    plan, rows = record["plan"], record["rows"]
    report = dict(plan=plan, checkpoints=rows, wall_s=wall_s, judge_skipped=not judged)
    for name, text in (
        ("table1.json", json.dumps(report, indent=1)),
        ("table1.md", markdown(plan, rows, judged) + f"\nwall time of this call {wall_s:.0f} s\n"),
    ):
        write_atomic(out / name, functools.partial(write_text, text))
    figure(rows, judged, out / "table1.png")


def write_text(text, f):
    f.write(text.encode())


USAGE = """usage: python repro_gpu.py train [ambient.py's flags] [--graph] [--channels-last]
                           [--compile default|cudagraphs] [--precision bf16]
       python repro_gpu.py table1 [--budget-s S] [--judge DIR] [--samples N] [--checkpoints K]
                           [--sigma-tn 0.4] [--out DIR] [--resume] [flags for the three runs]

  train    ambient.py's run with GPU options (`python repro_gpu.py train --help`)
  table1   the n = 300 trio, DDPM and Algorithm 1 under the released and the x0 weight, stepped
           together, as curves of copying and quality against images seen and a reading at
           matched quality (`python repro_gpu.py table1 --help`); a stop saves the trio and
           --resume continues it"""


def main(argv):
    if argv[:1] == ["train"]:
        return train(argv[1:])
    if argv[:1] == ["table1"]:
        try:
            return table1(argv[1:])
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except Stopped as e:
            print(e, file=sys.stderr)
            sys.exit(130)
        except KeyboardInterrupt:
            print(
                "stopped (SIGINT or SIGTERM) before the trio was set up; nothing to save",
                file=sys.stderr,
            )
            sys.exit(130)
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE)
        sys.exit(0)
    print(USAGE, file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
