"""Facts about ambient.py: each test checks an identity, a closed form, or behaviour users rely on.

Run with `make test`. Float64 for the maths, the tiny preset on CPU for the plumbing.
"""

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import norm

import ambient as A
import eval_memorization as closed_forms  # the closed-form optima live there
from ambient import alpha, ambient_coefficients, bcast

f64 = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


class GaussianMixture:
    """x_0 ~ sum_k w_k N(mu_k, Sigma_k) in R^d: E[x_0 | x_t] and log p_t(x_t) in closed form, the
    ground truth the sampler, Tweedie's formula and the losses are checked against."""

    def __init__(self, weights, means, covs):
        self.weights, self.means, self.covs = weights, means, covs

    def sample(self, n, gen):
        k = torch.multinomial(self.weights, n, replacement=True, generator=gen)
        z = torch.randn(n, self.means.shape[1], generator=gen, dtype=self.means.dtype)
        return self.means[k] + (torch.linalg.cholesky(self.covs)[k] @ z[:, :, None])[:, :, 0]

    def _components(self, x_t, sigma_t):
        """Per component k: x_t ~ N(alpha mu_k, alpha^2 Sigma_k + sigma^2 I)."""
        sigma_t = torch.as_tensor(sigma_t, dtype=x_t.dtype).expand(x_t.shape[0])
        if (
            sigma_t == sigma_t[0]
        ).all():  # one noise level (the sampler's case): one inverse per component
            sigma_t = sigma_t[:1]
        a, eye = alpha(sigma_t)[:, None, None, None], torch.eye(x_t.shape[1], dtype=x_t.dtype)
        cov = a**2 * self.covs[None] + sigma_t[:, None, None, None] ** 2 * eye  # (B or 1, K, d, d)
        diff = x_t[:, None, :] - a[..., 0] * self.means[None]  # (B, K, d)
        sol = (torch.linalg.inv(cov) @ diff[..., None])[..., 0]
        log_n = -0.5 * (
            (diff * sol).sum(-1) + torch.logdet(cov) + x_t.shape[1] * math.log(2 * math.pi)
        )
        return a, sol, log_n + self.weights.log()

    def log_density(self, x_t, sigma_t):
        return torch.logsumexp(self._components(x_t, sigma_t)[2], dim=1)

    def denoiser(self, x_t, sigma_t):
        """E[x_0 | x_t] =
        sum_k P(k | x_t) (mu_k + alpha Sigma_k (alpha^2 Sigma_k + sigma^2 I)^-1 (x_t - alpha mu_k)).
        """
        a, sol, log_joint = self._components(x_t, sigma_t)
        post_means = self.means[None] + a[..., 0] * (self.covs[None] @ sol[..., None])[..., 0]
        return (torch.softmax(log_joint, dim=1)[..., None] * post_means).sum(1)


def eps_v_targets(x_t, x_tn, sigma_t, sigma_tn):
    """Lemma C.2: Eq. 6 for eps- and v-prediction networks. With x_0 = (x_t - sigma_t eps)/alpha_t
    = alpha_t x_t - sigma_t v, Eq. 6's residual is -(c_h sigma_t / alpha_t) (eps_pred - eps_target)
    and -c_h sigma_t (v_pred - v_target): plain regression onto targets made of x_t and x_tn. At
    sigma_tn = 0 they are eps and v. ambient.py trains x_0 predictors; this is the lemma's form."""
    c_h, c_x = ambient_coefficients(sigma_t, sigma_tn)
    a, s, c_h, c_x = (bcast(torch.as_tensor(v), x_t) for v in (alpha(sigma_t), sigma_t, c_h, c_x))
    eps_target = ((c_h + a * c_x) * x_t - a * x_tn) / (c_h * s)
    v_target = ((c_h * a + c_x) * x_t - x_tn) / (c_h * s)
    return eps_target, v_target


def mixture(d=2, seed=0):
    """A 3-component Gaussian mixture in R^d with full covariances (float64)."""
    g = gen(seed)
    L = torch.randn(3, d, d, generator=g, dtype=f64) * 0.3
    covs = L @ L.transpose(1, 2) + 0.05 * torch.eye(d, dtype=f64)
    return GaussianMixture(
        torch.tensor([0.5, 0.3, 0.2], dtype=f64), torch.randn(3, d, generator=g, dtype=f64), covs
    )


def gaussian(d=2):
    mu, cov = (
        torch.tensor([0.5, -0.3, 0.1][:d], dtype=f64),
        torch.tensor([[0.3, 0.1, 0.0], [0.1, 0.2, 0.05], [0.0, 0.05, 0.25]], dtype=f64)[:d, :d],
    )
    return GaussianMixture(torch.ones(1, dtype=f64), mu[None], cov[None]), mu, cov


def sqrtm(M):
    e, V = torch.linalg.eigh(M)
    return V @ torch.diag(e.sqrt()) @ V.T


# ---------------------------------------------------------------------------------------------
# 1. Noise schedule (Eq. 1) and Algorithm 1 line 10
# ---------------------------------------------------------------------------------------------
def test_vp_schedule_preserves_variance_and_units_round_trip():
    sigma_t = torch.linspace(0, 0.999, 101, dtype=f64)
    assert torch.allclose(A.alpha(sigma_t) ** 2 + sigma_t**2, torch.ones_like(sigma_t), atol=1e-14)
    sigma = torch.logspace(-3, 2, 50, dtype=f64)
    assert torch.allclose(A.edm_from_vp(A.vp_from_edm(sigma)), sigma, rtol=1e-10)
    assert torch.allclose(A.vp_from_edm(A.edm_from_vp(sigma_t)), sigma_t, atol=1e-12)
    assert A.vp_from_edm(1.0) == pytest.approx(2**-0.5)  # x_0 + n, rescaled by 1/sqrt(2)
    # VP x_t divided by alpha is the EDM-units x_0 + sigma n
    x0, z, s_vp = (
        torch.randn(4, 3, dtype=f64),
        torch.randn(4, 3, dtype=f64),
        torch.tensor(0.6, dtype=f64),
    )
    assert torch.allclose(A.add_noise(x0, s_vp, z) / A.alpha(s_vp), x0 + A.edm_from_vp(s_vp) * z)


def test_time_map_is_inverse_and_spans_edm_range():
    t = torch.linspace(0, 1, 33, dtype=f64)
    assert torch.allclose(A.time_at(A.sigma_at(t)), t, atol=1e-12)
    assert A.sigma_at(0.0) == pytest.approx(A.SIGMA_MIN) and A.sigma_at(1.0) == pytest.approx(
        A.SIGMA_MAX
    )


@pytest.mark.parametrize("sigma_tn,sigma_t", [(0.1, 0.3), (0.37, 0.8), (0.6, 0.99)])
def test_noise_further_has_eq1_coefficients(sigma_tn, sigma_t):
    s_n, s_t = torch.tensor(sigma_tn, dtype=f64), torch.tensor(sigma_t, dtype=f64)
    one, zero = torch.ones(1, dtype=f64), torch.zeros(1, dtype=f64)
    scale = A.noise_further(one, s_n, s_t, zero)  # coefficient of x_tn
    std = A.noise_further(zero, s_n, s_t, one)  # coefficient of the fresh noise
    # x_t = scale (alpha_n x_0 + sigma_n z1) + std z2 must be alpha_t x_0 + N(0, sigma_t^2)
    assert (scale * A.alpha(s_n)).item() == pytest.approx(A.alpha(s_t).item(), abs=1e-14)
    assert ((scale * s_n) ** 2 + std**2).item() == pytest.approx(sigma_t**2, abs=1e-14)


# ---------------------------------------------------------------------------------------------
# 2. Network and preconditioning
# ---------------------------------------------------------------------------------------------
def test_fresh_network_is_c_skip_times_edm_input():
    """The output layer starts at zero, so h = c_skip(sigma) x_t / alpha: EDM's preconditioning."""
    h = A.Denoiser(16, "tiny")
    x_t, sigma_t = torch.randn(5, 3, 16, 16), torch.tensor([0.05, 0.2, 0.5, 0.9, 0.999])
    sigma = A.edm_from_vp(sigma_t)
    c_skip = A.SIGMA_DATA**2 / (sigma**2 + A.SIGMA_DATA**2)
    expected = (c_skip / A.alpha(sigma_t))[:, None, None, None] * x_t
    assert torch.allclose(h(x_t, sigma_t), expected, rtol=1e-5, atol=1e-6)


def test_preset_sizes_match_the_documented_budget():
    def count(m):
        return sum(p.numel() for p in m.parameters())

    assert count(A.Denoiser(16, "tiny")) <= 1_000_000
    assert 2_000_000 <= count(A.Denoiser(32, "small")) <= 50_000_000
    with torch.device("meta"):  # EDM's DDPM++ network for CIFAR-10 has 55.7M parameters
        assert abs(count(A.Denoiser(32, "edm")) / 55.7e6 - 1) < 0.05


# ---------------------------------------------------------------------------------------------
# 3. Losses: Lemma C.1, Eq. 6 at sigma_tn = 0, and the ambient minimiser
# ---------------------------------------------------------------------------------------------
def test_ambient_loss_at_zero_sigma_tn_is_ddpm_loss_exactly():
    g = gen(1)
    x0, pred, x_t = (torch.randn(16, 3, 8, 8, generator=g) for _ in range(3))
    sigma_t = torch.rand(16, generator=g) * 0.9 + 0.05
    assert torch.equal(
        A.ambient_loss(pred, x_t, x0, sigma_t, torch.zeros(16)), A.ddpm_loss(pred, x0)
    )
    assert torch.equal(A.ambient_loss(pred, x_t, x0, sigma_t, 0.0), A.ddpm_loss(pred, x0))
    sigma = A.edm_from_vp(sigma_t)  # and the weight is EDM's lambda
    assert torch.allclose(A.loss_weight(sigma_t, 0.0), (sigma**2 + 0.25) / (sigma * 0.5) ** 2)


def test_x0_weight_is_edm_lambda_over_c_h_squared_and_finite_at_t_n():
    s_n = torch.tensor(0.4)
    s_t = torch.tensor([0.4, 0.5, 0.9])  # at t_n exactly, c_h = 0
    c_h, _ = A.ambient_coefficients(s_t, s_n)
    sigma = A.edm_from_vp(s_t)
    w = A.loss_weight(s_t, s_n, "x0")
    assert torch.isfinite(w).all()
    assert torch.allclose(w[1:], (sigma[1:] ** 2 + 0.25) / (0.5 * sigma[1:]) ** 2 / c_h[1:] ** 2)


@pytest.mark.parametrize("flip", [False, True])
def test_training_loss_is_the_released_loss_per_sample(flip):
    """The authors' AmbientHighNoise_EDMLowNoise_Loss, written here in EDM units from its
    description: y = x_0 + sigma n is the network input, y_n = x_0 + sigma_n n_1 the fixed noisy
    copy, D the x_0 prediction, lambda = (sigma^2 + s_d^2) / (sigma s_d)^2. For sigma >= sigma_n
    the loss is lambda |(1 - r) D + r y - y_n|^2 with r = sigma_n^2 / sigma^2, below it
    lambda |D - x_0|^2. Theirs sums over pixels where ours averages: a constant factor."""
    S, S_tn = plumbing_data()
    s_n = 0.4
    b = A.algorithm1_batch(S, S_tn, s_n, 512, gen(50), "edm", flip=flip)
    D = torch.randn(b["x0"].shape, generator=gen(51))  # any x_0 prediction
    ours = A.algorithm1_loss(lambda x_t, sigma_t: D, b)
    sigma, noisy = b["sigma"][:, None, None, None], b["noisy"]
    y = b["x_t"] / (1 - b["sigma_t"] ** 2).sqrt()[:, None, None, None]  # VP x_t / alpha_t
    y_n = b["x_tn"] * (1 + s_n**2) ** 0.5  # VP x_tn / alpha_tn
    lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    r = s_n**2 / sigma**2
    released = torch.where(
        noisy[:, None, None, None], lam * ((1 - r) * D + r * y - y_n) ** 2, lam * (D - b["x0"]) ** 2
    )
    # both branches, some just above t_n
    assert noisy.any() and (~noisy).any() and (b["sigma"][noisy] < 0.45).any()
    assert torch.allclose(ours, released.flatten(1).mean(1), rtol=1e-4, atol=1e-6)


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
    tests = torch.stack(
        [
            torch.ones(n, dtype=f64),
            x_t[:, 0],
            x_t[:, 1],
            (x_t[:, 0] > 0).double(),
            x_t[:, 1].tanh(),
        ],
        1,
    )

    def z_scores(x0_hat):
        r = c_h * x0_hat + c_x * x_t - x_tn  # (n, d)
        prod = r[:, :, None] * tests[:, None, :]  # (n, d, tests)
        return (prod.mean(0) / (prod.std(0) / n**0.5)).abs()

    assert z_scores(dist.denoiser(x_t, s_t)).max() < 5  # the exact E[x_0 | x_t]: zero mean
    # the posterior mean at the wrong level
    wrong = dist.denoiser(x_t, torch.tensor(0.5, dtype=f64))
    assert z_scores(wrong).max() > 10  # the check has the power to see a wrong denoiser


def test_ambient_loss_minimiser_is_the_clean_posterior_mean():
    """Noisy data only: least squares on Eq. 6 over linear h recovers E[x_0 | x_t] = A x_t + b."""
    dist, mu, cov = gaussian(3)
    g, n = gen(3), 200_000
    s_n, s_t = torch.tensor(0.5, dtype=f64), torch.tensor(0.8, dtype=f64)
    # S_tn, fixed
    x_tn = A.add_noise(dist.sample(n, g), s_n, torch.randn(n, 3, generator=g, dtype=f64))
    x_t = A.noise_further(x_tn, s_n, s_t, torch.randn(n, 3, generator=g, dtype=f64))
    W, b = (
        torch.zeros(3, 3, dtype=f64, requires_grad=True),
        torch.zeros(3, dtype=f64, requires_grad=True),
    )
    opt = torch.optim.LBFGS(
        [W, b],
        max_iter=200,
        tolerance_grad=1e-12,
        tolerance_change=1e-14,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = A.ambient_loss(x_t @ W.T + b, x_t, x_tn, s_t, s_n).mean()
        loss.backward()
        return loss

    opt.step(closure)
    a = A.alpha(s_t)
    W_exact = a * cov @ torch.linalg.inv(a**2 * cov + s_t**2 * torch.eye(3, dtype=f64))
    assert (W.detach() - W_exact).abs().max() < 1e-2
    assert (b.detach() - (mu - a * W_exact @ mu)).abs().max() < 1e-2


def test_eps_and_v_targets_are_eps_and_v_at_zero_sigma_tn():
    g = gen(17)
    x0, eps = torch.randn(8, 5, generator=g, dtype=f64), torch.randn(8, 5, generator=g, dtype=f64)
    s_t = torch.rand(8, generator=g, dtype=f64) * 0.9 + 0.05
    a = A.alpha(s_t)[:, None]
    x_t = a * x0 + s_t[:, None] * eps
    eps_target, v_target = eps_v_targets(x_t, x0, s_t, torch.zeros(8, dtype=f64))
    assert torch.allclose(eps_target, eps) and torch.allclose(v_target, a * eps - s_t[:, None] * x0)


def test_eps_and_v_losses_are_eq6_reweighted_per_noise_level():
    """Lemma C.2 as a loss: for any x_0 prediction, the eps- and v-form errors are Eq. 6's times
    (alpha / (c_h sigma))^2 and 1 / (c_h sigma)^2, per sample. Same minimiser, other weights
    over t."""
    g = gen(37)
    x_t, x_tn, x0_pred = (torch.randn(16, 5, generator=g, dtype=f64) for _ in range(3))
    s_n = torch.rand(16, generator=g, dtype=f64) * 0.5
    s_t = s_n + (1 - s_n) * (0.05 + 0.9 * torch.rand(16, generator=g, dtype=f64))
    a, c_h = A.alpha(s_t), A.ambient_coefficients(s_t, s_n)[0]
    eps_target, v_target = eps_v_targets(x_t, x_tn, s_t, s_n)
    eps_pred, v_pred = (
        (x_t - a[:, None] * x0_pred) / s_t[:, None],
        (a[:, None] * x_t - x0_pred) / s_t[:, None],
    )
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
    eps_target, v_target = eps_v_targets(x_t, x_tn, s_t, s_n)
    design = torch.cat([x_t, torch.ones(n, 1, dtype=f64)], 1)
    a = A.alpha(s_t)
    W_exact = a * cov @ torch.linalg.inv(a**2 * cov + s_t**2 * torch.eye(3, dtype=f64))
    eye = torch.eye(3, dtype=f64)
    for target, to_x0 in [
        (eps_target, lambda W: (eye - s_t * W) / a),  # x_0 = (x_t - sigma eps) / alpha
        (v_target, lambda W: a * eye - s_t * W),  # x_0 = alpha x_t - sigma v
    ]:
        coef = torch.linalg.lstsq(design, target).solution  # (4, 3): [W^T; b]
        W_x0 = to_x0(coef[:3].T)
        assert (W_x0 - W_exact).abs().max() < 1e-2


def test_tweedie_score_from_denoiser_equals_autograd_gradient():
    """Eq. 2: grad log p_t(x_t) = (alpha E[x_0 | x_t] - x_t) / sigma_t^2."""
    dist = mixture(d=3, seed=4)
    x_t = torch.randn(64, 3, generator=gen(5), dtype=f64).requires_grad_()
    sigma_t = torch.rand(64, generator=gen(6), dtype=f64) * 0.9 + 0.05
    (autograd_score,) = torch.autograd.grad(dist.log_density(x_t, sigma_t).sum(), x_t)
    tweedie = (
        A.alpha(sigma_t)[:, None] * dist.denoiser(x_t.detach(), sigma_t) - x_t.detach()
    ) / sigma_t[:, None] ** 2
    assert torch.allclose(tweedie, autograd_score, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# Closed forms: Lemma 4.1 and Section 2.2 through the sampler
# ---------------------------------------------------------------------------------------------
def test_lemma_4_1_ambient_optimum_ode_lands_on_noisy_copies():
    S = torch.randn(6, 12, generator=gen(7), dtype=f64)
    sigma_tn = 1.0  # EDM units
    S_tn = A.make_noisy_copies(S, A.vp_from_edm(torch.tensor(sigma_tn, dtype=f64)), seed=0)
    h = closed_forms.ambient_optimal_denoiser(
        S_tn, A.vp_from_edm(torch.tensor(sigma_tn, dtype=f64))
    )
    x = A.sample(
        h, A.initial_noise((32, 12), 1, dtype=f64), steps=60, sampler="euler", sigma_stop=sigma_tn
    )
    noisy_points = S_tn / A.alpha(A.vp_from_edm(torch.tensor(sigma_tn, dtype=f64)))  # EDM units
    assert torch.cdist(x, noisy_points).min(1).values.max() < 1e-5  # on a point of S_tn
    assert torch.cdist(x, S).min(1).values.min() > 1.0  # and on none of the clean images


def test_ddpm_empirical_optimum_ode_copies_training_points():
    S = torch.randn(6, 12, generator=gen(8), dtype=f64)
    x = A.sample(
        closed_forms.empirical_denoiser(S),
        A.initial_noise((32, 12), 2, dtype=f64),
        steps=40,
        sampler="euler",
    )
    assert torch.cdist(x, S).min(1).values.max() < 1e-5


def algorithm1_optimum(S, S_tn, sigma_tn):
    """The exact minimiser of Algorithm 1's objective on the finite set S (VP sigma_tn): Lemma 4.1's
    ambient optimum on S_tn above t_n (Eq. 6), the empirical clean denoiser below it (Eq. 3)."""
    noisy, clean = (
        closed_forms.ambient_optimal_denoiser(S_tn, sigma_tn),
        closed_forms.empirical_denoiser(S),
    )

    def h(x_t, sigma_t):
        sigma_t = torch.as_tensor(sigma_t, dtype=x_t.dtype).expand(x_t.shape[0])
        above = bcast(sigma_t > sigma_tn, x_t)  # where() keeps the unused branch's NaN out
        return torch.where(above, noisy(x_t, sigma_t), clean(x_t, sigma_t))

    return h


@pytest.mark.parametrize("sigma_tn", [0.4, 2.0])
def test_algorithm1_objective_optimum_copies_the_clean_training_images(sigma_tn):
    """Whatever sigma_tn > 0, the exact optimum of Algorithm 1's objective copies: below t_n the
    clean empirical denoiser pulls every trajectory onto a training image. So Algorithm 1 can copy
    less only where the network has not reached its optimum (NOTES.md, "Onset")."""
    S = torch.randn(6, 12, generator=gen(9), dtype=f64)
    s_tn = A.vp_from_edm(torch.tensor(sigma_tn, dtype=f64))
    S_tn = A.make_noisy_copies(S, s_tn, seed=0)
    x_T = A.initial_noise((32, 12), 3, dtype=f64)
    x = A.sample(algorithm1_optimum(S, S_tn, s_tn), x_T, steps=40)
    nearest = torch.cdist(x, S).min(1)
    assert nearest.values.max() < 1e-6  # every sample on a clean training image
    assert len(nearest.indices.unique()) > 1  # and not all on one


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
    x = A.sample(
        dist.denoiser, A.initial_noise((20_000, 2), 4, dtype=f64), steps=steps, sampler=sampler
    )
    assert (x.mean(0) - mu).abs().max() < 0.02  # 5 standard errors
    assert (torch.cov(x.T) - cov).abs().max() < 0.02


def test_heun_error_shrinks_faster_than_euler():
    """Against the exact ODE flow of a Gaussian:
    x_0 = mu + Sigma^1/2 (Sigma + 80^2 I)^-1/2 (x_T - mu)."""
    dist, mu, cov = gaussian()
    x_T = torch.randn(500, 2, generator=gen(3), dtype=f64) * A.SIGMA_MAX
    flow = sqrtm(cov) @ torch.linalg.inv(sqrtm(cov + A.SIGMA_MAX**2 * torch.eye(2, dtype=f64)))
    exact = mu + (x_T - mu) @ flow.T
    err = {
        s: [
            (
                A.sample(dist.denoiser, A.initial_noise((500, 2), 3, dtype=f64), steps=n, sampler=s)
                - exact
            )
            .abs()
            .max()
            .item()
            for n in (16, 32, 64)
        ]
        for s in ("euler", "heun")
    }
    order = {s: math.log2(e[1] / e[2]) for s, e in err.items()}
    assert 0.8 < order["euler"] < 1.2  # first order
    assert order["heun"] > 1.8  # second order
    assert all(h < e for h, e in zip(err["heun"], err["euler"], strict=True))
    # Why Heun-40 is the default: more accurate than Euler with the same 79 network calls.
    rms = {
        (s, n): (
            A.sample(dist.denoiser, A.initial_noise((500, 2), 3, dtype=f64), steps=n, sampler=s)
            - exact
        )
        .square()
        .mean()
        .sqrt()
        for s, n in (("heun", 40), ("euler", 79))
    }
    assert rms["heun", 40] < rms["euler", 79] / 2


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
    assert (sigma[noisy] >= 0.4).all() and (
        sigma[noisy] <= A.SIGMA_MAX * (1 + 1e-6)
    ).all()  # U(t_n, T)
    assert (sigma[~noisy] <= 0.4 * (1 + 1e-6)).all() and (
        sigma[~noisy] >= A.SIGMA_MIN * (1 - 1e-6)
    ).all()  # U(0, t_n)
    assert abs(noisy.float().mean().item() - 0.5) < 4 * 0.5 / 8192**0.5  # uniform over S and S_tn
    t = A.time_at(sigma.double())  # and uniform in time within each branch
    t_n = A.time_at(torch.tensor(0.4, dtype=f64))
    assert abs(t[noisy].mean() - (1 + t_n) / 2) < 0.02 and abs(t[~noisy].mean() - t_n / 2) < 0.02


def test_edm_schedule_splits_at_sigma_tn():
    S, S_tn = plumbing_data()
    for sigma_tn in (0.2, 0.4, 2.0):
        b = A.algorithm1_batch(S, S_tn, sigma_tn, 8192, gen(11), "edm")
        assert torch.equal(b["noisy"], b["sigma"] >= sigma_tn)
        expected = 1 - norm.cdf((math.log(sigma_tn) + 1.2) / 1.2)  # P(ln sigma >= ln sigma_tn)
        assert abs(b["noisy"].float().mean().item() - expected) < 4 * 0.5 / 8192**0.5


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
    # line 1 is seeded
    assert torch.equal(S_tn, A.make_noisy_copies(S, A.vp_from_edm(torch.tensor(0.4)), seed=0))
    g, flipped = gen(13), []
    for _ in range(20):  # many "epochs": the noisy branch always reads the same x_tn
        b = A.algorithm1_batch(S, S_tn, 0.4, 64, g, "algorithm1", flip=True)
        i = b["idx"]
        same = (b["x_tn"] == S_tn[i]).flatten(1).all(1) & (b["x0"] == S[i]).flatten(1).all(1)
        mirrored = (b["x_tn"] == S_tn[i].flip(-1)).flatten(1).all(1) & (
            b["x0"] == S[i].flip(-1)
        ).flatten(1).all(1)
        assert (same | mirrored).all()
        flipped.append(mirrored & ~same)
    # half are mirrored
    assert abs(torch.cat(flipped).float().mean().item() - 0.5) < 4 * 0.5 / 1280**0.5
    z = (S_tn - A.alpha(A.vp_from_edm(torch.tensor(0.4))) * S) / A.vp_from_edm(torch.tensor(0.4))
    assert abs(z.std().item() - 1) < 0.1  # one draw of N(0, 1) per pixel


# ---------------------------------------------------------------------------------------------
# Training: smoke test, checkpoints, resume, determinism
# ---------------------------------------------------------------------------------------------
TINY = (
    "--data demo --n 16 --preset tiny --resolution 16 --batch 8 --samples 8 --steps 4 "
    "--device cpu --log-every 1000 --seed 3"
).split()


def test_tiny_preset_trains_with_falling_loss_and_checkpoint_reproduces_samples(tmp_path):
    torch.manual_seed(0)
    S = A.prepare(np.load(A.DEMO_FILE)["images"][:16], 16)
    S_tn = A.make_noisy_copies(S, A.vp_from_edm(torch.tensor(0.4)), seed=0)
    cfg = A.Config(
        lr=2e-3,
        seed=0,
        iters=40,
        batch=32,
        sigma_tn=0.4,
        schedule="algorithm1",
        preset="tiny",
        resolution=16,
        log_every=1000,
        ckpt_every=1000,
    )
    method = A.Algorithm1(cfg)
    method.use_data(S, saved=dict(S_tn=S_tn))
    h = method.network()

    def fixed_batch_losses():  # the same 8 batches (images, noise levels, noise) every time
        g = gen(14)
        with torch.no_grad():
            return torch.tensor(
                [
                    A.algorithm1_loss(h, A.algorithm1_batch(S, S_tn, 0.4, 64, g)).mean().item()
                    for _ in range(8)
                ]
            )

    before = fixed_batch_losses()
    ema = A.train(method, A.training_state(h, cfg, S[0].numel()), cfg, tmp_path, log=lambda m: None)
    assert (fixed_batch_losses() < before).all()  # lower on every one of them
    x = A.sample(ema, A.initial_noise((4, 3, 16, 16), 5), steps=6)
    assert torch.isfinite(x).all() and x.abs().max() < 5  # data in [-1, 1]: no blow-up
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["step"] == 40 and torch.equal(state["S_tn"], S_tn)
    loaded = A.Denoiser(16, "tiny")
    loaded.load_state_dict(state["ema"])
    assert torch.equal(A.sample(loaded, A.initial_noise((4, 3, 16, 16), 5), steps=6), x)


def test_ema_moves_toward_the_network_with_edms_half_life():
    """EDM's EMA: after one half-life of images the average has moved halfway from where it was to
    the network; the half-life is 500k images, or 5% of the images seen so far when that is less."""
    net, ema = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    for images_seen, batch, moved in (
        (10**8, 500_000, 0.5),
        (10**8, 250_000, 1 - 0.5**0.5),
        (64_000, 3_200, 0.5),  # 5% of 64k is 3,200 images
        (0, 64, 1.0),
    ):
        with torch.no_grad():
            net.weight.fill_(1.0)
            ema.weight.fill_(0.0)
        A.ema_update(ema, net, images_seen, batch)
        assert ema.weight.item() == pytest.approx(moved, rel=1e-6)


def test_optimizers_apply_weight_decay_as_named():
    """A zero gradient on w = 2 for one step at lr 0.1: Adam's L2 decay enters the gradient
    (0.01 w / pixels), which Adam normalises to a step of lr (eps / pixels beside it); AdamW shrinks
    w by lr * 0.01 * w whatever the pixel count, and sees no gradient."""
    for name, expected in (
        ("adam", 2 - 0.1 * 0.02 / (0.02 + 1e-8)),
        ("adamw", 2 * (1 - 0.1 * 0.01)),
    ):
        for pixels in (1, 192):
            w = torch.nn.Parameter(torch.full((1,), 2.0))
            opt = A.make_optimizer([w], A.Config(lr=0.1, optimizer=name), pixels)
            w.grad = torch.zeros(1)
            opt.step()
            assert w.item() == pytest.approx(expected, rel=1e-7)


def test_adam_on_the_pixel_mean_loss_steps_as_the_released_adam_on_the_pixel_sum():
    """The released code sums the loss over an image's pixels and uses Adam with L2 decay 0.01; ours
    averages and divides the decay and Adam's eps by the pixel count: the same steps, up to float
    rounding. The data are scaled down so that the gradients are near eps, where an undivided eps
    would show."""
    g = gen(60)
    x, y, w0 = (
        1e-4 * torch.randn(8, 192, generator=g),
        1e-4 * torch.randn(8, 192, generator=g),
        torch.randn(192, generator=g),
    )
    ws = []
    for reduce, opt_of in (
        ("sum", lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.01)),
        ("mean", lambda p: A.make_optimizer(p, A.Config(lr=1e-2, optimizer="adam"), pixels=192)),
    ):
        w = torch.nn.Parameter(w0.clone())
        opt = opt_of([w])
        for _ in range(5):
            opt.zero_grad()
            getattr((w * x - y).square(), reduce)(1).mean().backward()
            opt.step()
        ws.append(w.detach())
    assert (ws[0] - ws[1]).abs().max() < 1e-5 * (
        ws[0] - w0
    ).abs().max()  # 5 steps of lr 1e-2 moved w by 0.05


def test_learning_rate_ramps_linearly_over_lr_rampup_million_images():
    cfg = A.Config(lr=1e-4, lr_rampup=10)
    assert [A.learning_rate(cfg, n) for n in (0, 2.5e6, 10e6, 30e6)] == pytest.approx(
        [0, 2.5e-5, 1e-4, 1e-4]
    )
    assert A.learning_rate(A.Config(lr=1e-4, lr_rampup=0), 0) == 1e-4
    # the released first step has lr 0
    cfg = A.Config(preset="tiny", resolution=8, batch=4, lr=1e-2, lr_rampup=10)
    method = A.Algorithm1(cfg)
    method.use_data(torch.rand(4, 3, 8, 8) * 2 - 1)
    state = A.training_state(method.network(), cfg, 3 * 8 * 8)
    before = copy.deepcopy(state.net.state_dict())
    A.eager_step(state, method, cfg)()
    assert all(torch.equal(before[k], v) for k, v in state.net.state_dict().items())


def test_killed_and_resumed_run_equals_uninterrupted_run(tmp_path):
    # dropout: global RNG too
    A.main(TINY + ["--iters", "6", "--dropout", "0.2", "--out", str(tmp_path / "full")])
    A.main(TINY + ["--iters", "3", "--dropout", "0.2", "--out", str(tmp_path / "part")])
    A.main(TINY + ["--iters", "6", "--dropout", "0.2", "--out", str(tmp_path / "part"), "--resume"])
    full, part = (
        torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in ("full", "part")
    )
    assert part["step"] == 6 and torch.equal(full["S_tn"], part["S_tn"])
    for key in ("net", "ema"):  # the trained and the averaged weights, bit for bit
        assert all(torch.equal(full[key][k], part[key][k]) for k in full[key])
    assert torch.equal(full["rng"], part["rng"])
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            full["opt"]["state"][0].values(), part["opt"]["state"][0].values(), strict=True
        )
    )
    # the released Adam's decay and eps, scaled to our pixel-mean loss
    group = full["opt"]["param_groups"][0]
    assert (group["weight_decay"], group["eps"]) == (0.01 / (3 * 16 * 16), 1e-8 / (3 * 16 * 16))
    for f in (
        "config.json",
        "indices.json",
        "samples.png",
        "neighbours.png",
        "metrics.json",
        "log.txt",
        "samples.npz",
    ):
        assert (tmp_path / "full" / f).is_file()
    assert len(json.loads((tmp_path / "full" / "indices.json").read_text())) == 16
    assert not list(tmp_path.glob("*/*.tmp"))  # atomic writes leave no temp files


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
    A.save_neighbour_grid(
        x, x, torch.arange(10), tmp_path / "n.png", pairs=10, per_row=5, upscale=2
    )
    # 5 pairs a row, 2 px padding
    assert Image.open(tmp_path / "n.png").size[0] == 2 * 5 * (32 + 2) + 2


# ---------------------------------------------------------------------------------------------
# Data and command line
# ---------------------------------------------------------------------------------------------
def test_subset_is_seeded_and_loaders_read_npz_and_folders(tmp_path):
    assert np.array_equal(A.choose_subset(800, 300, 0), A.choose_subset(800, 300, 0))
    assert len(set(A.choose_subset(800, 300, 0))) == 300
    counts = np.zeros(10)
    # over seeds, every image is equally likely to be chosen, the last one too
    for seed in range(2000):
        counts[A.choose_subset(10, 3, seed)] += 1
    assert np.abs(counts / 2000 - 0.3).max() < 4 * (0.3 * 0.7 / 2000) ** 0.5
    from PIL import Image

    imgs = (np.random.default_rng(0).random((3, 8, 8, 3)) * 255).astype(np.uint8)
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(tmp_path / f"{i}.png")
    assert np.array_equal(A.load_images(str(tmp_path))[0], imgs)
    np.savez(tmp_path / "d.npz", images=imgs, labels=np.arange(3))
    images, labels = A.load_images(str(tmp_path / "d.npz"))
    assert np.array_equal(images, imgs) and labels.tolist() == [0, 1, 2]
    x = A.prepare(imgs)
    assert x.shape == (3, 3, 8, 8) and x.min() >= -1 and x.max() <= 1


def error_of(argv, capsys, main=A.main):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and "\n" not in err
    return err


def torchrun_child(rank, port, main, argv):
    """What torchrun gives each of two processes on one machine, then the command line."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # a forked child runs no OpenMP team: the parent's does not exist
    main(argv)


def two_processes(main, argv, timeout=120):
    """main(argv) in two processes forked from this one with torchrun's environment (as torchrun
    would run them, without its seconds of imports); their exit codes."""
    import multiprocessing
    import socket

    with socket.socket() as sock:  # a free port for the processes' rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    fork = multiprocessing.get_context("fork")
    procs = [fork.Process(target=torchrun_child, args=(r, port, main, argv)) for r in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout)
        proc.kill()
    return [proc.exitcode for proc in procs]


def test_cli_bad_input_gives_one_clear_line(tmp_path, capsys, monkeypatch):
    out = ["--out", str(tmp_path / "r")]
    assert "larger than the dataset" in error_of(TINY + ["--n", "5000"], capsys)
    assert "negative" in error_of(TINY + ["--sigma-tn", "-0.1"], capsys)
    assert "top noise level" in error_of(TINY + ["--sigma-tn", "80"], capsys)
    assert "at least 1" in error_of(TINY + ["--samples", "0"], capsys)
    # class conditioning lives there
    assert "conditional.py" in error_of(TINY + ["--guidance", "2"], capsys)
    assert "unknown dataset" in error_of(["--data", "imagenet"], capsys)
    (tmp_path / "bad.npz").write_bytes(b"not an archive")
    assert "cannot read" in error_of(["--data", str(tmp_path / "bad.npz")], capsys)
    np.savez(tmp_path / "odd.npz", images=np.zeros((4, 30, 30, 3), np.uint8))
    assert "multiple of 4" in error_of(
        ["--data", str(tmp_path / "odd.npz"), "--preset", "tiny"], capsys
    )
    A.main(TINY + ["--iters", "1"] + out)
    assert "different config" in error_of(
        TINY + ["--iters", "1", "--sigma-tn", "1", "--resume"] + out, capsys
    )
    assert "already holds a run" in error_of(TINY + ["--iters", "1"] + out, capsys)
    assert "is a file, not a folder" in error_of(
        TINY + ["--out", str(tmp_path / "r/log.txt")], capsys
    )
    for device in ("meta", "gpu"):  # no data on meta; gpu is not a name torch knows
        err = error_of(TINY + ["--device", device] + out, capsys)
        assert f"--device {device} is not a device that holds tensors here" in err
    import torchvision

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    assert "cifar-10-python.tar.gz" in error_of(
        ["--data", "cifar", "--data-dir", str(tmp_path)], capsys
    )
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"half a download")  # there, but broken
    assert "is damaged" in error_of(["--data", "cifar", "--data-dir", str(tmp_path)], capsys)


def test_cli_names_the_fix_for_images_and_run_folders_it_cannot_use(tmp_path, capsys):
    """Each input gets one line that says what is wrong and a fix that works."""
    np.savez(tmp_path / "wide.npz", images=np.zeros((4, 20, 30, 3), np.uint8))
    assert "crop them to a square" in error_of(
        ["--data", str(tmp_path / "wide.npz"), "--preset", "tiny"], capsys
    )
    assert "pass --resolution 8" in error_of(
        TINY[:4] + ["--preset", "tiny", "--resolution", "7"], capsys
    )
    (tmp_path / "text.npz").write_text("images, but as text")
    err = error_of(["--data", str(tmp_path / "text.npz")], capsys)
    # numpy's advice would not help here
    assert "NumPy .npz archive" in err and "allow_pickle" not in err
    run = tmp_path / "r"
    A.main(TINY + ["--iters", "1", "--out", str(run)])
    resume = TINY + ["--iters", "2", "--resume", "--out", str(run)]
    good = (run / "checkpoint.pt").read_bytes()
    for damaged in (good[: len(good) // 2], b""):  # truncated, and empty
        (run / "checkpoint.pt").write_bytes(damaged)
        assert "checkpoint.pt is damaged" in error_of(resume, capsys)
    (run / "checkpoint.pt").write_bytes(good)
    (run / "config.json").unlink()
    assert "config.json" in error_of(resume, capsys) and "restore it" in error_of(resume, capsys)
    assert "extends or shortens" in A.build_parser().format_help().replace("\n", " ").replace(
        "  ", " "
    )


@pytest.mark.parametrize(
    "broken, first, named, kept",
    [
        ("nan loss", 5, 5, 4),  # step 5 neither logs nor saves; the check at step 6 names it
        ("inf loss", 5, 5, 4),
        # the loss stays finite and the weights break on a checkpoint step
        ("inf gradient", 4, 4, 2),
    ],
)
def test_a_non_finite_step_stops_the_run_and_keeps_the_last_good_checkpoint(
    tmp_path, capsys, monkeypatch, broken, first, named, kept
):
    calls, real_loss = [], A.Algorithm1.loss

    def loss(self, h_theta, b):
        calls.append(1)
        out = real_loss(self, h_theta, b)
        if len(calls) < first:
            return out
        if broken == "inf gradient":
            out.register_hook(lambda g: g * float("inf"))
            return out
        return out * float("nan" if broken == "nan loss" else "inf")

    monkeypatch.setattr(A.Algorithm1, "loss", loss)
    err = error_of(
        TINY
        + ["--iters", "6", "--ckpt-every", "2", "--log-every", "3", "--out", str(tmp_path / "r")],
        capsys,
    )
    assert f"not finite from step {named} on" in err
    state = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert state["step"] == kept
    assert all(torch.isfinite(v).all() for part in ("net", "ema") for v in state[part].values())


def test_an_untrained_model_is_flagged_beside_its_copy_rate(tmp_path, capsys):
    """A run too short to learn anything copies nothing; its samples are as rough as noise, and the
    report says so beside the copy rate. samples.png shows small images enlarged."""
    A.main(TINY + ["--iters", "2", "--resolution", "8", "--out", str(tmp_path / "r")])
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["copy_rate"] == 0 and metrics["roughness_vs_train"] > 1.5
    assert "has not learned the data" in capsys.readouterr().out
    from PIL import Image

    # 8 images a row, 8x8 pixels each enlarged
    assert Image.open(tmp_path / "r" / "samples.png").size[0] >= 8 * 64
    noise, smooth = torch.rand(8, 3, 16, 16) * 2 - 1, torch.linspace(-1, 1, 16).expand(8, 3, 16, 16)
    assert A.roughness(noise) > 10 * A.roughness(smooth)
    lines, S = [], A.prepare(A.load_images("demo")[0][:8], 8)
    # samples that are the training images: real images, no warning
    A.report(S, S, tmp_path, lines.append)
    assert json.loads((tmp_path / "metrics.json").read_text())["roughness_vs_train"] == 1
    assert not any("warning" in line for line in lines)


def test_sigterm_keeps_the_checkpoint_and_says_how_to_resume(tmp_path):
    """What schedulers and `timeout` send: the run stops as on Ctrl-C, with a line, non-zero."""
    import signal
    import time

    p = subprocess.Popen(
        [
            sys.executable,
            "ambient.py",
            *TINY,
            "--iters",
            "100000",
            "--ckpt-every",
            "1",
            "--out",
            str(tmp_path / "r"),
        ],
        cwd=Path(A.__file__).parent,
        stderr=subprocess.PIPE,
        text=True,
    )
    while not (tmp_path / "r" / "checkpoint.pt").exists() and p.poll() is None:
        time.sleep(0.1)
    p.send_signal(signal.SIGTERM)
    err = p.communicate(timeout=60)[1]
    assert p.returncode != 0 and "continue with --resume" in err and "Traceback" not in err
    assert torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)["step"] >= 1


def test_cli_error_has_no_traceback_in_a_real_process():
    r = subprocess.run(
        [sys.executable, "ambient.py", "--sigma-tn", "-1"],
        capture_output=True,
        text=True,
        cwd=Path(A.__file__).parent,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1


def test_every_flag_is_explained_in_help():
    import baselines
    import conditional
    import repro_gpu

    for config in (A.Config, baselines.Config, conditional.Config, repro_gpu.Config):
        for action in A.build_parser(config)._actions:
            assert action.help and len(action.help) > 10, action.option_strings


def test_first_training_step_leaves_the_ema_equal_to_the_network(tmp_path):
    """The EMA's half-life counts images seen before a step, as in EDM: zero at the first step."""
    A.main(TINY + ["--iters", "1", "--samples", "1", "--out", str(tmp_path / "r")])
    state = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(state["ema"][k], state["net"][k]) for k in state["net"])


def test_every_python_file_is_formatted_and_lint_clean():
    """ruff format and ruff's E, F, W and B rules at 100 columns (ruff.toml), over every file."""
    root = Path(__file__).parent
    ruff = [sys.executable, "-m", "ruff"]
    formatted = subprocess.run(ruff + ["format", "--check", "."], cwd=root, capture_output=True)
    assert formatted.returncode == 0, formatted.stdout.decode() + formatted.stderr.decode()
    lint = subprocess.run(ruff + ["check", "."], cwd=root, capture_output=True)
    assert lint.returncode == 0, lint.stdout.decode() + lint.stderr.decode()
