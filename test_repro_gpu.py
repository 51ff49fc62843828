"""Facts about repro_gpu.py, the GPU speed machinery, checked on the CPU (and, for the captured step and
sampler, on a GPU where one is present): each option computes what the plain eager step computes."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ambient as A
import repro_gpu as G
from test_ambient import TINY, gen, plumbing_data

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # CI has a CPU; `make gpu-check` runs both


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
    one, two = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in ("one", "two"))
    assert torch.equal(one["S_tn"], two["S_tn"]) and two["step"] == 3
    assert all(torch.allclose(one["net"][k], two["net"][k], rtol=1e-4, atol=1e-6) for k in one["net"])


def graph_ready_pair(lr_rampup, device="cpu"):
    """Two identical tiny Algorithm 1 trainings (method, state, config) on the bundled images."""
    import numpy as np
    pair = []
    for _ in range(2):
        cfg = A.Config(preset="tiny", resolution=8, batch=16, lr=1e-3, lr_rampup=lr_rampup, sigma_tn=1.0, seed=4)
        method = A.Algorithm1(cfg)
        method.use_data(A.prepare(np.load(A.DEMO_FILE)["images"][:16], 8).to(device))
        torch.manual_seed(4)
        pair.append((method, A.training_state(method.network().to(device), cfg, 3 * 8 * 8), cfg))
    return pair


@pytest.mark.parametrize("device", DEVICES)
def test_the_graph_ready_step_trains_as_the_eager_step(device, monkeypatch):
    """The body repro_gpu.py captures as one CUDA graph (a learning rate and an EMA weight that live on the
    device, Adam reading them there, the EMA as foreach arithmetic) gives the weights, the average and the
    optimizer state of ambient.eager_step, step for step, with the warm-up and the EMA's ramp both at work:
    run eagerly on a CPU, captured and replayed (after three warm-up steps) on a GPU."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)  # the same kernels in both runs
    (m1, s1, cfg), (m2, s2, _) = graph_ready_pair(0.0001, device)  # 100 images: the rate rises over 7 steps
    eager, graphed = A.eager_step(s1, m1, cfg), G.graphed_step(s2, m2, cfg)
    for _ in range(20):
        loss1, loss2 = eager(), graphed()
        s1.step += 1
        s2.step += 1
        assert torch.allclose(loss1, loss2, rtol=1e-5)
    for a, b in ((s1.net, s2.net), (s1.ema, s2.ema)):
        assert all(torch.allclose(p, q, rtol=1e-5, atol=1e-7) for p, q in zip(a.parameters(), b.parameters()))
    moved = max((p - q).abs().max() for p, q in zip(s1.net.parameters(), s1.ema.parameters()))
    assert moved > 1e-4  # the average lags the weights by 100 times the tolerance above: the check has power
    state1, state2 = s1.opt.state_dict()["state"], s2.opt.state_dict()["state"]
    assert all(torch.allclose(state1[k]["exp_avg_sq"], state2[k]["exp_avg_sq"], rtol=1e-5, atol=1e-12) for k in state1)


@pytest.mark.parametrize("device", DEVICES)
def test_the_captured_sampler_gives_the_eager_samples(device):
    """On a GPU, graphed_sampler replays one captured Heun integration per full batch with fresh noise
    copied in; it must give what the eager sampler gives from the same seeds, batch after batch."""
    cfg = A.Config(preset="tiny", resolution=8, steps=6, sample_batch=4, seed=9)
    method, h = A.Algorithm1(cfg), A.Denoiser(8, "tiny")
    torch.nn.init.normal_(h.net.conv_out.weight, std=0.1, generator=gen(40))  # a non-trivial network output
    h = h.to(device)
    eager = [method.sample_batch(h, k, range(4 * k, 4 * k + 4)) for k in range(3)]
    replayed = G.graphed_sampler(method, h, 4)
    for k in range(3):
        assert torch.allclose(replayed(k, range(4 * k, 4 * k + 4)), eager[k], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(eager[0], eager[1], atol=0.1)  # the batches differ: a stale input would show


def test_the_budget_scales_iterations_to_fit_training_sampling_and_scoring():
    """Two models share the device: each trains and samples at half the measured rate; scoring gets a tenth."""
    # 1,000 s: 900 left for the pair; 2 x 50,000 samples at 500/s take 200 s; 700 s at 2,000 img/s shared by two
    assert G.iterations_for(1000, 2000, 500, 50_000, 256, 30_000) == int(700 * 2000 / 2 / 256)
    assert G.iterations_for(1e9, 2000, 500, 50_000, 256, 30_000) == 30_000  # never beyond the paper's budget
    assert G.iterations_for(222.5, 2000, 500, 50_000, 256, 30_000) == 1  # 0.25 s left: under one step of the pair
    with pytest.raises(A.UserError, match="at least --budget-s 244"):  # sampling alone needs 200 s of the 90%
        G.iterations_for(220, 2000, 500, 50_000, 256, 30_000)


def test_table1_runs_the_pair_and_scores_it_on_a_cpu(tmp_path, capsys):
    """The whole command at toy size: both runs, their samples, eval_memorization.py's report, wall times."""
    import json
    G.table1(["--data", "demo", "--preset", "tiny", "--resolution", "8", "--batch", "16", "--sample-batch", "8",
              "--samples", "8", "--iters", "2", "--budget-s", "600", "--device", "cpu", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "table1.json").read_text())
    assert report["plan"]["iters"] == 2 and report["plan"]["share"] == 32 / G.PAPER_IMAGES
    assert set(report["scores"]["runs"]) == {"ddpm", "ambient-0.4"} and report["wall_s"]["total"] > 0
    assert "% of the paper's" in capsys.readouterr().out and (tmp_path / "table1.md").is_file()
    for run in ("ddpm", "ambient-0.4"):
        assert json.loads((tmp_path / run / "config.json").read_text())["n"] == 300
