"""Facts about repro_gpu.py, the GPU speed machinery, checked on the CPU: each option computes what the
plain eager step computes."""
import subprocess
import sys
from pathlib import Path

import torch

import ambient as A
import repro_gpu as G
from test_ambient import TINY, gen, plumbing_data


def test_channels_last_network_computes_the_same_function():
    h, h_nhwc = A.Denoiser(16, "tiny"), G.to_channels_last(A.Denoiser(16, "tiny"))
    with torch.no_grad():
        for p in h.parameters():
            if not p.any():
                p.normal_(std=0.1, generator=gen(38))
    h_nhwc.load_state_dict(h.state_dict())
    assert h_nhwc.net.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    x_t, s = torch.randn(4, 3, 16, 16, generator=gen(39)), torch.full((4,), 0.5)
    assert torch.allclose(h(x_t, s), h_nhwc(x_t, s), atol=1e-5)


def test_bf16_autocast_loss_matches_fp32_to_bf16_precision():
    S, S_tn = plumbing_data(8)
    S = torch.nn.functional.interpolate(S, size=16)
    S_tn = torch.nn.functional.interpolate(S_tn, size=16)
    h = A.Denoiser(16, "tiny")
    torch.nn.init.normal_(h.net.conv_out.weight, std=0.1)  # a non-trivial network output
    b = A.algorithm1_batch(S, S_tn, 0.4, 32, gen(16))
    fp32 = A.algorithm1_loss(h, b).mean()
    with G.autocast(torch.device("cpu"), "bf16"):
        bf16 = A.algorithm1_loss(h, b).mean()
    assert bf16.dtype == torch.float32 and abs(bf16.item() - fp32.item()) < 0.05 * fp32.item()  # 8-bit mantissa


def test_two_process_ddp_step_equals_single_process_step(tmp_path):
    """torchrun with 2 CPU processes (gloo): same global batch, so the same weights as one process."""
    args = TINY + ["--iters", "3", "--sigma-tn", "0.4", "--flip"]
    A.main(args + ["--out", str(tmp_path / "one")])
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--",
                        "repro_gpu.py", "train", *args, "--out", str(tmp_path / "two")], capture_output=True, text=True,
                       cwd=Path(A.__file__).parent, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    one, two = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=False) for d in ("one", "two"))
    assert torch.equal(one["S_tn"], two["S_tn"]) and two["step"] == 3
    assert all(torch.allclose(one["net"][k], two["net"][k], rtol=1e-4, atol=1e-6) for k in one["net"])
