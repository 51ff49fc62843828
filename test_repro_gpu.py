"""Facts about repro_gpu.py, the GPU speed machinery, checked on the CPU (and, for the captured step
and sampler, on a GPU where one is present): each option computes what the plain eager step
computes."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import ambient as A
import repro_gpu as G
from test_ambient import TINY, gen, plumbing_data

# CI has a CPU; `make gpu-check` runs both
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def test_channels_last_network_computes_the_same_function():
    h = A.Denoiser(16, "tiny")
    h_nhwc = G.to_channels_last(A.Denoiser(16, "tiny"))
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
    # 8-bit mantissa
    assert bf16.dtype == torch.float32 and abs(bf16.item() - fp32.item()) < 0.05 * fp32.item()


def test_two_process_ddp_step_equals_single_process_step(tmp_path):
    """torchrun with 2 CPU processes (gloo): same global batch, so the same weights as one
    process."""
    args = TINY + ["--iters", "3", "--sigma-tn", "0.4", "--flip"]
    A.main(args + ["--out", str(tmp_path / "one")])
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "--",
            "repro_gpu.py",
            "train",
            *args,
            "--out",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        cwd=Path(A.__file__).parent,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    one, two = (
        torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in ("one", "two")
    )
    assert torch.equal(one["S_tn"], two["S_tn"]) and two["step"] == 3
    assert all(
        torch.allclose(one["net"][k], two["net"][k], rtol=1e-4, atol=1e-6) for k in one["net"]
    )


def graph_ready_pair(lr_rampup, device="cpu"):
    """Two identical tiny Algorithm 1 trainings (method, state, config) on the bundled images."""
    import numpy as np

    pair = []
    for _ in range(2):
        cfg = A.Config(
            preset="tiny",
            resolution=8,
            batch=16,
            lr=1e-3,
            lr_rampup=lr_rampup,
            sigma_tn=1.0,
            seed=4,
        )
        method = A.Algorithm1(cfg)
        method.use_data(A.prepare(np.load(A.DEMO_FILE)["images"][:16], 8).to(device))
        torch.manual_seed(4)
        pair.append((method, A.training_state(method.network().to(device), cfg, 3 * 8 * 8), cfg))
    return pair


@pytest.mark.parametrize("device", DEVICES)
def test_the_graph_ready_step_trains_as_the_eager_step(device, monkeypatch):
    """The body repro_gpu.py captures as one CUDA graph (a learning rate and an EMA weight that live
    on the device, Adam reading them there, the EMA as foreach arithmetic) gives the weights, the
    average and the optimizer state of ambient.eager_step, step for step, with the warm-up and the
    EMA's ramp both at work: run eagerly on a CPU, captured and replayed (after three warm-up steps)
    on a GPU."""
    # the same kernels in both runs
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    # 100 images: the rate rises over 7 steps
    (m1, s1, cfg), (m2, s2, _) = graph_ready_pair(0.0001, device)
    eager = A.eager_step(s1, m1, cfg)
    graphed = G.graphed_step(s2, m2, cfg)
    for _ in range(20):
        loss1 = eager()
        loss2 = graphed()
        s1.step += 1
        s2.step += 1
        assert torch.allclose(loss1, loss2, rtol=1e-5)
    for a, b in ((s1.net, s2.net), (s1.ema, s2.ema)):
        assert all(
            torch.allclose(p, q, rtol=1e-5, atol=1e-7)
            for p, q in zip(a.parameters(), b.parameters(), strict=True)
        )
    moved = max(
        (p - q).abs().max() for p, q in zip(s1.net.parameters(), s1.ema.parameters(), strict=True)
    )
    # the average lags the weights by 100 times the tolerance above: the check has power
    assert moved > 1e-4
    state1, state2 = s1.opt.state_dict()["state"], s2.opt.state_dict()["state"]
    assert all(
        torch.allclose(state1[k]["exp_avg_sq"], state2[k]["exp_avg_sq"], rtol=1e-5, atol=1e-12)
        for k in state1
    )


@pytest.mark.parametrize("device", DEVICES)
def test_the_captured_sampler_gives_the_eager_samples(device):
    """On a GPU, graphed_sampler replays one captured Heun integration per full batch with fresh
    noise copied in; it must give what the eager sampler gives from the same seeds, batch after
    batch."""
    cfg = A.Config(preset="tiny", resolution=8, steps=6, sample_batch=4, seed=9)
    method = A.Algorithm1(cfg)
    h = A.Denoiser(8, "tiny")
    # a non-trivial network output
    torch.nn.init.normal_(h.net.conv_out.weight, std=0.1, generator=gen(40))
    h = h.to(device)
    eager = [method.sample_batch(h, k, range(4 * k, 4 * k + 4)) for k in range(3)]
    replayed = G.graphed_sampler(method, h, 4)
    for k in range(3):
        assert torch.allclose(replayed(k, range(4 * k, 4 * k + 4)), eager[k], rtol=1e-4, atol=1e-4)
    # the batches differ: a stale input would show
    assert not torch.allclose(eager[0], eager[1], atol=0.1)


# CI: a copy of shared/ beside the clone
JUDGE = Path(__file__).resolve().parent.parent / "shared" / "judge"
TRAIN_NPZ = JUDGE.parent / "data" / "cifar10_train_png4000.npz"


def test_the_budget_fits_setup_training_and_sampling_at_every_checkpoint():
    """Three models train in turns at the measured rate, each sets up once, each samples at each
    checkpoint; scoring gets a tenth of the budget."""
    rates = G.Rates(train_ips=3000, sample_ips=500, setup_s=10)
    # 900 s of 1,000; 50 spent, 3 x 10 s setup, 3 x 4 x 5,000 samples at 500/s = 120 s: 700 s left,
    # a third each at 3,000 img/s
    assert G.trio_iterations(1000, 50, rates, 5000, 4, 256, 30_000) == int(700 * 3000 / 3 / 256)
    assert G.trio_iterations(1e9, 0, rates, 5000, 4, 256, 30_000) == 30_000  # the paper's at most
    with pytest.raises(A.UserError, match="at least --budget-s 244"):  # 200 s fixed, over 0.9 * 220
        G.trio_iterations(220, 50, rates, 5000, 4, 256, 30_000)


def test_checkpoints_double_up_to_the_last_iteration():
    assert G.checkpoint_schedule(4096, 6) == [128, 256, 512, 1024, 2048, 4096]
    assert G.checkpoint_schedule(1000, 3) == [250, 500, 1000]
    # 3/32, 3/16, 3/8 round to 0 and are raised to 1
    assert G.checkpoint_schedule(3, 6) == [1, 2, 3]
    assert G.checkpoint_schedule(1, 4) == [1]


def small_judge(tmp_path):
    """judge.py's module and network, 16 training and 8 held-out images as the judge reads them."""
    images = np.load(TRAIN_NPZ)["images"]
    np.savez(tmp_path / "ref.npz", images=images[-8:])
    args = SimpleNamespace(judge=str(JUDGE), ref=str(tmp_path / "ref.npz"))
    module, net, held_out = G.load_judge(args, A.Config(resolution=8), torch.device("cpu"))
    return module, net, held_out, A.prepare(images[:16], 8)


def test_the_judge_with_stored_features_scores_as_judge_score(tmp_path):
    module, net, held_out, S = small_judge(tmp_path)
    judge = G.judge_for((module, net, held_out), S)
    samples = G.as_judged(S[:6] + 0.3 * torch.randn(6, 3, 8, 8, generator=gen(41)))
    assert judge.score(samples) == module.score(G.as_judged(S), samples, held_out, net=net)
    assert G.as_judged(S).shape == (16, 32, 32, 3)  # 8x8 upsampled (nearest) to the judge's 32x32


def test_table1_trains_samples_and_scores_the_trio_at_each_checkpoint(tmp_path, capsys):
    """The whole command at toy size on the CPU, within a budget, the judge included."""
    np.savez(tmp_path / "ref.npz", images=np.load(TRAIN_NPZ)["images"][-8:])
    out = tmp_path / "t1"
    report = G.table1(
        [
            "--data",
            str(TRAIN_NPZ),
            "--n",
            "12",
            "--preset",
            "tiny",
            "--resolution",
            "8",
            "--batch",
            "8",
            "--sample-batch",
            "4",
            "--samples",
            "4",
            "--iters",
            "2",
            "--checkpoints",
            "2",
            "--steps",
            "2",
            "--budget-s",
            "3600",
            "--measure-s",
            "0.1",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--judge",
            str(JUDGE),
            "--ref",
            str(tmp_path / "ref.npz"),
        ]
    )
    printed = capsys.readouterr().out
    assert "measuring speed" in printed and "s in all" in printed
    assert [r["images"] for r in report["checkpoints"]] == [8, 16] and report["plan"]["iters"] == 2
    for r in report["checkpoints"]:
        assert set(r["models"]) == {"ddpm", "released", "x0"}
        assert all(
            np.isfinite(s["judge_fd_judge"]) and 0 <= s["judge_sim>0.95"] <= 1
            for s in r["models"].values()
        )
    configs = {
        m: json.loads((out / m / "config.json").read_text()) for m in ("ddpm", "released", "x0")
    }
    assert (
        configs["ddpm"]["sigma_tn"] == 0
        and configs["x0"]["sigma_tn"] == configs["released"]["sigma_tn"] == 0.4
    )
    assert (configs["released"]["ambient_weight"], configs["x0"]["ambient_weight"]) == (
        "released",
        "x0",
    )
    subsets = {(out / m / "indices.json").read_text() for m in configs}
    assert len(subsets) == 1 and len(json.loads(subsets.pop())) == 12  # one subset for the three
    for m in configs:
        assert torch.load(out / m / "checkpoint.pt", weights_only=False)["step"] == 2
        assert (out / m / "samples-000000008.npz").is_file() and (
            out / m / "ema-000000016.pt"
        ).is_file()
    assert (out / "table1.png").is_file() and "fd_judge" in (out / "table1.md").read_text()


def cli(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        G.main(argv)
    return exit_.value.code, capsys.readouterr()


def test_the_command_line_edges(tmp_path, capsys, monkeypatch):
    code, printed = cli(["--help"], capsys)
    assert (
        code == 0 and "repro_gpu.py train" in printed.out and "repro_gpu.py table1" in printed.out
    )
    monkeypatch.setattr(G, "measure", lambda *a: pytest.fail("measured before checking the input"))
    for budget in ("-1", "0"):
        code, printed = cli(["table1", "--budget-s", budget, "--device", "cpu"], capsys)
        assert code == 2 and printed.err.count("\n") == 1 and "--budget-s" in printed.err
    code, printed = cli(
        ["table1", "--budget-s", "60", "--data", "missing.npz", "--device", "cpu"], capsys
    )
    assert code == 2 and "missing.npz" in printed.err and printed.err.count("\n") == 1
    code, printed = cli(
        ["table1", "--budget-s", "60", "--data", "demo", "--judge", "nowhere"], capsys
    )
    assert code == 2 and "judge.py" in printed.err
    (tmp_path / "table1.json").write_text("{}")  # a finished trio is not overwritten
    code, printed = cli(["table1", "--budget-s", "60", "--out", str(tmp_path)], capsys)
    assert code == 2 and "already holds" in printed.err
    monkeypatch.undo()  # a budget shorter than the measurement: refused before a training step
    code, printed = cli(
        [
            "table1",
            "--budget-s",
            "0.01",
            "--data",
            "demo",
            "--device",
            "cpu",
            "--preset",
            "tiny",
            "--resolution",
            "8",
            "--out",
            str(tmp_path / "t"),
        ],
        capsys,
    )
    assert code == 2 and "measuring speed alone would take" in printed.err


def trio_members(device, graph, precision="fp32"):
    """Three tiny members as table1's trio is made of (DDPM, the released and the x0 weight), each
    with a seed and a learning rate of its own, so that a member given another's batch, generator,
    rate or EMA ends elsewhere; the EMA's output layer made non-trivial, for the samples."""
    members = []
    trio = (dict(sigma_tn=0.0), dict(), dict(ambient_weight="x0"))
    for seed, extra in zip((4, 5, 6), trio, strict=True):
        settings = {**dict(sigma_tn=1.0, lr=1e-3 * seed / 4, lr_rampup=0.0001, seed=seed), **extra}
        speed = dict(graph=graph, precision=precision)
        cfg = G.Config(
            preset="tiny", resolution=8, batch=8, steps=3, sample_batch=4, **speed, **settings
        )
        method = G.Fast(A.Algorithm1(cfg), cfg)
        method.use_data(A.prepare(np.load(A.DEMO_FILE)["images"][:16], 8).to(device))
        torch.manual_seed(seed)
        state = A.training_state(method.network().to(device), cfg, 3 * 8 * 8)
        torch.nn.init.normal_(state.ema.net.conv_out.weight, std=0.1, generator=gen(seed))
        members.append(SimpleNamespace(cfg=cfg, method=method, state=state))
    return members


def tensors_of(state):
    """A member's weights, EMA and Adam state, as one list."""
    opt = state.opt.state_dict()["state"]
    adam = [t for k in sorted(opt) for t in opt[k].values()]
    return [*state.net.parameters(), *state.ema.parameters(), *adam]


@pytest.mark.parametrize("device", DEVICES)
def test_the_trio_stepped_together_in_one_graph_trains_each_as_alone(device, monkeypatch):
    """trio_step with --graph leaves each member's weights, EMA and Adam state where the member's
    own captured step (graphed_step, itself tested against ambient.eager_step above) leaves them
    when it trains alone: over the warm-up, the capture and a replay on a GPU, with the learning
    rate's warm-up and the EMA's ramp at work. On a CPU the same arithmetic runs in the same order:
    equal bit for bit; on a GPU the three run on concurrent streams of one graph: rtol 1e-5, as
    the one-model graph test."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    together, alone = trio_members(device, graph=True), trio_members(device, graph=True)
    step = G.trio_step(together, together[0].cfg)
    own = [m.method.make_step(m.state, m.method, m.cfg) for m in alone]
    for _ in range(5):  # on a GPU: three warm-up steps, the capture and its replay, a replay
        losses = step()
        for m, one, loss in zip(alone, own, losses, strict=True):
            assert torch.allclose(one(), loss, rtol=1e-5)
            m.state.step += 1
        for m in together:
            m.state.step += 1
    for a, b in zip(together, alone, strict=True):
        pairs = list(zip(tensors_of(a.state), tensors_of(b.state), strict=True))
        if device == "cpu":
            assert all(torch.equal(p, q) for p, q in pairs)
        else:
            assert all(torch.allclose(p, q, rtol=1e-5, atol=1e-7) for p, q in pairs)
    # the members differ from each other: a member that took another's step would show
    first, second = (tensors_of(m.state)[0] for m in together[:2])
    assert not torch.allclose(first, second, atol=1e-3)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("device", DEVICES)
def test_the_trio_captured_sampler_gives_each_members_samples(device, precision):
    """trio_generate with --graph (the three EMAs' Heun integrations in one graph on a GPU, in turn
    on a CPU) gives each member the samples its own method.generate gives, full batches and the
    last, partial one: on a CPU bit for bit, on a GPU within 1e-4 (fp32; 1e-2 under bf16). In fp32
    those are the plain eager sampler's (ambient.Algorithm1.generate); under bf16 they are not,
    which shows that autocast is at work."""
    members = trio_members(device, graph=True, precision=precision)
    together = G.trio_generate(members, 6, log=lambda m: None)  # batches of 4 and 2
    tol = dict(rtol=1e-4, atol=1e-4) if precision == "fp32" else dict(rtol=1e-2, atol=1e-2)

    def same(a, b):
        return torch.equal(a, b) if device == "cpu" else torch.allclose(a, b, **tol)

    for m, samples in zip(members, together, strict=True):
        assert samples.shape == (6, 3, 8, 8)
        assert same(samples, m.method.generate(m.state.ema, 6, log=lambda m: None))
        eager = m.method.method.generate(m.state.ema, 6, log=lambda m: None)
        assert same(samples, eager) if precision == "fp32" else not torch.equal(samples, eager)
    # the members' samples differ: one given another's EMA or noise would show
    assert not torch.allclose(together[0], together[1], atol=0.1)
