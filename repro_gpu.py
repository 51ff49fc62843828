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

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
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
# the same subset, seed, initialisation and batches, trained in turns on one device to log-spaced
# checkpoints; at each checkpoint each model samples with Heun-40 and is scored, so the report is a
# curve of copying and quality against images seen. --budget-s scales the images seen so that the
# whole command fits; the report says what share of the paper's budget that was.
# ------------------------------------------------------------------------------------------------
PAPER_IMAGES = 30_000 * 256  # the paper: 30k iterations at batch 256
TRIO = {
    "ddpm": dict(sigma_tn=0.0),
    "released": dict(ambient_weight="released"),
    "x0": dict(ambient_weight="x0"),
}


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
    train_ips: float  # one model's training images/s
    sample_ips: float  # one model's sampling images/s (Heun, full batches of cfg.sample_batch)
    setup_s: float  # first step and first sampling batch beyond their timed cost: compile, capture


def measure(cfg, budget_s, train_s=None, log=print):
    """Rates of cfg's options, measured on a stand-in dataset. It says what it measures and for how
    long, and refuses when measuring alone would take more than half of budget_s."""
    device = A.pick_device(cfg.device)
    train_s = train_s or min(5.0, budget_s / 200)
    one, state, method = stand_in_training(cfg, device)
    x, s = method.S[:8], torch.full((8,), 0.5, device=device)
    with torch.no_grad():
        state.net(x, s)  # the first call allocates
        call_s = timed(lambda: state.net(x, s), device) / 8  # one image's forward pass
    fresh = cfg.graph or cfg.compile != "none"  # the first step and batch compile and capture
    step_guess = 3 * call_s * cfg.batch  # forward and backward: about three forward passes
    sampling = (2 * cfg.steps - 1) * call_s * cfg.sample_batch  # Heun's network calls
    training = (7 if device.type == "cuda" else 2) * step_guess + train_s  # warm-up steps and timed
    guess = training + (1 + fresh) * sampling
    log(
        f"measuring speed ({cfg.preset} preset, batch {cfg.batch}, on {device}): training steps "
        f"for about {training:.0f} s and {1 + fresh} sampling batch(es) of "
        f"{cfg.sample_batch}, about {guess:.0f} s in all" + (" plus compilation" if fresh else "")
    )
    if guess > budget_s / 2:
        raise UserError(
            f"measuring speed alone would take about {guess:.0f} s of --budget-s "
            f"{budget_s:g}; raise --budget-s, or take a smaller --preset, --batch or "
            "--sample-batch"
        )
    first_s = timed(one, device)
    for _ in range(5 if device.type == "cuda" else 0):  # the graph's warm-up steps and its capture
        one()
    step_s = timed(one, device)
    steps = max(3, int(train_s / max(step_s, 1e-6)))
    train_ips = steps * cfg.batch / timed(lambda: [one() for _ in range(steps)], device)

    def batch():
        method.generate(state.ema, cfg.sample_batch, log=lambda m: None)

    warm_s = timed(batch, device) if fresh else 0.0
    sample_s = timed(batch, device)
    setup_s = first_s - cfg.batch / train_ips + max(warm_s - sample_s, 0.0) if warm_s else 0.0
    log(
        f"measured: {train_ips:.0f} training img/s, {cfg.sample_batch / sample_s:.0f} sampling "
        f"img/s, {setup_s:.1f} s to set up a model"
    )
    return Rates(train_ips, cfg.sample_batch / sample_s, max(setup_s, 0.0))


def trio_iterations(budget_s, spent_s, rates, samples, checkpoints, batch, max_iters, models=3):
    """Training iterations per model so that the trio is set up, trained, sampled at each checkpoint
    and scored in budget_s seconds, spent_s of which are gone: the models train in turns at the
    measured rate, each sets up once, and scoring is given a tenth of the budget."""
    sampling = models * checkpoints * samples / rates.sample_ips
    fixed = spent_s + models * rates.setup_s + sampling
    left = 0.9 * budget_s - fixed
    if left <= 0:
        raise UserError(
            f"--budget-s {budget_s:g}: setting up and sampling {models} x {checkpoints} x "
            f"{samples:,} images alone take about {fixed:.0f} s at the measured "
            f"{rates.sample_ips:.0f} img/s; pass at least --budget-s "
            f"{1.1 * fixed / 0.9:.0f}, or fewer --samples or --checkpoints"
        )
    return int(max(1, min(max_iters, left * rates.train_ips / models / batch)))


def checkpoint_schedule(iters, count):
    """`count` log-spaced iterations ending at iters, each twice the one before (fewer where the
    early ones would round to the same iteration); never below 1."""
    points = {max(1, round(iters / 2 ** (count - 1 - k))) for k in range(count)}
    return sorted(points)


def table1_args(argv):
    p = argparse.ArgumentParser(
        prog="repro_gpu.py table1",
        description="Table 1's CIFAR-10 trio at n = 300 in one command: DDPM (sigma_tn 0) and "
        "Algorithm 1 under the released and the x0 weight, trained to log-spaced checkpoints, "
        "sampled (Heun) and scored at each. Other flags go to all three runs (ambient.py's and "
        "`train`'s).",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="fit the whole command in about this "
        "many seconds by training on fewer images than the paper's 7.68M (default: the "
        "paper's budget, --iters)",
    )
    p.add_argument(
        "--measure-s",
        type=float,
        default=None,
        help="with --budget-s: seconds of timed "
        "training steps when measuring speed (default: a 200th of the budget, at most 5)",
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
        help="log-spaced checkpoints, each at twice the images of the one before (default 6)",
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
    args, rest = p.parse_known_args(argv)
    if args.budget_s is not None and not args.budget_s > 0:
        raise UserError(
            f"--budget-s {args.budget_s:g} must be positive: the seconds the whole command "
            "may take, e.g. --budget-s 480"
        )
    if args.measure_s is not None and not args.measure_s > 0:
        raise UserError(f"--measure-s {args.measure_s:g} must be positive")
    for key in ("samples", "checkpoints"):
        if getattr(args, key) < 1:
            raise UserError(f"--{key} {getattr(args, key)} must be at least 1")
    if (Path(args.out) / "table1.json").exists():
        raise UserError(
            f"{args.out} already holds a trio's report; choose another --out or remove it"
        )
    for flag in ("--ambient-weight", "--resume", "--out"):
        if any(a == flag or a.startswith(flag + "=") for a in rest):
            raise UserError(f"table1 sets {flag} itself (the trio: DDPM, released, x0); drop it")
    return args, rest


def trio_config(args, rest):
    """The three runs' common Config, checked: n = 300, the GPU's fast path and a sampling batch of
    its own on CUDA, unless the flags say otherwise."""
    flags = ["--n", "300"] + ([] if "--data" in rest else ["--data", "cifar"])
    if (
        torch.cuda.is_available()
        and A.pick_device(A.build_parser(Config).parse_args(rest).device).type == "cuda"
    ):
        flags += [] if "--graph" in rest else ["--graph"]
        flags += [] if "--sample-batch" in rest else ["--sample-batch", "1024"]
    cfg = Config(**vars(A.build_parser(Config).parse_args(flags + rest)))
    cfg.sigma_tn, cfg.samples = args.sigma_tn, args.samples
    cfg.check()
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
        net = judge.load_judge(device=device)
    except Exception as e:
        raise UserError(
            f"--judge {folder}: cannot load the judge ({type(e).__name__}: {str(e).strip()[:120]})"
        ) from None
    held_out, _ = A.load_images(str(ref))
    return judge, net, as_judged(A.prepare(held_out, cfg.resolution))


def judge_for(loaded, S):
    """A Judge for the training images S (in [-1, 1]), from load_judge's triple."""
    module, net, held_out = loaded
    train = as_judged(S)
    return Judge(module, net, train, module.features(net, train), module.features(net, held_out))


@dataclass
class Member:
    """One of the trio: its method object, training state, step and folder."""

    name: str
    cfg: Config
    method: Fast
    state: A.TrainState
    step: object
    folder: Path

    def log(self, msg):
        with open(self.folder / "log.txt", "a") as f:
            f.write(msg + "\n")


def trio_member(name, cfg, S, indices, out):
    """Set up as ambient.run sets up a run: the same seed before the network, so the three start
    from the same weights and draw the same batches."""
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    method = Fast(A.Algorithm1(cfg), cfg)
    method.use_data(S)
    state = A.training_state(method.network().to(S.device), cfg, S[0].numel())
    (folder / "config.json").write_text(json.dumps(cfg.saved(), indent=1))
    (folder / "indices.json").write_text(json.dumps(indices.tolist()))
    return Member(name, cfg, method, state, method.make_step(state, method, cfg), folder)


def train_to(member, iters):
    """Train on to `iters` in ambient.train's loop (its checks, checkpoint.pt); keep the EMA."""
    cfg = dataclasses.replace(member.cfg, iters=iters, log_every=max(1, iters // 4))
    A.train(member.method, member.state, cfg, member.folder, member.log, lambda *a: member.step)
    path = member.folder / f"ema-{iters * cfg.batch:09d}.pt"
    torch.save(member.state.ema.state_dict(), str(path) + ".tmp")
    os.replace(str(path) + ".tmp", path)


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


def sample_and_score(member, iters, judged, S):
    samples = member.method.generate(member.state.ema, member.cfg.samples, log=member.log)
    images = ((samples + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    np.savez(member.folder / f"samples-{iters * member.cfg.batch:09d}.npz", images=images)
    return score_samples(samples, S, judged)


def table1(argv):
    t0 = time.time()
    args, rest = table1_args(argv)
    cfg = trio_config(args, rest)
    images, indices = trio_data(cfg)
    device = A.pick_device(cfg.device)
    check_device(cfg, device, 1)
    judged = load_judge(args, cfg, device)
    S = A.prepare(images[indices], cfg.resolution)
    if args.budget_s:
        rates = measure(cfg, args.budget_s, args.measure_s)
        torch._dynamo.reset()  # the measurement's compiled code is not needed again
        iters = trio_iterations(
            args.budget_s,
            time.time() - t0,
            rates,
            args.samples,
            args.checkpoints,
            cfg.batch,
            cfg.iters,
        )
    else:
        rates, iters = None, cfg.iters
    judged = judge_for(judged, S) if judged else None  # the features of the fixed sets, once
    schedule = checkpoint_schedule(iters, args.checkpoints)
    plan = dict(
        iters=iters,
        images=iters * cfg.batch,
        share=iters * cfg.batch / PAPER_IMAGES,
        checkpoints_images=[k * cfg.batch for k in schedule],
        samples=args.samples,
        rates=dataclasses.asdict(rates) if rates else None,
        judge=args.judge,
        config=cfg.saved(),
    )
    print(
        f"training {plan['images']:,} images per model ({100 * plan['share']:.2f}% of the paper's "
        f"7.68M), checkpoints at {', '.join(f'{i:,}' for i in plan['checkpoints_images'])} images, "
        f"{args.samples:,} samples each",
        flush=True,
    )
    out = Path(args.out)
    members = [
        trio_member(name, dataclasses.replace(cfg, **extra), S.to(device), indices, out)
        for name, extra in TRIO.items()
    ]
    rows = []
    for k in schedule:
        row = dict(iters=k, images=k * cfg.batch, models={})
        for m in members:
            train_to(m, k)
        for m in members:
            row["models"][m.name] = sample_and_score(m, k, judged, S)
        rows.append(row)
        write_report(out, plan, rows, time.time() - t0, judged is not None)
        print(
            f"{row['images']:,} images seen: "
            + "; ".join(f"{name} {summary(s)}" for name, s in row["models"].items()),
            flush=True,
        )
    print((out / "table1.md").read_text())
    return json.loads((out / "table1.json").read_text())


METRICS = [
    ("judge_sim>0.95", "judge: share with similarity > 0.95 (to the 300 training images)", True),
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


def markdown(plan, rows, judged):
    names = list(rows[0]["models"])
    lines = [
        f"Table 1's CIFAR-10 trio at n = 300: {plan['images']:,} images seen per model at the "
        f"end ({100 * plan['share']:.2f}% of the paper's 7.68M), {plan['samples']:,} Heun samples "
        "per model and checkpoint, the same subset, seed and batches for the three.",
        "",
    ]
    if not judged:
        lines += ["The judge was skipped (no --judge DIR): pixel metrics only.", ""]
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
    """Copy share and fd_judge (without the judge: the pixel copy share) against images seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    seen = [r["images"] for r in rows]
    copy_key = "judge_sim>0.95" if judged else "pixel_cosine_above_0_95"
    for name in rows[0]["models"]:
        axes[0].plot(seen, [100 * r["models"][name][copy_key] for r in rows], "o-", label=name)
        if judged:
            axes[1].plot(
                seen, [r["models"][name]["judge_fd_judge"] for r in rows], "o-", label=name
            )
    axes[0].set_ylabel(("judge similarity" if judged else "pixel cosine") + " > 0.95 (%)")
    axes[1].set_ylabel("fd_judge (lower is better)")
    if not judged:
        axes[1].text(
            0.5, 0.5, "judge skipped (no --judge)", ha="center", transform=axes[1].transAxes
        )
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("images seen")
        ax.legend() if judged or ax is axes[0] else None
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(out, plan, rows, wall_s, judged):
    """table1.json, .md and .png, rewritten at each checkpoint: a run cut short keeps them."""
    report = dict(plan=plan, checkpoints=rows, wall_s=wall_s, judge_skipped=not judged)
    for name, text in (
        ("table1.json", json.dumps(report, indent=1)),
        ("table1.md", markdown(plan, rows, judged) + f"\nwall time {wall_s:.0f} s\n"),
    ):
        (out / (name + ".tmp")).write_text(text)
        os.replace(out / (name + ".tmp"), out / name)
    figure(rows, judged, out / "table1.png")


USAGE = """usage: python repro_gpu.py train [ambient.py's flags] [--graph] [--channels-last]
                           [--compile default|cudagraphs] [--precision bf16]
       python repro_gpu.py table1 [--budget-s S] [--judge DIR] [--samples N] [--checkpoints K]
                           [--sigma-tn 0.4] [--out DIR] [flags for the three runs]

  train    ambient.py's run with GPU options (`python repro_gpu.py train --help`)
  table1   the n = 300 trio, DDPM and Algorithm 1 under the released and the x0 weight, as curves
           of copying and quality against images seen (`python repro_gpu.py table1 --help`)"""


def main(argv):
    if argv[:1] == ["train"]:
        return train(argv[1:])
    if argv[:1] == ["table1"]:
        try:
            return table1(argv[1:])
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE)
        sys.exit(0)
    print(USAGE, file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
