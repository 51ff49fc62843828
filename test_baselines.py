"""Facts about baselines.py, Table 2's baselines: noisy-only training (Ambient Tweedie) and masking
(Ambient Diffusion). Each test checks an identity, a closed form, or behaviour a user relies on."""

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

import ambient as A
import baselines as B
import eval_memorization as E
from test_ambient import TINY, error_of, f64, gaussian, gen, plumbing_data


def with_data(method, **data):
    """A method object holding the data the loop gives it (set directly, as use_data would)."""
    for k, v in data.items():
        setattr(method, k, v)
    return method


def masking(Y, masks, **cfg):
    """The masking method on observed images Y = A x_0 with their masks A."""
    return with_data(
        B.Masking(B.Config(**{"method": "masking", "mask_p": 0.4, "sigma_tn": 0.0, **cfg})),
        S=Y,
        S_tn=Y,
        masks=masks,
    )


@pytest.mark.parametrize("schedule", ["algorithm1", "edm"])
def test_noisy_only_training_never_reads_a_clean_image(schedule):
    """Clean images set to NaN: the Ambient Tweedie baseline's loss and gradients stay finite,
    while Algorithm 1, which does read them below t_n, turns NaN: the check has power."""
    S, S_tn = plumbing_data()
    h = A.Denoiser(8, "tiny")
    torch.nn.init.normal_(h.net.conv_out.weight, std=0.1)
    for kind, finite in ((B.NoisyOnly, True), (A.Algorithm1, False)):
        h.zero_grad()
        m = with_data(
            kind(B.Config(method="noisy-only", sigma_tn=0.4, batch=64, schedule=schedule)),
            S=torch.full_like(S, float("nan")),
            S_tn=S_tn,
        )
        b = m.batch(gen(19))
        m.loss(h, b).mean().backward()
        grads_finite = all(torch.isfinite(p.grad).all() for p in h.parameters())
        assert grads_finite == finite and bool(b["noisy"].all()) == (kind is B.NoisyOnly)
    m = B.NoisyOnly(B.Config(method="noisy-only", sigma_tn=0.4, seed=0))
    m.use_data(S)
    # what the run hands the loop: the noisy copies alone
    assert m.S is m.S_tn and not torch.equal(m.S, S)


def test_noisy_only_edm_draws_the_truncated_log_normal():
    S, S_tn = plumbing_data()
    sigma, noisy = B.noisy_only_levels(20_000, 0.4, "edm", gen(20), "cpu")
    b = dict(sigma=sigma)
    log_sigma = b["sigma"].double().log()
    a = (math.log(0.4) + 1.2) / 1.2
    expected = -1.2 + 1.2 * norm.pdf(a) / norm.sf(a)  # mean of N(-1.2, 1.2^2) above ln 0.4
    assert (b["sigma"] >= 0.4).all() and abs(log_sigma.mean().item() - expected) < 0.03


def test_noisy_only_runs_from_the_command_line(tmp_path, capsys):
    B.main(
        TINY
        + [
            "--iters",
            "2",
            "--method",
            "noisy-only",
            "--sigma-tn",
            "1",
            "--out",
            str(tmp_path / "r"),
        ]
    )
    samples = np.load(tmp_path / "r" / "samples.npz")["images"]
    assert samples.shape == (8, 16, 16, 3)
    assert "noisy-only needs" in error_of(
        TINY + ["--method", "noisy-only", "--sigma-tn", "0"], capsys, B.main
    )
    # what eval_memorization.py regenerates with
    assert type(E.method_of_run(tmp_path / "r")) is B.NoisyOnly
    resume = TINY + ["--iters", "3", "--sigma-tn", "1", "--resume", "--out", str(tmp_path / "r")]
    # not Algorithm 1 on S
    assert "method: 'noisy-only' there, 'algorithm1' here" in error_of(resume, capsys)


def test_masks_are_fixed_per_image_hide_p_of_pixels_and_the_batch_hides_delta_more():
    S, _ = plumbing_data()
    masks = B.make_masks((4000, 3, 8, 8), 0.4, seed=0)
    assert masks.shape == (4000, 1, 8, 8) and torch.equal(
        masks, B.make_masks((4000, 3, 8, 8), 0.4, seed=0)
    )
    assert abs(1 - masks.mean().item() - 0.4) < 4 * (0.24 / masks.numel()) ** 0.5  # P(missing) = p
    masks, Y = masks[:16], B.observed(S, masks[:16])
    b = masking(Y, masks, mask_delta=0.25, batch=4096, flip=True).batch(gen(30))
    i, A_, A_further = b["idx"], b["mask"], b["mask_further"]
    assert ((A_ == masks[i]).flatten(1).all(1) | (A_ == masks[i].flip(-1)).flatten(1).all(1)).all()
    # the flip moved the mask with its image: x0 is 0 where A is
    assert torch.equal(b["x0"] * A_, b["x0"])
    assert (A_further <= A_).all() and (b["x_t"][(A_further == 0).expand_as(b["x_t"])] == 0).all()
    dropped = 1 - A_further.sum() / A_.sum()
    # P(hidden again) = delta
    assert abs(dropped.item() - 0.25) < 4 * (0.25 * 0.75 / A_.sum().item()) ** 0.5


def test_masking_loss_on_a_linear_model_recovers_the_posterior_mean_only_with_further_corruption():
    """Ambient Diffusion's theorem on Gaussian data in R^3. The model is linear in A_further x_t,
    with its own weights and bias for each of the 8 patterns of A_further; the loss is quadratic, so
    one Newton step from zero (through masking_loss and autograd) is its exact minimiser. With
    delta > 0 it matches E[x_0 | A_further x_t, A_further] in closed form on every pixel, hidden
    ones included. With delta = 0 the loss does not depend at all on how a hidden pixel is
    predicted."""
    _, mu, cov = gaussian(3)
    s, a, n, p = 0.6, 0.8, 200_000, 0.3
    g = gen(31)
    x0 = mu + torch.randn(n, 3, generator=g, dtype=f64) @ torch.linalg.cholesky(cov).T
    x_t = a * x0 + s * torch.randn(n, 3, generator=g, dtype=f64)
    mask = (torch.rand(n, 3, generator=g, dtype=f64) >= p).to(f64)
    further = (torch.rand(n, 3, generator=g, dtype=f64) >= 0.3).to(f64)
    seen_x0 = torch.where(mask > 0, x0, float("nan"))  # what the data holds: nothing where A is 0
    bits = torch.tensor([4, 2, 1])

    def fit(mask_further, k):  # (W, b) for pattern k, and the loss's Hessian in them
        rows = (mask_further.long() * bits).sum(1) == k
        u, y, m = (
            (mask_further * x_t)[rows],
            seen_x0[rows][:, None, None],
            mask[rows][:, None, None],
        )

        def loss(theta):
            return B.masking_loss(
                (u @ theta[:9].reshape(3, 3).T + theta[9:])[:, None, None], y, m
            ).sum()

        zero = torch.zeros(12, dtype=f64)
        H = torch.autograd.functional.hessian(loss, zero)
        theta = -torch.linalg.pinv(H, hermitian=True) @ torch.autograd.functional.jacobian(
            loss, zero
        )
        return theta[:9].reshape(3, 3), theta[9:], H

    test = a * mu + torch.randn(50, 3, generator=gen(32), dtype=f64) * 0.5
    for k in range(8):
        W, b, _ = fit(mask * further, k)
        seen = [i for i in range(3) if k & bits[i]]
        want = mu.expand(50, 3).clone()
        if seen:  # Gaussian conditioning on the visible pixels of x_t
            gain = (
                a
                * cov[:, seen]
                @ torch.linalg.inv(
                    a**2 * cov[seen][:, seen] + s**2 * torch.eye(len(seen), dtype=f64)
                )
            )
            want = want + (test[:, seen] - a * mu[seen]) @ gain.T
        got = test * torch.tensor([bool(k & bits[i]) for i in range(3)], dtype=f64) @ W.T + b
        assert (got - want).abs().max() < 0.05  # seeded sampling error: 0.025 at most
    _, _, H = fit(mask, 0b101)  # delta = 0: pattern (1, 0, 1) never puts pixel 1 in the loss
    # W[1, :], b[1] are free
    assert H[[3, 4, 5, 10]].abs().max() == 0 and H[[0, 1, 2, 9]].abs().max() > 0


def test_masked_denoiser_can_give_a_hidden_pixel_any_value_at_every_noise_level():
    """With F the raw network's output, D = c_skip x + c_out F where the network sees the pixel and
    sigma_data F where it does not: EDM's c_out -> 0 at low noise would pin hidden pixels near 0."""

    class Constant(torch.nn.Module):  # F = 1 everywhere
        def forward(self, x, c_noise, extra=None):
            return torch.ones(x.shape[0], 3, *x.shape[2:])

    h = B.MaskedDenoiser(8, "tiny")
    h.net = Constant()
    mask = B.make_masks((2, 3, 8, 8), 0.5, seed=5)
    x_t = torch.randn(2, 3, 8, 8, generator=gen(41)) * mask
    for sigma_edm in (0.002, 1.0, 80.0):
        s_t = torch.full((2,), A.vp_from_edm(sigma_edm))
        D, x = h(x_t, s_t, mask=mask), x_t / A.alpha(s_t[0])
        c_skip = A.SIGMA_DATA**2 / (sigma_edm**2 + A.SIGMA_DATA**2)
        c_out = sigma_edm * A.SIGMA_DATA / (sigma_edm**2 + A.SIGMA_DATA**2) ** 0.5
        seen = (mask > 0).expand_as(D)
        assert torch.allclose(D[seen], (c_skip * x + c_out)[seen], atol=1e-5)
        assert (D[~seen] == A.SIGMA_DATA).all()


def test_masking_batch_feeds_the_network_mask_further_and_scores_every_pixel_of_mask():
    """The wiring of algorithm1_loss: the network gets A_further; the loss reaches every pixel of A,
    weighted lambda(sigma) where A_further shows it and 1/sigma_data^2 where it hides it, and no
    pixel outside A."""
    S, _ = plumbing_data()
    masks = B.make_masks(S.shape, 0.4, seed=4)
    m = masking(B.observed(S, masks), masks, mask_delta=0.5, batch=32)
    b = m.batch(gen(40))
    pred, given = torch.zeros_like(b["x0"], requires_grad=True), {}

    def h(x_t, sigma_t, mask=None):
        given["mask"] = mask
        return pred

    m.loss(h, b).mean().backward()
    assert torch.equal(given["mask"], b["mask_further"])
    # d loss / d pred = 2 w d / N
    weight = pred.grad * pred[0].numel() * len(pred) / (2 * (pred - b["x0"])).detach()
    A_, A_further = (b[k].expand_as(pred) > 0 for k in ("mask", "mask_further"))
    lam = A.loss_weight(b["sigma_t"], 0.0)[:, None, None, None].expand_as(pred)
    assert torch.allclose(weight[A_further], lam[A_further], rtol=1e-4)
    assert torch.allclose(weight[A_ & ~A_further], torch.tensor(A.SIGMA_DATA**-2), rtol=1e-4)
    assert (pred.grad[~A_] == 0).all() and (A_ & ~A_further).any()


def test_masking_training_never_reads_a_hidden_pixel():
    """Hidden pixels set to NaN: through observed(), the data the run trains on, loss and gradients
    stay finite. The same batch built from the raw images turns NaN: the check has power."""
    S, _ = plumbing_data()
    masks = B.make_masks(S.shape, 0.4, seed=1)
    S_nan = torch.where(masks > 0, S, float("nan"))
    h = B.MaskedDenoiser(8, "tiny")
    torch.nn.init.normal_(h.net.conv_out.weight, std=0.1)
    for data, finite in ((B.observed(S_nan, masks), True), (S_nan, False)):
        h.zero_grad()
        m = masking(data, masks, mask_delta=0.1, batch=64)
        m.loss(h, m.batch(gen(33))).mean().backward()
        assert all(torch.isfinite(p.grad).all() for p in h.parameters()) == finite


def test_fixed_mask_sampler_sees_only_its_pixels_and_the_mask_reaches_the_network():
    h = B.MaskedDenoiser(8, "tiny")
    with torch.no_grad():
        for p in h.parameters():
            if not p.any():
                p.normal_(std=0.1, generator=gen(34))
    mask = B.make_masks((4, 3, 8, 8), 0.5, seed=2)
    x_t, s = torch.randn(4, 3, 8, 8, generator=gen(35)), torch.full((4,), 0.7)
    # differs only where hidden
    other = torch.where(mask > 0, x_t, torch.randn(4, 3, 8, 8, generator=gen(36)))
    assert torch.equal(B.with_mask(h, mask)(x_t, s), B.with_mask(h, mask)(other, s))
    assert not torch.allclose(
        h(x_t * mask, s, mask=mask), h(x_t * mask, s, mask=torch.ones_like(mask))
    )
    # keeps half
    sampler = B.Masking(B.Config(method="masking", mask_p=0.5, mask_delta=0.0, steps=4, seed=5))
    one, two = (sampler.generate(h, 4, log=lambda m: None) for _ in range(2))
    assert torch.equal(one, two) and one.shape == (4, 3, 8, 8)


def test_masking_runs_from_the_command_line(tmp_path, capsys):
    B.main(
        TINY
        + ["--iters", "2", "--method", "masking", "--mask-p", "0.4", "--out", str(tmp_path / "r")]
    )
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert (cfg["mask_p"], cfg["mask_delta"], cfg["sigma_tn"]) == (0.4, 0.1, 0.0)
    state = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert torch.equal(state["masks"], B.make_masks((16, 3, 16, 16), 0.4, seed=3))
    # the run stored no hidden pixel
    assert torch.equal(state["S_tn"], state["S_tn"] * state["masks"])
    assert np.load(tmp_path / "r" / "samples.npz")["images"].shape == (8, 16, 16, 3)
    assert type(E.method_of_run(tmp_path / "r")) is B.Masking
    resume = TINY + ["--iters", "3", "--sigma-tn", "0", "--resume", "--out", str(tmp_path / "r")]
    assert "method: 'masking' there, 'algorithm1' here" in error_of(resume, capsys)
    for flags, words in (
        (["--method", "noisy-only", "--mask-p", "0.4"], "need --method masking"),
        (["--method", "masking"], "needs --mask-p"),
        ([], "pass --method noisy-only"),
        (["--method", "masking", "--mask-p", "0.4", "--sigma-tn", "1"], "drop --sigma-tn"),
        (["--method", "masking", "--mask-p", "1.5"], "must be in (0, 1)"),
    ):
        assert words in error_of(TINY + flags, capsys, B.main)
