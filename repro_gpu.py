"""GPU speed for ambient.py's runs: mixed precision, channels-last layout, torch.compile and several GPUs.

    python repro_gpu.py train --data cifar --n 300 --sigma-tn 0.4 --compile cudagraphs    # ambient.py's flags and more
    torchrun --nproc_per_node=4 -- repro_gpu.py train --data cifar --n 300 --sigma-tn 0.4

`train` runs ambient.py's own loop (ambient.run, ambient.eager_step) with the method object wrapped:
the wrapper splits each batch over the processes, evaluates the loss through the compiled or
multi-GPU network under autocast, and samples under the same settings. The `--` keeps torchrun from
reading --n as one of its own flags. ambient.py knows nothing of this file.
"""
import contextlib
import os
import shutil
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn

import ambient as A
from ambient import UserError, option


@dataclass
class Config(A.Config):
    precision: str = option("fp32", "bf16: the network under bfloat16 autocast; weights, optimizer and losses stay "
                            "float32", choices=("fp32", "bf16"))
    channels_last: bool = option(False, "NHWC memory layout for the network, as GPU tensor cores read it")
    compile: str = option("none", "torch.compile the network: default fuses its kernels, cudagraphs also replays "
                          "each training step as CUDA graphs (GPU only); sampling compiles without replay",
                          choices=("none", "default", "cudagraphs"))


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
    """torch.compile fuses the network's elementwise work; `cudagraphs` (reduce-overhead) also replays the
    step as CUDA graphs. replay=False (sampling): guidance reads two outputs of one step, and a replay
    would overwrite the first with the second."""
    if mode == "none":
        return module
    return torch.compile(module, mode="reduce-overhead" if mode == "cudagraphs" and replay else "default")


@contextlib.contextmanager
def compile_errors(active):
    """torch.compile builds its kernels on the first call; a machine that cannot gets one line."""
    try:
        yield
    except Exception as e:
        if not active:
            raise
        raise UserError(f"--compile could not build the kernels ({type(e).__name__}: {str(e).strip()[:160]}); "
                        "run without --compile") from e


def to_channels_last(net):
    """NHWC weights, and NHWC inputs to the raw network (only then: a layout copy changes the rounding)."""
    net.to(memory_format=torch.channels_last)
    net.net.register_forward_pre_hook(lambda m, args: (args[0].contiguous(memory_format=torch.channels_last), *args[1:]))
    return net


class Fast:
    """A method object (ambient.Algorithm1 or a baseline) run fast: this process's slice of each batch,
    the loss through the compiled (and DistributedDataParallel) network under autocast."""

    def __init__(self, method, cfg, rank=0, world=1):
        self.method, self.cfg, self.rank, self.world, self.forward = method, cfg, rank, world, None

    def __getattr__(self, name):
        return getattr(self.method, name)

    def network(self):
        net = self.method.network()
        return to_channels_last(net) if self.cfg.channels_last else net

    def batch(self, gen):  # every rank draws the same global batch and keeps its slice: DDP averages the gradients
        b = self.method.batch(gen)
        return b if self.world == 1 else {k: v.chunk(self.world)[self.rank] if torch.is_tensor(v) and v.dim() else v
                                          for k, v in b.items()}

    def loss(self, h_theta, b):
        with autocast(self.S.device, self.cfg.precision):
            return self.method.loss(self.forward, b)

    def generate(self, h_theta, count, log=print):
        with autocast(self.S.device, self.cfg.precision), compile_errors(self.cfg.compile != "none"):
            return self.method.generate(compiled(h_theta, self.cfg.compile, replay=False), count, log)

    def make_step(self, state, method, cfg):
        net = nn.parallel.DistributedDataParallel(state.net) if self.world > 1 else state.net
        self.forward, step, first = compiled(net, cfg.compile), A.eager_step(state, method, cfg), [True]

        def guarded():
            with compile_errors(first.pop() if first else False):
                return step()
        return guarded


def check_device(cfg, device):
    if cfg.compile == "cudagraphs" and device.type != "cuda":
        raise UserError("--compile cudagraphs replays CUDA graphs and needs a CUDA device; use --compile default")
    if cfg.compile != "none" and device.type == "cpu" and not any(map(shutil.which, ("g++", "c++", "clang++"))):
        raise UserError("--compile on CPU builds C++ kernels and no C++ compiler is installed; install g++ or drop "
                        "--compile")


def start(cfg, method_of=A.Algorithm1):
    """ambient.run with the options of this file; under torchrun, one process per GPU."""
    device = A.pick_device(cfg.device)
    check_device(cfg, device)
    rank, world = distributed("nccl" if device.type == "cuda" else "gloo")
    if cfg.batch % world:
        raise UserError(f"--batch {cfg.batch} does not split over {world} processes; use a multiple of {world}")
    if world > 1 and device.type == "cuda":
        cfg.device = f"cuda:{os.environ.get('LOCAL_RANK', rank)}"
    fast = Fast(method_of(cfg), cfg, rank, world)
    out = A.run(cfg, fast, fast.make_step, main_process=rank == 0)
    if world > 1:
        torch.distributed.destroy_process_group()
    return out


def train(argv=None):
    return A.main(argv, Config, start)


if __name__ == "__main__":
    if sys.argv[1:2] != ["train"]:
        sys.exit("usage: python repro_gpu.py train [ambient.py's flags] [--precision bf16] [--channels-last] "
                 "[--compile default|cudagraphs]")
    train(sys.argv[2:])
