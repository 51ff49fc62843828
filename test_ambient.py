"""Facts about ambient.py: each test checks an identity, a closed form, or behaviour a user relies on.

Run with `make test`. Float64 for the maths, the tiny preset on CPU for the plumbing.
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import norm

import ambient as A

f64 = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def mixture(d=2, seed=0):
    """A 3-component Gaussian mixture in R^d with full covariances (float64)."""
    g = gen(seed)
    L = torch.randn(3, d, d, generator=g, dtype=f64) * 0.3
    covs = L @ L.transpose(1, 2) + 0.05 * torch.eye(d, dtype=f64)
    return A.GaussianMixture(torch.tensor([0.5, 0.3, 0.2], dtype=f64), torch.randn(3, d, generator=g, dtype=f64), covs)


def gaussian(d=2):
    mu, cov = torch.tensor([0.5, -0.3, 0.1][:d], dtype=f64), torch.tensor([[0.3, 0.1, 0.0], [0.1, 0.2, 0.05], [0.0, 0.05, 0.25]], dtype=f64)[:d, :d]
    return A.GaussianMixture(torch.ones(1, dtype=f64), mu[None], cov[None]), mu, cov


def sqrtm(M):
    e, V = torch.linalg.eigh(M)
    return V @ torch.diag(e.sqrt()) @ V.T


# ---------------------------------------------------------------------------------------------
# 1. Noise schedule (Eq. 1) and Algorithm 1 line 10
# ---------------------------------------------------------------------------------------------
def test_vp_schedule_preserves_variance_and_units_round_trip():
    sigma_t = torch.linspace(0, 0.999, 101, dtype=f64)
    assert torch.allclose(A.alpha(sigma_t) ** 2 + sigma_t ** 2, torch.ones_like(sigma_t), atol=1e-14)
    sigma = torch.logspace(-3, 2, 50, dtype=f64)
    assert torch.allclose(A.edm_from_vp(A.vp_from_edm(sigma)), sigma, rtol=1e-10)
    assert torch.allclose(A.vp_from_edm(A.edm_from_vp(sigma_t)), sigma_t, atol=1e-12)
    assert A.vp_from_edm(1.0) == pytest.approx(2 ** -0.5)  # x_0 + n, rescaled by 1/sqrt(2)
    # VP x_t divided by alpha is the EDM-units x_0 + sigma n
    x0, z, s_vp = torch.randn(4, 3, dtype=f64), torch.randn(4, 3, dtype=f64), torch.tensor(0.6, dtype=f64)
    assert torch.allclose(A.add_noise(x0, s_vp, z) / A.alpha(s_vp), x0 + A.edm_from_vp(s_vp) * z)


def test_time_map_is_inverse_and_spans_edm_range():
    t = torch.linspace(0, 1, 33, dtype=f64)
    assert torch.allclose(A.time_at(A.sigma_at(t)), t, atol=1e-12)
    assert A.sigma_at(0.0) == pytest.approx(A.SIGMA_MIN) and A.sigma_at(1.0) == pytest.approx(A.SIGMA_MAX)


@pytest.mark.parametrize("sigma_tn,sigma_t", [(0.1, 0.3), (0.37, 0.8), (0.6, 0.99)])
def test_noise_further_has_eq1_coefficients(sigma_tn, sigma_t):
    s_n, s_t = torch.tensor(sigma_tn, dtype=f64), torch.tensor(sigma_t, dtype=f64)
    one, zero = torch.ones(1, dtype=f64), torch.zeros(1, dtype=f64)
    scale = A.noise_further(one, s_n, s_t, zero)  # coefficient of x_tn
    std = A.noise_further(zero, s_n, s_t, one)  # coefficient of the fresh noise
    # x_t = scale (alpha_n x_0 + sigma_n z1) + std z2 must be alpha_t x_0 + N(0, sigma_t^2)
    assert (scale * A.alpha(s_n)).item() == pytest.approx(A.alpha(s_t).item(), abs=1e-14)
    assert ((scale * s_n) ** 2 + std ** 2).item() == pytest.approx(sigma_t ** 2, abs=1e-14)


# ---------------------------------------------------------------------------------------------
# 2. Network and preconditioning
# ---------------------------------------------------------------------------------------------
def test_fresh_network_is_c_skip_times_edm_input():
    """The output layer starts at zero, so h = c_skip(sigma) x_t / alpha: EDM's preconditioning."""
    h = A.Denoiser(16, "tiny")
    x_t, sigma_t = torch.randn(5, 3, 16, 16), torch.tensor([0.05, 0.2, 0.5, 0.9, 0.999])
    sigma = A.edm_from_vp(sigma_t)
    expected = (A.SIGMA_DATA ** 2 / (sigma ** 2 + A.SIGMA_DATA ** 2) / A.alpha(sigma_t))[:, None, None, None] * x_t
    assert torch.allclose(h(x_t, sigma_t), expected, rtol=1e-5, atol=1e-6)


def test_channels_last_network_computes_the_same_function():
    h, h_nhwc = A.Denoiser(16, "tiny"), A.Denoiser(16, "tiny", channels_last=True)
    with torch.no_grad():
        for p in h.parameters():
            if not p.any():
                p.normal_(std=0.1, generator=gen(38))
    h_nhwc.load_state_dict(h.state_dict())
    assert h_nhwc.net.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    x_t, s = torch.randn(4, 3, 16, 16, generator=gen(39)), torch.full((4,), 0.5)
    assert torch.allclose(h(x_t, s), h_nhwc(x_t, s), atol=1e-5)


def test_preset_sizes_match_the_documented_budget():
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(A.Denoiser(16, "tiny")) <= 1_000_000
    assert 2_000_000 <= count(A.Denoiser(32, "paper")) <= 50_000_000


# ---------------------------------------------------------------------------------------------
# 3. Losses: Lemma C.1, Eq. 6 at sigma_tn = 0, and the ambient minimiser
# ---------------------------------------------------------------------------------------------
def test_ambient_loss_at_zero_sigma_tn_is_ddpm_loss_exactly():
    g = gen(1)
    x0, pred, x_t = (torch.randn(16, 3, 8, 8, generator=g) for _ in range(3))
    sigma_t = torch.rand(16, generator=g) * 0.9 + 0.05
    assert torch.equal(A.ambient_loss(pred, x_t, x0, sigma_t, torch.zeros(16)), A.ddpm_loss(pred, x0))
    assert torch.equal(A.ambient_loss(pred, x_t, x0, sigma_t, 0.0), A.ddpm_loss(pred, x0))
    sigma = A.edm_from_vp(sigma_t)  # and the weight is EDM's lambda
    assert torch.allclose(A.loss_weight(sigma_t, 0.0), (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2)


def test_loss_weight_is_edm_lambda_over_c_h_squared_and_finite_at_t_n():
    s_n = torch.tensor(0.4)
    s_t = torch.tensor([0.4, 0.5, 0.9])  # at t_n exactly, c_h = 0
    c_h, _ = A.ambient_coefficients(s_t, s_n)
    sigma = A.edm_from_vp(s_t)
    w = A.loss_weight(s_t, s_n)
    assert torch.isfinite(w).all()
    assert torch.allclose(w[1:], (sigma[1:] ** 2 + 0.25) / (0.5 * sigma[1:]) ** 2 / c_h[1:] ** 2)


@pytest.mark.parametrize("data", ["gaussian", "mixture"])
def test_lemma_c1_ambient_residual_has_zero_conditional_mean(data):
    """E[c_h E[x_0|x_t] + c_x x_t - x_tn | x_t] = 0: checked against test functions g(x_t)."""
    dist = gaussian()[0] if data == "gaussian" else mixture()
    g, n = gen(2), 200_000
    s_n, s_t = torch.tensor(0.45, dtype=f64), torch.tensor(0.8, dtype=f64)
    x0 = dist.sample(n, g)
    x_tn = A.add_noise(x0, s_n, torch.randn(x0.shape, generator=g, dtype=f64))
    x_t = A.noise_further(x_tn, s_n, s_t, torch.randn(x0.shape, generator=g, dtype=f64))
    c_h, c_x = A.ambient_coefficients(s_t, s_n)
    tests = torch.stack([torch.ones(n, dtype=f64), x_t[:, 0], x_t[:, 1], (x_t[:, 0] > 0).double(), x_t[:, 1].tanh()], 1)

    def z_scores(x0_hat):
        r = c_h * x0_hat + c_x * x_t - x_tn  # (n, d)
        prod = r[:, :, None] * tests[:, None, :]  # (n, d, tests)
        return (prod.mean(0) / (prod.std(0) / n ** 0.5)).abs()

    assert z_scores(dist.denoiser(x_t, s_t)).max() < 5  # the exact E[x_0 | x_t]: zero mean
    wrong = dist.denoiser(x_t, torch.tensor(0.5, dtype=f64))  # the posterior mean at the wrong level
    assert z_scores(wrong).max() > 10  # the check has the power to see a wrong denoiser


def test_ambient_loss_minimiser_is_the_clean_posterior_mean():
    """Noisy data only: least squares on Eq. 6 over linear h recovers E[x_0 | x_t] = A x_t + b."""
    dist, mu, cov = gaussian(3)
    g, n = gen(3), 200_000
    s_n, s_t = torch.tensor(0.5, dtype=f64), torch.tensor(0.8, dtype=f64)
    x_tn = A.add_noise(dist.sample(n, g), s_n, torch.randn(n, 3, generator=g, dtype=f64))  # S_tn, fixed
    x_t = A.noise_further(x_tn, s_n, s_t, torch.randn(n, 3, generator=g, dtype=f64))
    W, b = torch.zeros(3, 3, dtype=f64, requires_grad=True), torch.zeros(3, dtype=f64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = A.ambient_loss(x_t @ W.T + b, x_t, x_tn, s_t, s_n).mean()
        loss.backward()
        return loss

    opt.step(closure)
    a = A.alpha(s_t)
    W_exact = a * cov @ torch.linalg.inv(a ** 2 * cov + s_t ** 2 * torch.eye(3, dtype=f64))
    assert (W.detach() - W_exact).abs().max() < 1e-2
    assert (b.detach() - (mu - a * W_exact @ mu)).abs().max() < 1e-2


def test_eps_and_v_targets_are_eps_and_v_at_zero_sigma_tn():
    g = gen(17)
    x0, eps = torch.randn(8, 5, generator=g, dtype=f64), torch.randn(8, 5, generator=g, dtype=f64)
    s_t = torch.rand(8, generator=g, dtype=f64) * 0.9 + 0.05
    a = A.alpha(s_t)[:, None]
    x_t = a * x0 + s_t[:, None] * eps
    eps_target, v_target = A.ambient_eps_v_targets(x_t, x0, s_t, torch.zeros(8, dtype=f64))
    assert torch.allclose(eps_target, eps) and torch.allclose(v_target, a * eps - s_t[:, None] * x0)


def test_eps_and_v_losses_are_eq6_reweighted_per_noise_level():
    """Lemma C.2 as a loss: for any x_0 prediction, the eps- and v-form errors are Eq. 6's times
    (alpha / (c_h sigma))^2 and 1 / (c_h sigma)^2, per sample. Same minimiser, other weights over t."""
    g = gen(37)
    x_t, x_tn, x0_pred = (torch.randn(16, 5, generator=g, dtype=f64) for _ in range(3))
    s_n = torch.rand(16, generator=g, dtype=f64) * 0.5
    s_t = s_n + (1 - s_n) * (0.05 + 0.9 * torch.rand(16, generator=g, dtype=f64))
    a, c_h = A.alpha(s_t), A.ambient_coefficients(s_t, s_n)[0]
    eps_target, v_target = A.ambient_eps_v_targets(x_t, x_tn, s_t, s_n)
    eps_pred, v_pred = (x_t - a[:, None] * x0_pred) / s_t[:, None], (a[:, None] * x_t - x0_pred) / s_t[:, None]
    eq6 = A.ambient_loss(x0_pred, x_t, x_tn, s_t, s_n)
    assert torch.allclose((eps_pred - eps_target).square().mean(1), (a / (c_h * s_t)) ** 2 * eq6)
    assert torch.allclose((v_pred - v_target).square().mean(1), eq6 / (c_h * s_t) ** 2)


def test_x0_eps_and_v_parametrisations_share_the_ambient_optimum():
    """Lemma C.2 on Gaussian data, noisy copies only: least squares on each target gives the same
    x_0 predictor, the exact E[x_0 | x_t]; the x_0 form is fitted on Eq. 6 itself above."""
    dist, mu, cov = gaussian(3)
    g, n = gen(18), 200_000
    s_n, s_t = torch.tensor(0.5, dtype=f64), torch.tensor(0.8, dtype=f64)
    x_tn = A.add_noise(dist.sample(n, g), s_n, torch.randn(n, 3, generator=g, dtype=f64))
    x_t = A.noise_further(x_tn, s_n, s_t, torch.randn(n, 3, generator=g, dtype=f64))
    eps_target, v_target = A.ambient_eps_v_targets(x_t, x_tn, s_t, s_n)
    design = torch.cat([x_t, torch.ones(n, 1, dtype=f64)], 1)
    a = A.alpha(s_t)
    W_exact = a * cov @ torch.linalg.inv(a ** 2 * cov + s_t ** 2 * torch.eye(3, dtype=f64))
    eye = torch.eye(3, dtype=f64)
    for target, to_x0 in [(eps_target, lambda W: (eye - s_t * W) / a),  # x_0 = (x_t - sigma eps) / alpha
                          (v_target, lambda W: a * eye - s_t * W)]:  # x_0 = alpha x_t - sigma v
        coef = torch.linalg.lstsq(design, target).solution  # (4, 3): [W^T; b]
        W_x0 = to_x0(coef[:3].T)
        assert (W_x0 - W_exact).abs().max() < 1e-2


def test_tweedie_score_from_denoiser_equals_autograd_gradient():
    """Eq. 2: grad log p_t(x_t) = (alpha E[x_0 | x_t] - x_t) / sigma_t^2."""
    dist = mixture(d=3, seed=4)
    x_t = torch.randn(64, 3, generator=gen(5), dtype=f64).requires_grad_()
    sigma_t = torch.rand(64, generator=gen(6), dtype=f64) * 0.9 + 0.05
    (autograd_score,) = torch.autograd.grad(dist.log_density(x_t, sigma_t).sum(), x_t)
    tweedie = (A.alpha(sigma_t)[:, None] * dist.denoiser(x_t.detach(), sigma_t) - x_t.detach()) / sigma_t[:, None] ** 2
    assert torch.allclose(tweedie, autograd_score, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# Closed forms: Lemma 4.1 and Section 2.2 through the sampler
# ---------------------------------------------------------------------------------------------
def test_lemma_4_1_ambient_optimum_ode_lands_on_noisy_copies():
    S = torch.randn(6, 12, generator=gen(7), dtype=f64)
    sigma_tn = 1.0  # EDM units
    S_tn = A.make_noisy_copies(S, A.vp_from_edm(torch.tensor(sigma_tn, dtype=f64)), seed=0)
    h = A.ambient_optimal_denoiser(S_tn, A.vp_from_edm(torch.tensor(sigma_tn, dtype=f64)))
    x = A.sample(h, (32, 12), steps=60, seed=1, sigma_stop=sigma_tn, dtype=f64)
    noisy_points = S_tn / A.alpha(A.vp_from_edm(torch.tensor(sigma_tn, dtype=f64)))  # EDM units
    assert torch.cdist(x, noisy_points).min(1).values.max() < 1e-5  # on a point of S_tn
    assert torch.cdist(x, S).min(1).values.min() > 1.0  # and on none of the clean images


def test_ddpm_empirical_optimum_ode_copies_training_points():
    S = torch.randn(6, 12, generator=gen(8), dtype=f64)
    x = A.sample(A.empirical_denoiser(S), (32, 12), steps=40, seed=2, dtype=f64)
    assert torch.cdist(x, S).min(1).values.max() < 1e-5


# ---------------------------------------------------------------------------------------------
# Sampler
# ---------------------------------------------------------------------------------------------
def test_sampler_grid():
    s = A.sigma_steps(18)
    assert s[0] == pytest.approx(A.SIGMA_MAX) and s[-2] == pytest.approx(A.SIGMA_MIN) and s[-1] == 0
    assert (s[1:] < s[:-1]).all()


@pytest.mark.parametrize("sampler,steps", [("euler", 512), ("heun", 64)])
def test_sampler_reproduces_gaussian_mean_and_covariance(sampler, steps):
    dist, mu, cov = gaussian()
    x = A.sample(dist.denoiser, (20_000, 2), steps=steps, sampler=sampler, seed=4, dtype=f64)
    assert (x.mean(0) - mu).abs().max() < 0.02  # 5 standard errors
    assert (torch.cov(x.T) - cov).abs().max() < 0.02


def test_heun_error_shrinks_faster_than_euler():
    """Against the exact ODE flow of a Gaussian: x_0 = mu + Sigma^1/2 (Sigma + 80^2 I)^-1/2 (x_T - mu)."""
    dist, mu, cov = gaussian()
    x_T = torch.randn(500, 2, generator=gen(3), dtype=f64) * A.SIGMA_MAX
    flow = sqrtm(cov) @ torch.linalg.inv(sqrtm(cov + A.SIGMA_MAX ** 2 * torch.eye(2, dtype=f64)))
    exact = mu + (x_T - mu) @ flow.T
    err = {s: [(A.sample(dist.denoiser, (500, 2), steps=n, sampler=s, seed=3, dtype=f64) - exact).abs().max().item()
               for n in (16, 32, 64)] for s in ("euler", "heun")}
    order = {s: math.log2(e[1] / e[2]) for s, e in err.items()}
    assert 0.8 < order["euler"] < 1.2  # first order
    assert order["heun"] > 1.8  # second order
    assert all(h < e for h, e in zip(err["heun"], err["euler"]))


# ---------------------------------------------------------------------------------------------
# Algorithm 1 plumbing
# ---------------------------------------------------------------------------------------------
def plumbing_data(n=16):
    S = torch.randn(n, 3, 8, 8, generator=gen(9))
    return S, A.make_noisy_copies(S, A.vp_from_edm(torch.tensor(0.4)), seed=0)


def test_algorithm1_branches_keep_their_time_ranges():
    S, S_tn = plumbing_data()
    b = A.algorithm1_batch(S, S_tn, 0.4, 8192, gen(10), "algorithm1")
    sigma, noisy = b["sigma"], b["noisy"]
    assert (sigma[noisy] >= 0.4).all() and (sigma[noisy] <= A.SIGMA_MAX * (1 + 1e-6)).all()  # U(t_n, T)
    assert (sigma[~noisy] <= 0.4 * (1 + 1e-6)).all() and (sigma[~noisy] >= A.SIGMA_MIN * (1 - 1e-6)).all()  # U(0, t_n)
    assert abs(noisy.float().mean().item() - 0.5) < 4 * 0.5 / 8192 ** 0.5  # uniform over S and S_tn
    t = A.time_at(sigma.double())  # and uniform in time within each branch
    t_n = A.time_at(torch.tensor(0.4, dtype=f64))
    assert abs(t[noisy].mean() - (1 + t_n) / 2) < 0.02 and abs(t[~noisy].mean() - t_n / 2) < 0.02


def test_edm_schedule_splits_at_sigma_tn():
    S, S_tn = plumbing_data()
    for sigma_tn in (0.2, 0.4, 2.0):
        b = A.algorithm1_batch(S, S_tn, sigma_tn, 8192, gen(11), "edm")
        assert torch.equal(b["noisy"], b["sigma"] >= sigma_tn)
        expected = 1 - norm.cdf((math.log(sigma_tn) + 1.2) / 1.2)  # P(ln sigma >= ln sigma_tn)
        assert abs(b["noisy"].float().mean().item() - expected) < 4 * 0.5 / 8192 ** 0.5


@pytest.mark.parametrize("schedule", ["algorithm1", "edm"])
def test_sigma_tn_zero_is_plain_ddpm(schedule):
    S, S_tn = plumbing_data()
    b = A.algorithm1_batch(S, S, 0.0, 8192, gen(12), schedule)
    assert not b["noisy"].any()  # every sample clean, the DDPM loss everywhere
    if schedule == "algorithm1":  # over the whole range of t, uniformly
        t = A.time_at(b["sigma"].double())
        assert abs(t.mean().item() - 0.5) < 0.01 and t.max() > 0.99 and t.min() < 0.01


def test_noisy_copies_are_fixed_and_flipped_with_their_image():
    S, S_tn = plumbing_data()
    assert torch.equal(S_tn, A.make_noisy_copies(S, A.vp_from_edm(torch.tensor(0.4)), seed=0))  # line 1 is seeded
    g, flipped = gen(13), []
    for _ in range(20):  # many "epochs": the noisy branch always reads the same x_tn
        b = A.algorithm1_batch(S, S_tn, 0.4, 64, g, "algorithm1", flip=True)
        i = b["idx"]
        same = (b["x_tn"] == S_tn[i]).flatten(1).all(1) & (b["x0"] == S[i]).flatten(1).all(1)
        mirrored = (b["x_tn"] == S_tn[i].flip(-1)).flatten(1).all(1) & (b["x0"] == S[i].flip(-1)).flatten(1).all(1)
        assert (same | mirrored).all()
        flipped.append(mirrored & ~same)
    assert abs(torch.cat(flipped).float().mean().item() - 0.5) < 4 * 0.5 / 1280 ** 0.5  # half are mirrored
    z = (S_tn - A.alpha(A.vp_from_edm(torch.tensor(0.4))) * S) / A.vp_from_edm(torch.tensor(0.4))
    assert abs(z.std().item() - 1) < 0.1  # one draw of N(0, 1) per pixel


@pytest.mark.parametrize("schedule", ["algorithm1", "edm"])
def test_noisy_only_training_never_reads_a_clean_image(schedule):
    """Clean images set to NaN: the Ambient Tweedie baseline's loss and gradients stay finite,
    while Algorithm 1, which does read them below t_n, turns NaN: the check has power."""
    S, S_tn = plumbing_data()
    h = A.Denoiser(8, "tiny")
    torch.nn.init.normal_(h.net.conv_out.weight, std=0.1)
    for noisy_only, finite in ((True, True), (False, False)):
        h.zero_grad()
        b = A.algorithm1_batch(torch.full_like(S, float("nan")), S_tn, 0.4, 64, gen(19), schedule, noisy_only=noisy_only)
        A.algorithm1_loss(h, b).backward()
        grads_finite = all(torch.isfinite(p.grad).all() for p in h.parameters())
        assert grads_finite == finite and bool(b["noisy"].all()) == noisy_only


def test_noisy_only_edm_draws_the_truncated_log_normal():
    S, S_tn = plumbing_data()
    b = A.algorithm1_batch(S, S_tn, 0.4, 20_000, gen(20), "edm", noisy_only=True)
    log_sigma = b["sigma"].double().log()
    a = (math.log(0.4) + 1.2) / 1.2
    expected = -1.2 + 1.2 * norm.pdf(a) / norm.sf(a)  # mean of N(-1.2, 1.2^2) above ln 0.4
    assert (b["sigma"] >= 0.4).all() and abs(log_sigma.mean().item() - expected) < 0.03


def test_noisy_only_runs_from_the_command_line(tmp_path, capsys):
    A.main(TINY + ["--iters", "2", "--method", "noisy-only", "--sigma-tn", "1", "--out", str(tmp_path / "r")])
    samples = np.load(tmp_path / "r" / "samples.npz")["images"]
    assert samples.shape == (8, 16, 16, 3)
    assert "noisy-only needs" in error_of(TINY + ["--method", "noisy-only", "--sigma-tn", "0"], capsys)


def test_class_labels_reach_the_network_and_guidance_mixes_predictions():
    h = A.Denoiser(8, "tiny", num_classes=3)
    with torch.no_grad():  # the zero-initialised layers (residual branches, output) made non-trivial
        for p in h.parameters():
            if not p.any():
                p.normal_(std=0.1, generator=gen(23))
    x_t, s = torch.randn(4, 3, 8, 8, generator=gen(21)), torch.full((4,), 0.7)
    labels, null = torch.tensor([0, 1, 2, 0]), torch.full((4,), 3)
    assert not torch.allclose(h(x_t, s, torch.zeros(4).long()), h(x_t, s, torch.ones(4).long()))
    cond, uncond = h(x_t, s, labels), h(x_t, s, null)
    assert torch.equal(A.conditioned(h, labels, 1.0)(x_t, s), cond)
    assert torch.equal(A.conditioned(h, labels, 0.0)(x_t, s), uncond)
    assert torch.allclose(A.conditioned(h, labels, 2.0)(x_t, s), 2 * cond - uncond, atol=1e-6)
    assert torch.equal(h(x_t, s), uncond)  # no labels = the "no class" label
    one, two = (A.generate(h, 4, steps=4, labels=torch.full((4,), c), log=lambda m: None) for c in (0, 2))
    assert not torch.allclose(one, two)  # the label changes the samples drawn from the same noise


def test_label_dropout_replaces_labels_at_its_rate():
    S, S_tn = plumbing_data()
    labels = torch.arange(16) % 10
    b = A.algorithm1_batch(S, S_tn, 0.4, 20_000, gen(22), labels=labels, null_label=10, label_dropout=0.1)
    dropped = b["labels"] == 10
    assert abs(dropped.float().mean().item() - 0.1) < 4 * (0.1 * 0.9 / 20_000) ** 0.5
    assert torch.equal(b["labels"][~dropped], labels[b["idx"]][~dropped])


def test_class_conditional_run_from_the_command_line(tmp_path, capsys):
    A.main(TINY + ["--iters", "2", "--cond", "class", "--guidance", "2", "--out", str(tmp_path / "r")])
    assert json.loads((tmp_path / "r" / "config.json").read_text())["num_classes"] == 10
    from PIL import Image
    for i in range(2):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / f"{i}.png")
    assert "need class labels" in error_of(["--data", str(tmp_path), "--cond", "class", "--preset", "tiny"], capsys)


def test_masks_are_fixed_per_image_hide_p_of_pixels_and_the_batch_hides_delta_more():
    S, _ = plumbing_data()
    masks = A.make_masks((4000, 3, 8, 8), 0.4, seed=0)
    assert masks.shape == (4000, 1, 8, 8) and torch.equal(masks, A.make_masks((4000, 3, 8, 8), 0.4, seed=0))
    assert abs(1 - masks.mean().item() - 0.4) < 4 * (0.24 / masks.numel()) ** 0.5  # P(missing) = p
    masks, Y = masks[:16], A.observed(S, masks[:16])
    b = A.algorithm1_batch(Y, Y, 0.0, 4096, gen(30), flip=True, masks=masks, mask_delta=0.25)
    i, A_, A_further = b["idx"], b["mask"], b["mask_further"]
    assert ((A_ == masks[i]).flatten(1).all(1) | (A_ == masks[i].flip(-1)).flatten(1).all(1)).all()
    assert torch.equal(b["x0"] * A_, b["x0"])  # the flip moved the mask with its image: x0 is 0 where A is
    assert (A_further <= A_).all() and (b["x_t"][(A_further == 0).expand_as(b["x_t"])] == 0).all()
    dropped = 1 - A_further.sum() / A_.sum()
    assert abs(dropped.item() - 0.25) < 4 * (0.25 * 0.75 / A_.sum().item()) ** 0.5  # P(hidden again) = delta


def test_masking_loss_on_a_linear_model_recovers_the_posterior_mean_only_with_further_corruption():
    """Ambient Diffusion's theorem on Gaussian data in R^3. The model is linear in A_further x_t, with
    its own weights and bias for each of the 8 patterns of A_further; the loss is quadratic, so one
    Newton step from zero (through masking_loss and autograd) is its exact minimiser. With delta > 0
    it matches E[x_0 | A_further x_t, A_further] in closed form on every pixel, hidden ones included.
    With delta = 0 the loss does not depend at all on how a hidden pixel is predicted."""
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
        u, y, m = (mask_further * x_t)[rows], seen_x0[rows][:, None, None], mask[rows][:, None, None]

        def loss(theta):
            return A.masking_loss((u @ theta[:9].reshape(3, 3).T + theta[9:])[:, None, None], y, m).sum()

        zero = torch.zeros(12, dtype=f64)
        H = torch.autograd.functional.hessian(loss, zero)
        theta = -torch.linalg.pinv(H, hermitian=True) @ torch.autograd.functional.jacobian(loss, zero)
        return theta[:9].reshape(3, 3), theta[9:], H

    test = a * mu + torch.randn(50, 3, generator=gen(32), dtype=f64) * 0.5
    for k in range(8):
        W, b, _ = fit(mask * further, k)
        seen = [i for i in range(3) if k & bits[i]]
        want = mu.expand(50, 3).clone()
        if seen:  # Gaussian conditioning on the visible pixels of x_t
            gain = a * cov[:, seen] @ torch.linalg.inv(a ** 2 * cov[seen][:, seen] + s ** 2 * torch.eye(len(seen), dtype=f64))
            want = want + (test[:, seen] - a * mu[seen]) @ gain.T
        got = test * torch.tensor([bool(k & bits[i]) for i in range(3)], dtype=f64) @ W.T + b
        assert (got - want).abs().max() < 0.05  # seeded sampling error: 0.025 at most
    _, _, H = fit(mask, 0b101)  # delta = 0: pattern (1, 0, 1) never puts pixel 1 in the loss
    assert H[[3, 4, 5, 10]].abs().max() == 0 and H[[0, 1, 2, 9]].abs().max() > 0  # W[1, :], b[1] are free


def test_masked_denoiser_can_give_a_hidden_pixel_any_value_at_every_noise_level():
    """With F the raw network's output, D = c_skip x + c_out F where the network sees the pixel and
    sigma_data F where it does not: EDM's c_out -> 0 at low noise would pin hidden pixels near 0."""
    class Constant(torch.nn.Module):  # F = 1 everywhere
        num_classes = 0

        def forward(self, x, c_noise, labels=None):
            return torch.ones(x.shape[0], 3, *x.shape[2:])

    h = A.Denoiser(8, "tiny", mask_input=True)
    h.net = Constant()
    mask = A.make_masks((2, 3, 8, 8), 0.5, seed=5)
    x_t = torch.randn(2, 3, 8, 8, generator=gen(41)) * mask
    for sigma_edm in (0.002, 1.0, 80.0):
        s_t = torch.full((2,), A.vp_from_edm(sigma_edm))
        D, x = h(x_t, s_t, mask=mask), x_t / A.alpha(s_t[0])
        c_skip = A.SIGMA_DATA ** 2 / (sigma_edm ** 2 + A.SIGMA_DATA ** 2)
        c_out = sigma_edm * A.SIGMA_DATA / (sigma_edm ** 2 + A.SIGMA_DATA ** 2) ** 0.5
        seen = (mask > 0).expand_as(D)
        assert torch.allclose(D[seen], (c_skip * x + c_out)[seen], atol=1e-5)
        assert (D[~seen] == A.SIGMA_DATA).all()


def test_masking_batch_feeds_the_network_mask_further_and_scores_every_pixel_of_mask():
    """The wiring of algorithm1_loss: the network gets A_further; the loss reaches every pixel of A,
    weighted lambda(sigma) where A_further shows it and 1/sigma_data^2 where it hides it, and no
    pixel outside A."""
    S, _ = plumbing_data()
    masks = A.make_masks(S.shape, 0.4, seed=4)
    Y = A.observed(S, masks)
    b = A.algorithm1_batch(Y, Y, 0.0, 32, gen(40), masks=masks, mask_delta=0.5)
    pred, given = torch.zeros_like(b["x0"], requires_grad=True), {}

    def h(x_t, sigma_t, labels=None, mask=None):
        given["mask"] = mask
        return pred

    A.algorithm1_loss(h, b).backward()
    assert torch.equal(given["mask"], b["mask_further"])
    weight = pred.grad * pred[0].numel() * len(pred) / (2 * (pred - b["x0"])).detach()  # d loss / d pred = 2 w d / N
    A_, A_further = (b[k].expand_as(pred) > 0 for k in ("mask", "mask_further"))
    lam = A.loss_weight(b["sigma_t"], 0.0)[:, None, None, None].expand_as(pred)
    assert torch.allclose(weight[A_further], lam[A_further], rtol=1e-4)
    assert torch.allclose(weight[A_ & ~A_further], torch.tensor(A.SIGMA_DATA ** -2), rtol=1e-4)
    assert (pred.grad[~A_] == 0).all() and (A_ & ~A_further).any()


def test_masking_training_never_reads_a_hidden_pixel():
    """Hidden pixels set to NaN: through observed(), the data the run trains on, loss and gradients stay
    finite. The same batch built from the raw images turns NaN: the check has power."""
    S, _ = plumbing_data()
    masks = A.make_masks(S.shape, 0.4, seed=1)
    S_nan = torch.where(masks > 0, S, float("nan"))
    h = A.Denoiser(8, "tiny", mask_input=True)
    torch.nn.init.normal_(h.net.conv_out.weight, std=0.1)
    for data, finite in ((A.observed(S_nan, masks), True), (S_nan, False)):
        h.zero_grad()
        b = A.algorithm1_batch(data, data, 0.0, 64, gen(33), "edm", masks=masks, mask_delta=0.1)
        A.algorithm1_loss(h, b).backward()
        assert all(torch.isfinite(p.grad).all() for p in h.parameters()) == finite


def test_fixed_mask_sampler_sees_only_its_pixels_and_the_mask_reaches_the_network():
    h = A.Denoiser(8, "tiny", mask_input=True)
    with torch.no_grad():
        for p in h.parameters():
            if not p.any():
                p.normal_(std=0.1, generator=gen(34))
    mask = A.make_masks((4, 3, 8, 8), 0.5, seed=2)
    x_t, s = torch.randn(4, 3, 8, 8, generator=gen(35)), torch.full((4,), 0.7)
    other = torch.where(mask > 0, x_t, torch.randn(4, 3, 8, 8, generator=gen(36)))  # differs only where hidden
    assert torch.equal(A.conditioned(h, mask=mask)(x_t, s), A.conditioned(h, mask=mask)(other, s))
    assert not torch.allclose(h(x_t * mask, s, mask=mask), h(x_t * mask, s, mask=torch.ones_like(mask)))
    one, two = (A.generate(h, 4, steps=4, mask_keep=0.5, seed=5, log=lambda m: None) for _ in range(2))
    assert torch.equal(one, two) and one.shape == (4, 3, 8, 8)


def test_masking_runs_from_the_command_line(tmp_path, capsys):
    A.main(TINY + ["--iters", "2", "--method", "masking", "--mask-p", "0.4", "--out", str(tmp_path / "r")])
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert (cfg["mask_p"], cfg["mask_delta"], cfg["sigma_tn"]) == (0.4, 0.1, 0.0)
    state = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=False)
    assert torch.equal(state["masks"], A.make_masks((16, 3, 16, 16), 0.4, seed=3))
    assert torch.equal(state["S_tn"], state["S_tn"] * state["masks"])  # the run stored no hidden pixel
    assert np.load(tmp_path / "r" / "samples.npz")["images"].shape == (8, 16, 16, 3)
    for flags, words in ((["--mask-p", "0.4"], "need --method masking"), (["--method", "masking"], "needs --mask-p"),
                         (["--method", "masking", "--mask-p", "0.4", "--sigma-tn", "1"], "drop --sigma-tn"),
                         (["--method", "masking", "--mask-p", "1.5"], "must be in (0, 1)")):
        assert words in error_of(TINY + flags, capsys)


def test_n_per_class_takes_k_images_of_every_class(capsys):
    labels = np.random.default_rng(0).integers(0, 5, 200)
    idx = A.choose_subset(200, None, 7, labels, 3)
    assert (np.bincount(labels[idx], minlength=5) == 3).all() and (np.diff(idx) > 0).all()
    assert np.array_equal(idx, A.choose_subset(200, None, 7, labels, 3))
    assert not np.array_equal(idx, A.choose_subset(200, None, 8, labels, 3))
    assert "has only" in error_of(TINY[:2] + ["--n-per-class", "500", "--preset", "tiny", "--device", "cpu"], capsys)
    assert "not both" in error_of(TINY + ["--n-per-class", "2"], capsys)


# ---------------------------------------------------------------------------------------------
# Training: smoke test, checkpoints, resume, determinism
# ---------------------------------------------------------------------------------------------
TINY = ["--data", "demo", "--n", "16", "--preset", "tiny", "--resolution", "16", "--batch", "8", "--samples", "8",
        "--steps", "4", "--device", "cpu", "--log-every", "1000", "--seed", "3"]


def test_tiny_preset_trains_with_falling_loss_and_checkpoint_reproduces_samples(tmp_path):
    torch.manual_seed(0)
    S = A.prepare(np.load(A.DEMO_FILE)["images"][:16], 16)
    S_tn = A.make_noisy_copies(S, A.vp_from_edm(torch.tensor(0.4)), seed=0)
    h = A.Denoiser(16, "tiny")
    cfg = dict(lr=2e-3, seed=0, iters=40, batch=32, sigma_tn=0.4, schedule="algorithm1", flip=False, preset="tiny",
               log_every=1000, ckpt_every=1000)

    def fixed_batch_losses():  # the same 8 batches (images, noise levels, noise) every time
        g = gen(14)
        with torch.no_grad():
            return torch.tensor([A.algorithm1_loss(h, A.algorithm1_batch(S, S_tn, 0.4, 64, g)).item() for _ in range(8)])

    before = fixed_batch_losses()
    ema = A.train(h, S, S_tn, cfg, tmp_path, log=lambda m: None)
    assert (fixed_batch_losses() < before).all()  # lower on every one of them
    x = A.sample(ema, (4, 3, 16, 16), steps=6, seed=5)
    assert torch.isfinite(x).all() and x.abs().max() < 5  # data in [-1, 1]: no blow-up
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["step"] == 40 and torch.equal(state["S_tn"], S_tn)
    loaded = A.Denoiser(16, "tiny")
    loaded.load_state_dict(state["ema"])
    assert torch.equal(A.sample(loaded, (4, 3, 16, 16), steps=6, seed=5), x)


def test_bf16_autocast_loss_matches_fp32_to_bf16_precision():
    S, S_tn = plumbing_data(8)
    S = torch.nn.functional.interpolate(S, size=16)
    S_tn = torch.nn.functional.interpolate(S_tn, size=16)
    h = A.Denoiser(16, "tiny")
    torch.nn.init.normal_(h.net.conv_out.weight, std=0.1)  # a non-trivial network output
    b = A.algorithm1_batch(S, S_tn, 0.4, 32, gen(16))
    fp32 = A.algorithm1_loss(h, b)
    with torch.autocast("cpu", torch.bfloat16):
        bf16 = A.algorithm1_loss(h, b)
    assert bf16.dtype == torch.float32 and abs(bf16.item() - fp32.item()) < 0.05 * fp32.item()  # 8-bit mantissa


def test_killed_and_resumed_run_equals_uninterrupted_run(tmp_path):
    A.main(TINY + ["--iters", "6", "--out", str(tmp_path / "full")])
    A.main(TINY + ["--iters", "3", "--out", str(tmp_path / "part")])
    A.main(TINY + ["--iters", "6", "--out", str(tmp_path / "part"), "--resume"])
    full, part = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=False) for d in ("full", "part"))
    assert part["step"] == 6 and torch.equal(full["S_tn"], part["S_tn"])
    for key in ("net", "ema"):  # the trained and the averaged weights, bit for bit
        assert all(torch.equal(full[key][k], part[key][k]) for k in full[key])
    assert torch.equal(full["rng"], part["rng"])
    assert all(torch.equal(a, b) for a, b in zip(full["opt"]["state"][0].values(), part["opt"]["state"][0].values()))
    for f in ("config.json", "indices.json", "samples.png", "neighbours.png", "metrics.json", "log.txt", "samples.npz"):
        assert (tmp_path / "full" / f).is_file()
    assert len(json.loads((tmp_path / "full" / "indices.json").read_text())) == 16
    assert not list(tmp_path.glob("*/*.tmp"))  # atomic writes leave no temp files


def test_two_process_ddp_step_equals_single_process_step(tmp_path):
    """torchrun with 2 CPU processes (gloo): same global batch, so the same weights as one process."""
    args = TINY + ["--iters", "3", "--sigma-tn", "0.4", "--flip"]
    A.main(args + ["--out", str(tmp_path / "one")])
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--", "ambient.py",
                        *args, "--out", str(tmp_path / "two")], capture_output=True, text=True, cwd=Path(A.__file__).parent,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    one, two = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=False) for d in ("one", "two"))
    assert torch.equal(one["S_tn"], two["S_tn"]) and two["step"] == 3
    assert all(torch.allclose(one["net"][k], two["net"][k], rtol=1e-4, atol=1e-6) for k in one["net"])


# ---------------------------------------------------------------------------------------------
# Memorization fallback
# ---------------------------------------------------------------------------------------------
def test_planted_copies_are_flagged_and_held_out_images_are_not():
    demo = np.load(A.DEMO_FILE)
    train, held_out = A.prepare(demo["images"][:300]), A.prepare(demo["test_images"])
    planted = [5, 77, 123, 250]
    copies = train[planted] + 0.02 * torch.randn(4, 3, 32, 32, generator=gen(15))
    report, nn_ = A.memorization_report(torch.cat([copies, held_out]), train)
    assert nn_["l2_idx"][:4].tolist() == planted and nn_["cosine_idx"][:4].tolist() == planted
    assert (nn_["cosine"][:4] > 0.95).all() and (nn_["ratio"][:4] < A.COPY_RATIO).all()
    assert (nn_["cosine"][4:] < 0.95).all() and (nn_["ratio"][4:] > A.COPY_RATIO).all()
    assert report["copy_rate"] == pytest.approx(4 / (4 + len(held_out)))


def test_neighbour_grid_is_written(tmp_path):
    from PIL import Image
    x = torch.rand(10, 3, 16, 16) * 2 - 1
    A.save_neighbour_grid(x, x, torch.arange(10), tmp_path / "n.png", pairs=10, per_row=5, upscale=2)
    assert Image.open(tmp_path / "n.png").size[0] == 2 * 5 * (32 + 2) + 2  # 5 pairs a row, 2 px padding


# ---------------------------------------------------------------------------------------------
# Data and command line
# ---------------------------------------------------------------------------------------------
def test_subset_is_seeded_and_loaders_read_npz_and_folders(tmp_path):
    assert np.array_equal(A.choose_subset(800, 300, 0), A.choose_subset(800, 300, 0))
    assert len(set(A.choose_subset(800, 300, 0))) == 300
    from PIL import Image
    imgs = (np.random.default_rng(0).random((3, 8, 8, 3)) * 255).astype(np.uint8)
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(tmp_path / f"{i}.png")
    assert np.array_equal(A.load_images(str(tmp_path)), imgs)
    np.savez(tmp_path / "d.npz", images=imgs, labels=np.arange(3))
    assert np.array_equal(A.load_images(str(tmp_path / "d.npz")), imgs)
    x = A.prepare(imgs)
    assert x.shape == (3, 3, 8, 8) and x.min() >= -1 and x.max() <= 1


def error_of(argv, capsys):
    with pytest.raises(SystemExit) as e:
        A.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and "\n" not in err
    return err


def test_cli_bad_input_gives_one_clear_line(tmp_path, capsys, monkeypatch):
    out = ["--out", str(tmp_path / "r")]
    assert "larger than the dataset" in error_of(TINY + ["--n", "5000"], capsys)
    assert "negative" in error_of(TINY + ["--sigma-tn", "-0.1"], capsys)
    assert "top noise level" in error_of(TINY + ["--sigma-tn", "80"], capsys)
    assert "at least 1" in error_of(TINY + ["--samples", "0"], capsys)
    assert "add --cond class" in error_of(TINY + ["--guidance", "2"], capsys)
    assert "unknown dataset" in error_of(["--data", "imagenet"], capsys)
    (tmp_path / "bad.npz").write_bytes(b"not an archive")
    assert "cannot read" in error_of(["--data", str(tmp_path / "bad.npz")], capsys)
    np.savez(tmp_path / "odd.npz", images=np.zeros((4, 30, 30, 3), np.uint8))
    assert "multiple of 4" in error_of(["--data", str(tmp_path / "odd.npz"), "--preset", "tiny"], capsys)
    A.main(TINY + ["--iters", "1"] + out)
    assert "different config" in error_of(TINY + ["--iters", "1", "--sigma-tn", "1", "--resume"] + out, capsys)
    assert "already holds a run" in error_of(TINY + ["--iters", "1"] + out, capsys)
    import torchvision

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    assert "cifar-10-python.tar.gz" in error_of(["--data", "cifar", "--data-dir", str(tmp_path)], capsys)


def test_cli_error_has_no_traceback_in_a_real_process():
    r = subprocess.run([sys.executable, "ambient.py", "--sigma-tn", "-1"], capture_output=True, text=True,
                       cwd=Path(A.__file__).parent)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1


def test_every_flag_is_explained_in_help():
    for action in A.build_parser()._actions:
        assert action.help and len(action.help) > 10, action.option_strings
