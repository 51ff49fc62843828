"""Table 2's baselines, built on ambient.py: diffusion models trained on corrupted data only.

    # Gaussian noise (Ambient Tweedie)
    python baselines.py --method noisy-only --sigma-tn 1 [ambient.py's flags]
    # random inpainting (Ambient Diffusion)
    python baselines.py --method masking --mask-p 0.4 [ambient.py's flags]

Algorithm 1 uses clean images below t_n. Both baselines never see a clean image at all: noisy-only
trains on the fixed noisy copies S_tn alone, above t_n; masking trains on images with a fixed share
of their pixels missing, at every noise level. Each baseline is a method object with the interface
of ambient.Algorithm1 (network, use_data, saved_data, batch, loss, sample_batch), so ambient.py's
training loop, checkpoints, resume, sampler and report run it unchanged (NOTES.md: the seam).
"""

import math
from dataclasses import dataclass

import torch

import ambient as A
from ambient import UserError, bcast, option


@dataclass
class Config(A.Config):
    method: str = option(
        None,
        "noisy-only: the Ambient Tweedie baseline, trained on S_tn alone above t_n, sampled "
        "down to t_n and finished with one denoising step. masking: the Ambient Diffusion "
        "baseline, trained on images with a fixed share --mask-p of pixels missing, sampled with "
        "fixed masks",
        type=str,
        choices=("noisy-only", "masking"),
        same_run=True,
    )
    sigma_tn: float = option(
        None,
        "with --method noisy-only: the noise level of the data, EDM units (default 0.4)",
        type=float,
        same_run=True,
    )
    mask_p: float = option(
        None,
        "with --method masking: probability that a pixel is missing from its training image "
        "(Ambient Diffusion's CIFAR-10 runs: 0.2-0.8)",
        type=float,
        same_run=True,
    )
    mask_delta: float = option(
        None,
        "with --method masking: share of the visible pixels hidden again in each training "
        "step; delta > 0 is what lets the network learn hidden pixels (default 0.1)",
        type=float,
        same_run=True,
    )

    def check(self):
        masking = self.method == "masking"
        if self.method is None:
            raise UserError(
                "baselines.py trains one of Table 2's baselines: pass --method noisy-only "
                "(with --sigma-tn) or --method masking (with --mask-p); Algorithm 1 itself is "
                "ambient.py"
            )
        if masking and self.sigma_tn:
            raise UserError(
                "--method masking trains on masked images without added noise: drop --sigma-tn"
            )
        self.sigma_tn = (0.0 if masking else 0.4) if self.sigma_tn is None else self.sigma_tn
        if masking and self.mask_p is None:
            raise UserError(
                "--method masking needs --mask-p, the share of missing pixels (e.g. 0.4)"
            )
        if not masking and (self.mask_p is not None or self.mask_delta is not None):
            raise UserError("--mask-p and --mask-delta need --method masking")
        if masking:
            self.mask_delta = 0.1 if self.mask_delta is None else self.mask_delta
            if not (0 < self.mask_p < 1 and 0 <= self.mask_delta < 1):
                raise UserError(
                    f"--mask-p {self.mask_p} must be in (0, 1) and "
                    f"--mask-delta {self.mask_delta} in [0, 1)"
                )
        if self.method == "noisy-only" and self.sigma_tn == 0:
            raise UserError(
                "--method noisy-only needs the noise level of the data: pass --sigma-tn > 0"
            )
        super().check()


# ------------------------------------------------------------------------------------------------
# Noisy-only training (Table 2's "additive Gaussian noise" row; Ambient Tweedie, Daras et al.
# 2024b): Algorithm 1 without its clean branch. Every sample is a fixed noisy copy, noised further
# to t > t_n and trained with Eq. 6. The model knows nothing below t_n, so sampling integrates the
# ODE down to sigma_tn and finishes with the network's own E[x_0 | x_tn], one Tweedie step.
# ------------------------------------------------------------------------------------------------
def noisy_only_levels(batch, sigma_tn, schedule, gen, device):
    """Noise levels above t_n only: t ~ U(t_n, T), or EDM's log-normal conditioned on
    sigma >= sigma_tn (drawn by inverting the normal CDF). The same draws as ambient.noise_levels,
    in the same order."""
    u = torch.rand(batch, generator=gen, device=device)
    if schedule == "algorithm1":
        t_n = A.time_at(sigma_tn)
        # Algorithm 1's clean-or-noisy coin: here always noisy
        torch.rand(batch, generator=gen, device=device)
        sigma = A.sigma_at(t_n + u * (1 - t_n)).clamp_min(sigma_tn)
        return sigma, torch.ones(batch, dtype=torch.bool, device=device)
    # no copy: CUDA graphs
    lo = torch.special.ndtr(torch.full((), (math.log(sigma_tn) + 1.2) / 1.2, device=device))
    z = torch.special.ndtri(
        lo + (1 - lo) * torch.special.ndtr(torch.randn(batch, generator=gen, device=device))
    )
    sigma = (-1.2 + 1.2 * z).exp().clamp(A.SIGMA_MIN, A.SIGMA_MAX)
    return sigma, sigma >= sigma_tn


class NoisyOnly(A.Algorithm1):
    name = "noisy-only"

    def label(self):
        return f"noisy-only-{self.cfg.sigma_tn:g}"

    def use_data(self, S, saved=None):
        super().use_data(S, saved)
        self.S = self.S_tn  # no clean image is ever in reach of the loop

    def batch(self, gen):
        cfg = self.cfg
        idx, (x0, x_tn) = A.pick([self.S, self.S_tn], cfg.batch, gen, cfg.flip)
        sigma, noisy = noisy_only_levels(cfg.batch, cfg.sigma_tn, cfg.schedule, gen, x0.device)
        return dict(A.noise_batch(x0, x_tn, sigma, noisy, cfg.sigma_tn, gen), idx=idx)

    def sample_batch(self, h_theta, k, rows):
        """The ODE down to sigma_tn (the s-form of ambient.sample), then one Tweedie step to
        E[x_0 | x_tn]."""
        cfg = self.cfg
        x = A.sample(
            h_theta, self.noise(h_theta, k, rows), cfg.steps, cfg.sampler, sigma_stop=cfg.sigma_tn
        )
        s_vp = torch.full((len(x),), A.vp_from_edm(cfg.sigma_tn), dtype=x.dtype, device=x.device)
        return h_theta(x * bcast(A.alpha(s_vp), x), s_vp)


# ------------------------------------------------------------------------------------------------
# Masking (Table 2's "random inpainting" row; Ambient Diffusion, Daras et al. 2023): every training
# image is seen only through a fixed mask A (a pixel is missing with probability p). Training hides
# more: A_further keeps each visible pixel with probability 1 - delta, the network sees
# A_further x_t and A_further, and the loss covers every pixel of A, including those A_further just
# hid. Given A_further, a hidden pixel is in A with a probability that does not depend on the image,
# so the minimiser is E[x_0 | A_further x_t, A_further] on every pixel. With delta = 0 the pixels
# the network cannot see are never in the loss, and nothing teaches it to fill them in.
# ------------------------------------------------------------------------------------------------
def make_masks(shape, mask_p, seed):
    """Line 1 of the masking baseline: one fixed mask A per image, (N, 1, H, W), 0 = missing. A
    pixel loses all three channels at once, with probability mask_p, as in Ambient Diffusion's
    CIFAR-10 runs."""
    keep = torch.rand(shape[0], 1, *shape[2:], generator=torch.Generator().manual_seed(seed + 3))
    return (keep >= mask_p).float()


def observed(S, masks):
    """A x_0: all the masking baseline is given. Hidden pixels are 0, whatever S holds there."""
    return torch.where(masks > 0, S, 0)


def masking_loss(x0_pred, x0, mask, weight=1.0):
    """|A (h_theta(A_further x_t, A_further) - x_0)|^2, per sample, for a 0/1 mask A, optionally
    weighted per pixel. `where`, not a product, so that a hidden pixel's value never enters, not
    even as 0 * NaN."""
    return (weight * torch.where(mask > 0, x0_pred - x0, 0).square()).flatten(1).mean(1)


class MaskedDenoiser(A.Denoiser):
    """h_theta(A x_t, A) for a 0/1 map A of the pixels it sees, given as a fourth input channel (a
    hidden pixel reads 0, as does a visible one at 0: the map tells them apart). A hidden pixel
    carries no information, as at sigma = infinity; EDM's limits there, c_skip = 0 and
    c_out = sigma_data, let it take any value at every noise level, where c_out -> 0 at low noise
    would pin it near 0."""

    def __init__(self, resolution=32, preset="tiny", **overrides):
        super().__init__(resolution, preset, in_channels=4, **overrides)

    def forward(self, x_t, sigma_t, mask=None):
        if mask is None:
            raise ValueError(
                "this network was trained on masked images: pass the mask of visible pixels"
            )
        sigma, x, c_skip, c_out, c_in = self.scalings(x_t, sigma_t)
        net_in = torch.cat(
            [bcast(c_in, x) * x, mask.to(x.dtype).expand(len(x), 1, *x.shape[2:])], 1
        )
        F_x = self.net(net_in, sigma.log() / 4).to(x.dtype)
        return torch.where(
            mask > 0, bcast(c_skip, x) * x + bcast(c_out, x) * F_x, A.SIGMA_DATA * F_x
        )


def with_mask(h_theta, mask):
    """Ambient Diffusion's fixed-mask sampler: the network never saw a whole image, so each sample
    keeps one mask, drawn like A_further, for the whole ODE; it sees those pixels of x_t and
    predicts all of x_0."""
    return lambda x_t, sigma_t: h_theta(x_t * mask, sigma_t, mask=mask)


class Masking(A.Algorithm1):
    name, denoiser = "masking", MaskedDenoiser

    def label(self):
        return f"masking-{self.cfg.mask_p:g}"

    def describe(self):
        note = (
            (
                "; note: --mask-delta 0 never puts a hidden pixel in the loss, so the network does "
                "not learn to fill them (Ambient Diffusion's ablation)"
            )
            if self.cfg.mask_delta == 0
            else ""
        )
        return (
            f"mask_p = {self.cfg.mask_p:g}, delta = {self.cfg.mask_delta:g}, "
            f"schedule {self.cfg.schedule}{note}"
        )

    def use_data(self, S, saved=None):
        """The fixed masks (a resumed run's own, if saved) and A x_0, all the loop is given."""
        self.masks = (
            saved["masks"] if saved else make_masks(S.shape, self.cfg.mask_p, self.cfg.seed)
        ).to(S.device)
        self.S = self.S_tn = observed(S, self.masks)

    def saved_data(self):
        return dict(S_tn=self.S_tn, masks=self.masks)

    def batch(self, gen):
        """Lines 3-10 at sigma_tn = 0 on A x_0, then A_further: the image's mask with a share delta
        hidden again."""
        cfg = self.cfg
        idx, (x0, mask) = A.pick([self.S, self.masks], cfg.batch, gen, cfg.flip)
        sigma, noisy = A.noise_levels(cfg.batch, 0.0, cfg.schedule, gen, x0.device)
        b = dict(A.noise_batch(x0, x0, sigma, noisy, 0.0, gen), idx=idx)
        b["mask"] = mask
        b["mask_further"] = mask * (
            torch.rand(mask.shape, generator=gen, device=mask.device) >= cfg.mask_delta
        )
        b["x_t"] = b["x_t"] * b["mask_further"]
        return b

    def loss(self, h_theta, b):
        """The loss weighted per pixel as the MaskedDenoiser scales it: EDM's lambda(sigma) where
        the network sees the pixel, 1/sigma_data^2 (lambda at sigma -> infinity) where it does not.
        The weights depend only on sigma and A_further, so the minimiser is unchanged."""
        x0_pred = h_theta(b["x_t"], b["sigma_t"], mask=b["mask_further"])
        weight = torch.where(
            b["mask_further"] > 0,
            bcast(A.loss_weight(b["sigma_t"], 0.0), x0_pred),
            A.SIGMA_DATA**-2,
        )
        return masking_loss(x0_pred, b["x0"], b["mask"], weight)

    def sample_batch(self, h_theta, k, rows):
        """Batch k with one mask per sample from its own stream (seed 2^32 + seed + k, apart from
        the noise's), keeping a share (1 - p)(1 - delta) of the pixels as A_further did in
        training."""
        cfg, device, side = self.cfg, next(h_theta.parameters()).device, h_theta.resolution
        keep = torch.rand(
            len(rows), 1, side, side, generator=torch.Generator().manual_seed(2**32 + cfg.seed + k)
        )
        mask = (keep < (1 - cfg.mask_p) * (1 - cfg.mask_delta)).float().to(device)
        return A.sample(
            with_mask(h_theta, mask), self.noise(h_theta, k, rows), cfg.steps, cfg.sampler
        )


METHODS = {"algorithm1": A.Algorithm1, "noisy-only": NoisyOnly, "masking": Masking}


def main(argv=None):
    return A.main(argv, Config, lambda cfg: A.run(cfg, METHODS[cfg.method](cfg)))


if __name__ == "__main__":
    main()
