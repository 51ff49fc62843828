"""Creative diffusion models with Ambient Diffusion, in one file.

Reference implementation of Shah, Kalavasis, Klivans & Daras, "Does Generation Require Memorization?
Creative Diffusion Models using Ambient Diffusion" (ICML 2025).

Diffusion models trained on few images copy them. The paper's Algorithm 1 trains the low-noise part
of the diffusion (t < t_n) on the clean images with the usual loss (Eq. 3), and the high-noise part
(t > t_n) only on ONE fixed noisy copy x_tn of each image with Ambient Score Matching (Eq. 6). The
model never sees a clean image at high noise, so it cannot snap onto one there, and copying drops.

    python ambient.py --data cifar --n 300 --sigma-tn 0.4      # Algorithm 1 as the authors' code runs it
    python ambient.py --data cifar --n 300 --sigma-tn 0        # the DDPM baseline
    python ambient.py --data demo --preset tiny --resolution 16 --iters 2000 --device cpu

Defaults are the authors' released code (an EDM fork) wherever the paper leaves a choice open: the
loss weight, the log-normal noise split, Heun's sampler with 40 steps, Adam. NOTES.md lists every
difference from that code, with its reason.

The file reads top to bottom like the paper: schedule -> network -> losses -> data -> Algorithm 1
-> sampler -> memorization -> closed forms -> CLI. NOTES.md maps each equation to its function.
"""
import argparse
import contextlib
import copy
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ------------------------------------------------------------------------------------------------
# 1. Noise schedule (Eq. 1): x_t = sqrt(1 - sigma_t^2) x_0 + sigma_t z, data in [-1, 1].
#
# The paper writes the variance-preserving (VP) process. Its experiments (EDM code) quote noise in
# variance-exploding units, x = x_0 + sigma n. The two describe the same corruption up to a scale:
# dividing the VP x_t by sqrt(1 - sigma_t^2) gives x_0 + sigma n with sigma = sigma_t/sqrt(1-sigma_t^2).
# Command-line sigmas (--sigma-tn 0.4) are EDM units; the losses and Algorithm 1 use VP units.
# ------------------------------------------------------------------------------------------------
SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0  # EDM's noise range and time warp (EDM units)
SIGMA_DATA = 0.5  # EDM's prior on the data's standard deviation, for the network's scalings


def vp_from_edm(sigma):
    """EDM sigma -> VP sigma_t = sigma / sqrt(1 + sigma^2)."""
    return sigma / (1 + sigma ** 2) ** 0.5


def edm_from_vp(sigma_t):
    """VP sigma_t -> EDM sigma = sigma_t / sqrt(1 - sigma_t^2)."""
    return sigma_t / (1 - sigma_t ** 2) ** 0.5


def alpha(sigma_t):
    """The VP signal scale sqrt(1 - sigma_t^2); alpha^2 + sigma_t^2 = 1."""
    return (1 - sigma_t ** 2) ** 0.5


def sigma_at(t):
    """EDM sigma at diffusion time t in [0, 1], for --schedule algorithm1 only. The paper draws t
    uniformly but names no sigma(t); this project's assumption is EDM's sampling warp (rho = 7, from
    SIGMA_MIN to SIGMA_MAX), so uniform t spends most draws at low noise as EDM's sampler does."""
    lo, hi = SIGMA_MIN ** (1 / RHO), SIGMA_MAX ** (1 / RHO)
    return (lo + t * (hi - lo)) ** RHO


def time_at(sigma):
    """Inverse of sigma_at: the time t_n of an EDM noise level."""
    lo, hi = SIGMA_MIN ** (1 / RHO), SIGMA_MAX ** (1 / RHO)
    return (sigma ** (1 / RHO) - lo) / (hi - lo)


def bcast(s, x):
    """Per-sample scalars (B,) -> shape that broadcasts against x (B, ...)."""
    return s.reshape(-1, *[1] * (x.dim() - 1)) if torch.is_tensor(s) and s.dim() else s


def add_noise(x0, sigma_t, z):
    """Eq. 1 in VP units."""
    return bcast(alpha(sigma_t), x0) * x0 + bcast(sigma_t, x0) * z


def noise_further(x_tn, sigma_tn, sigma_t, z):
    """Algorithm 1, line 10: take the stored noisy x_tn (level sigma_tn) up to sigma_t > sigma_tn.
    x_t = sqrt((1-s_t^2)/(1-s_tn^2)) x_tn + sqrt((s_t^2-s_tn^2)/(1-s_tn^2)) z has, given x_0,
    exactly the law of Eq. 1: signal alpha_t x_0 and noise variance sigma_t^2."""
    scale = alpha(sigma_t) / alpha(sigma_tn)
    std = ((sigma_t ** 2 - sigma_tn ** 2) / (1 - sigma_tn ** 2)) ** 0.5
    return bcast(scale, x_tn) * x_tn + bcast(std, x_tn) * z


# ------------------------------------------------------------------------------------------------
# 2. Compact U-Net h_theta(x_t, t) that predicts x_0 (the x_0-prediction of Eq. 3).
#
# EDM's preconditioning (Karras et al. 2022, Table 1) keeps the network's input and target at unit
# variance at every noise level, so one network serves from sigma = 0.002 to 80:
#   h = c_skip x + c_out F(c_in x, c_noise), with x = x_t / alpha the EDM-units input.
# ------------------------------------------------------------------------------------------------
PRESETS = {  # channels, per-level multipliers, residual blocks per level, attention resolutions, dropout
    "tiny": dict(channels=16, mults=(1, 2, 4), blocks=1, attn_at=(4,), dropout=0.0),  # CPU: 0.69M at 16x16
    "paper": dict(channels=64, mults=(1, 2, 2), blocks=2, attn_at=(16,), dropout=0.05),  # GPU: 6.47M at 32x32
    # EDM's DDPM++ CIFAR-10 layout, the released code's network size: 53.6M here, 55.7M in EDM, whose
    # down- and up-sampling are residual blocks rather than one convolution.
    "edm": dict(channels=128, mults=(2, 2, 2), blocks=4, attn_at=(16,), dropout=0.05),
}


def groups(c):
    return math.gcd(32, c // 4)  # GroupNorm groups of at least 4 channels, at most 32 groups


class SelfAttention(nn.Module):
    def __init__(self, c, heads=1):
        super().__init__()
        self.heads, self.norm = heads, nn.GroupNorm(groups(c), c)
        self.qkv, self.proj = nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)
        nn.init.zeros_(self.proj.weight), nn.init.zeros_(self.proj.bias)  # starts as identity

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(B, C, H, W))


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, plus the noise embedding, twice, with a residual path."""

    def __init__(self, c_in, c_out, emb_dim, attention=False, dropout=0.0):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups(c_in), c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2, self.conv2 = nn.GroupNorm(groups(c_out), c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight), nn.init.zeros_(self.conv2.bias)  # block starts as identity
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.attention = SelfAttention(c_out) if attention else nn.Identity()
        self.dropout = dropout

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x))) + self.emb(emb)[:, :, None, None]
        h = self.conv2(F.dropout(F.silu(self.norm2(h)), self.dropout, self.training))
        return self.attention((self.skip(x) + h) * 0.5 ** 0.5)


class UNet(nn.Module):
    """F_theta: the raw network inside the preconditioning."""

    def __init__(self, resolution=32, channels=64, mults=(1, 2, 2), blocks=2, attn_at=(16,), dropout=0.0, num_classes=0,
                 in_channels=3):
        super().__init__()
        self.channels, self.num_classes, emb_dim = channels, num_classes, 4 * channels
        self.embed = nn.Sequential(nn.Linear(channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.down, self.up, skips, c, res = nn.ModuleList(), nn.ModuleList(), [channels], channels, resolution
        for level, m in enumerate(mults):
            for _ in range(blocks):
                self.down.append(ResBlock(c, channels * m, emb_dim, res in attn_at, dropout))
                c = channels * m
                skips.append(c)
            if level < len(mults) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(c, c, emb_dim, True, dropout), ResBlock(c, c, emb_dim, False, dropout)])
        for level, m in reversed(list(enumerate(mults))):
            for _ in range(blocks + 1):
                self.up.append(ResBlock(c + skips.pop(), channels * m, emb_dim, res in attn_at, dropout))
                c = channels * m
            if level > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(c, c, 3, padding=1)))
                res *= 2
        self.norm_out, self.conv_out = nn.GroupNorm(groups(c), c), nn.Conv2d(c, 3, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight), nn.init.zeros_(self.conv_out.bias)
        # Class conditioning (Table 1's ImageNet rows): a learned vector per class joins the noise
        # embedding. Index num_classes means "no class": classifier-free guidance trains on it.
        self.label_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None

    def forward(self, x, c_noise, labels=None):
        # Sinusoidal embedding of c_noise = ln(sigma)/4, as EDM feeds its DDPM++ network.
        half = self.channels // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=x.device) / (half - 1))
        angles = c_noise[:, None].float() * freqs[None]
        emb = self.embed(torch.cat([angles.cos(), angles.sin()], dim=1))
        if self.label_embed is not None:
            no_class = torch.full_like(c_noise, self.num_classes).long()
            emb = emb + self.label_embed(labels if labels is not None else no_class)
        h = self.conv_in(x)
        skips = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            skips.append(h)
        for layer in self.mid:
            h = layer(h, emb)
        for layer in self.up:
            h = layer(torch.cat([h, skips.pop()], 1), emb) if isinstance(layer, ResBlock) else layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Denoiser(nn.Module):
    """h_theta(x_t, sigma_t) -> estimate of x_0, with VP inputs as in the paper.
    mask_input: the masking baseline's network, which also reads a 0/1 map of the pixels it sees."""

    def __init__(self, resolution=32, preset="tiny", num_classes=0, mask_input=False, channels_last=False, **overrides):
        super().__init__()
        self.resolution, self.levels, self.mask_input = resolution, len(PRESETS[preset]["mults"]), mask_input
        self.net = UNet(resolution, **{**PRESETS[preset], **overrides}, num_classes=num_classes,
                        in_channels=4 if mask_input else 3)
        # channels_last: NHWC activations and weights, the layout GPU tensor cores read without transposes.
        self.channels_last = channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(self, x_t, sigma_t, labels=None, mask=None):
        sigma_t = torch.as_tensor(sigma_t, dtype=x_t.dtype, device=x_t.device).expand(x_t.shape[0])
        sigma = edm_from_vp(sigma_t)
        x = x_t / bcast(alpha(sigma_t), x_t)  # = x_0 + sigma n: EDM units
        c_skip = SIGMA_DATA ** 2 / (sigma ** 2 + SIGMA_DATA ** 2)
        c_out = sigma * SIGMA_DATA / (sigma ** 2 + SIGMA_DATA ** 2) ** 0.5
        c_in = 1 / (sigma ** 2 + SIGMA_DATA ** 2) ** 0.5
        net_in = bcast(c_in, x) * x
        if self.mask_input:  # a hidden pixel reads 0, as does a visible one at 0: the map tells them apart
            if mask is None:
                raise ValueError("this network was trained on masked images: pass the mask of visible pixels")
            net_in = torch.cat([net_in, mask.to(x.dtype).expand(len(x), 1, *x.shape[2:])], 1)
        if self.channels_last:  # only then: a layout copy changes the convolutions' rounding, and so a run
            net_in = net_in.contiguous(memory_format=torch.channels_last)
        F_x = self.net(net_in, sigma.log() / 4, labels).to(x.dtype)
        D = bcast(c_skip, x) * x + bcast(c_out, x) * F_x
        if self.mask_input:  # a hidden pixel carries no information, as at sigma = infinity. EDM's limits there,
            # c_skip = 0 and c_out = sigma_data, let it take any value at every noise level (c_out -> 0 would not)
            D = torch.where(mask > 0, D, SIGMA_DATA * F_x)
        return D


# ------------------------------------------------------------------------------------------------
# 3. Losses: DDPM (Eq. 3) below t_n, Ambient Score Matching (Eq. 6, Algorithm 1 line 11) above it.
#
# Why Eq. 6 works (Lemma C.1). Write x_t = (alpha_t/alpha_tn) x_tn + noise. The Gaussian noise
# from x_0 to x_t splits into the part up to t_n and the rest, so given x_t
#     E[x_tn | x_t] = sigma_tn^2 alpha_t / (sigma_t^2 alpha_tn) * x_t
#                   + (sigma_t^2 - sigma_tn^2) / (sigma_t^2 alpha_tn) * E[x_0 | x_t].
# x_tn is observed, x_0 is not: regress x_tn on x_t through this affine map of h_theta. The
# minimiser of E|c_h h + c_x x_t - x_tn|^2 is h = E[x_0 | x_t] (the clean-data optimum), although
# no clean image appears in the loss. At sigma_tn = 0 the map is h itself and Eq. 6 is Eq. 3.
#
# Weighting. Both losses are per-sample mean squared errors as written in the paper; training
# multiplies them by loss_weight. The authors' released code (training/loss.py) weights the residual
# in EDM units by EDM's lambda(sigma) = (sigma^2 + s_d^2) / (sigma s_d)^2, and nothing else; in VP
# units that is lambda / alpha_tn^2 (`released`, the default). The expected ambient loss is
# c_h^2 E|h - E[x_0|x_t]|^2 + const, so that weight pulls on the x_0 error c_h^2 times less than EDM
# does, fading to nothing just above t_n. `x0` divides by c_h^2 to undo that: each level then pulls on
# the x_0 error as in EDM, at the price of a weight that grows without bound near t_n. NOTES.md
# compares the two; at demo scale they give very different copy rates.
# ------------------------------------------------------------------------------------------------
def ddpm_loss(x0_pred, x0):
    """Eq. 3: |h_theta(x_t, t) - x_0|^2, per sample."""
    return (x0_pred - x0).square().flatten(1).mean(1)


def ambient_coefficients(sigma_t, sigma_tn):
    """(c_h, c_x) with E[x_tn | x_t] = c_h E[x_0 | x_t] + c_x x_t (Lemma C.1), VP units."""
    c_h = (sigma_t ** 2 - sigma_tn ** 2) / (sigma_t ** 2 * alpha(sigma_tn))
    c_x = sigma_tn ** 2 * alpha(sigma_t) / (sigma_t ** 2 * alpha(sigma_tn))
    return c_h, c_x


def ambient_loss(x0_pred, x_t, x_tn, sigma_t, sigma_tn):
    """Eq. 6: |c_h h_theta(x_t, t) + c_x x_t - x_tn|^2, per sample; needs sigma_t > sigma_tn."""
    c_h, c_x = ambient_coefficients(sigma_t, sigma_tn)
    return (bcast(c_h, x_t) * x0_pred + bcast(c_x, x_t) * x_t - x_tn).square().flatten(1).mean(1)


AMBIENT_WEIGHTS = ("released", "x0")


def loss_weight(sigma_t, sigma_tn, kind="released"):
    """Per-sample weight of Eq. 6's VP residual; at sigma_tn = 0 both kinds are EDM's lambda(sigma).
    released: lambda(sigma) on the EDM-units residual, which is the VP one divided by alpha_tn.
    x0: lambda(sigma) / c_h^2. c_h -> 0 as sigma_t -> sigma_tn, and float32 can round sigma_t onto
    sigma_tn (c_h = 0, an infinite weight): c_h is floored at 1e-4, which acts only in that sliver."""
    sigma = edm_from_vp(sigma_t)
    lam = (sigma ** 2 + SIGMA_DATA ** 2) / (sigma * SIGMA_DATA) ** 2
    if kind == "released":
        return lam / alpha(torch.as_tensor(sigma_tn)) ** 2
    c_h, _ = ambient_coefficients(sigma_t, sigma_tn)
    return lam / torch.as_tensor(c_h).clamp_min(1e-4) ** 2


def ambient_eps_v_targets(x_t, x_tn, sigma_t, sigma_tn):
    """Lemma C.2: Eq. 6 for eps- and v-prediction networks. With x_0 = (x_t - sigma_t eps)/alpha_t
    = alpha_t x_t - sigma_t v, Eq. 6's residual is -(c_h sigma_t / alpha_t) (eps_pred - eps_target)
    and -c_h sigma_t (v_pred - v_target): plain regression onto targets made of x_t and x_tn.
    At sigma_tn = 0 they are eps and v."""
    c_h, c_x = ambient_coefficients(sigma_t, sigma_tn)
    a, s, c_h, c_x = (bcast(torch.as_tensor(v), x_t) for v in (alpha(sigma_t), sigma_t, c_h, c_x))
    eps_target = ((c_h + a * c_x) * x_t - a * x_tn) / (c_h * s)
    v_target = ((c_h * a + c_x) * x_t - x_tn) / (c_h * s)
    return eps_target, v_target


# Table 2's inpainting baseline, Ambient Diffusion (Daras et al. 2023): every training image is
# seen only through a fixed mask A (a pixel is missing with probability p). Training hides more:
# A_further keeps each visible pixel with probability 1 - delta, the network sees A_further x_t and
# A_further, and the loss covers every pixel of A, including those A_further just hid. Given
# A_further, a hidden pixel is in A with a probability that does not depend on the image, so the
# minimiser is E[x_0 | A_further x_t, A_further] on every pixel. With delta = 0 the pixels the
# network cannot see are never in the loss, and nothing teaches it to fill them in.
def masking_loss(x0_pred, x0, mask, weight=1.0):
    """|A (h_theta(A_further x_t, A_further) - x_0)|^2, per sample, for a 0/1 mask A, optionally weighted
    per pixel. `where`, not a product, so that a hidden pixel's value never enters, not even as 0 * NaN."""
    return (weight * torch.where(mask > 0, x0_pred - x0, 0).square()).flatten(1).mean(1)


# ------------------------------------------------------------------------------------------------
# 4. Data: images as uint8 (N, H, W, 3) -> float tensors in [-1, 1], shape (N, 3, H, W).
# ------------------------------------------------------------------------------------------------
DEMO_FILE = Path(__file__).with_name("cifar10_demo.npz")
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


class UserError(Exception):
    """Bad input: printed as one line, exit code 2, no traceback."""


def load_images(spec, data_dir="data"):
    """--data cifar | demo | file.npz | folder of images  ->  uint8 (N, H, W, 3)."""
    if spec == "demo":
        return np.load(DEMO_FILE)["images"]
    if spec == "cifar":
        return load_cifar10(data_dir)
    path = Path(spec)
    if path.is_dir():
        return load_image_folder(path)
    if path.suffix == ".npz" and path.is_file():
        try:
            images = np.load(path)["images"]
        except Exception as e:  # corrupt archive or no 'images' key
            raise UserError(f"cannot read images from {path} ({type(e).__name__}: {e}); it needs a uint8 array "
                            "'images' of shape N x H x W x 3")
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise UserError(f"{path}: 'images' is {images.dtype} {images.shape}; expected uint8 N x H x W x 3")
        return images
    if path.suffix or os.sep in spec:
        raise UserError(f"cannot read --data {spec}: no such .npz file or image folder")
    raise UserError(f"unknown dataset '{spec}': use cifar, demo, a .npz file with 'images', or a folder of images")


def load_labels(spec, data_dir="data"):
    """Class labels for --cond class: CIFAR-10's, or an .npz's int array 'labels'. Folders have none."""
    if spec == "cifar":
        return load_cifar10(data_dir, labels=True)
    path = DEMO_FILE if spec == "demo" else Path(spec)
    if path.suffix == ".npz":
        with np.load(path) as f:
            if "labels" in f.files:
                return f["labels"].astype(np.int64)
    raise UserError(f"--cond class and --n-per-class need class labels and {spec} has none; "
                    "use an .npz with an int array 'labels'")


def load_cifar10(data_dir, labels=False):
    import socket
    import torchvision
    socket.setdefaulttimeout(20)  # offline machines should fail in seconds, not hang
    try:  # download=True only downloads when the archive is missing; a placed archive is extracted
        ds = torchvision.datasets.CIFAR10(data_dir, train=True, download=True)
    except Exception as e:
        raise UserError(f"CIFAR-10 is not in {data_dir}/cifar-10-batches-py and could not be downloaded "
                        f"({type(e).__name__}). Place {CIFAR_URL.rsplit('/', 1)[1]} from {CIFAR_URL} in "
                        f"{data_dir}/ (or pass --data-dir), or use --data demo")
    return np.asarray(ds.targets, dtype=np.int64) if labels else np.asarray(ds.data)


def load_image_folder(path):
    from PIL import Image
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".webp"))
    if not files:
        raise UserError(f"no .png/.jpg/.jpeg/.bmp/.webp images in folder {path}")
    try:
        images = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    except OSError as e:
        raise UserError(f"cannot read image in {path}: {e}")
    if len({im.shape for im in images}) > 1:
        raise UserError(f"images in {path} differ in size; resize them to one size first")
    return np.stack(images)


def prepare(images, resolution=None):
    """uint8 NHWC -> float NCHW in [-1, 1], area-downsampled to `resolution` if given."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    if resolution and resolution != x.shape[-1]:
        x = F.interpolate(x, size=(resolution, resolution), mode="area")
    return x


def choose_subset(num_images, n, seed, labels=None, per_class=None):
    """The paper's seeded random subset of n training images (n = 300 / 1000 / 3000), or of
    per_class images from every class (Table 1's ImageNet rows: 5 or 15 per class)."""
    if per_class is not None:
        classes, counts = np.unique(labels, return_counts=True)
        if counts.min() < per_class:
            raise UserError(f"--n-per-class {per_class}: class {classes[counts.argmin()]} has only {counts.min()} "
                            f"images; pass --n-per-class {counts.min()} or less")
        rng = np.random.default_rng(seed)
        picks = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in classes]
        return np.sort(np.concatenate(picks))
    if n is None:
        return np.arange(num_images)
    if n > num_images:
        raise UserError(f"--n {n} is larger than the dataset ({num_images} images); pass --n {num_images} or less")
    return np.sort(np.random.default_rng(seed).choice(num_images, n, replace=False))


# ------------------------------------------------------------------------------------------------
# 5. Algorithm 1. Line 1: draw ONE noisy copy x_tn of every training image, once, from a seeded
# generator; it is saved with the checkpoint and never redrawn. Lines 3-10: draw a batch, split
# it at t_n, noise it. Two ways to pick the noise levels, because the paper's text and its code
# differ (NOTES.md compares them):
#   algorithm1  lines 3-16 as written: each sample is a clean image or its noisy copy with equal
#               probability (uniform over S and S_tn); clean gets t ~ U(0, t_n), noisy t ~ U(t_n, T).
#   edm         the released code behind Table 1: ln sigma ~ N(-1.2, 1.2^2) per sample; clean when
#               sigma < sigma_tn, else the fixed noisy copy. The clean share is P(sigma < sigma_tn).
# With sigma_tn = 0 there is no split and nothing noisy: t_n = 0, every sample is clean, drawn over
# the whole range, with the DDPM loss. That is the baseline, exactly. The masking baseline takes the
# same path at sigma_tn = 0, with masked images for S and one more mask drawn per batch.
# ------------------------------------------------------------------------------------------------
def make_noisy_copies(S, sigma_tn, seed):
    """Line 1: S_tn = {sqrt(1 - sigma_tn^2) x_0 + sigma_tn eps}, one draw per image (VP units)."""
    eps = torch.randn(S.shape, generator=torch.Generator().manual_seed(seed + 1))
    return add_noise(S, torch.as_tensor(sigma_tn, dtype=S.dtype), eps)


def make_masks(shape, mask_p, seed):
    """The masking baseline's line 1: one fixed mask A per image, (N, 1, H, W), 0 = missing. A pixel
    loses all three channels at once, with probability mask_p, as in Ambient Diffusion's CIFAR-10 runs."""
    keep = torch.rand(shape[0], 1, *shape[2:], generator=torch.Generator().manual_seed(seed + 3))
    return (keep >= mask_p).float()


def observed(S, masks):
    """A x_0: all the masking baseline is given. Hidden pixels are 0, whatever S holds there."""
    return torch.where(masks > 0, S, 0)


def algorithm1_batch(S, S_tn, sigma_tn_edm, batch, gen, schedule="edm", flip=False, noisy_only=False,
                     labels=None, null_label=None, label_dropout=0.0, masks=None, mask_delta=0.0):
    """Lines 3-10. Returns idx, x0, x_tn, x_t, sigma_t (VP), sigma (EDM) and `noisy` (the high-noise branch).
    noisy_only: the Ambient Tweedie baseline (Table 2), every sample noisy and above t_n.
    labels: the images' classes, each replaced by null_label with probability label_dropout.
    masks: the masking baseline (sigma_tn = 0, S = A x_0): x_t is hidden outside mask_further, a copy
    of the image's mask A with a further share mask_delta of its pixels dropped."""
    dev = S.device
    idx = torch.randint(len(S), (batch,), generator=gen, device=dev)
    x0, x_tn, mask = S[idx], S_tn[idx], None if masks is None else masks[idx]
    if flip:  # the same mirror for an image, its noisy copy and its mask, so x_tn stays a noisy x_0
        mirror = bcast(torch.rand(batch, generator=gen, device=dev) < 0.5, x0)
        x0, x_tn = torch.where(mirror, x0.flip(-1), x0), torch.where(mirror, x_tn.flip(-1), x_tn)
        mask = None if mask is None else torch.where(mirror, mask.flip(-1), mask)
    u = torch.rand(batch, generator=gen, device=dev)
    if schedule == "algorithm1":
        t_n = time_at(sigma_tn_edm) if sigma_tn_edm > 0 else 0.0
        noisy = ((torch.rand(batch, generator=gen, device=dev) < 0.5) | noisy_only) & (sigma_tn_edm > 0)
        t = torch.where(noisy, t_n + u * (1 - t_n), u * (t_n if sigma_tn_edm > 0 else 1.0))
        sigma = sigma_at(t)
        sigma = torch.where(noisy, sigma.clamp_min(sigma_tn_edm), sigma)  # float32 may round below sigma_tn
    elif schedule == "edm":
        # Clamped to EDM's range (it moves 1.6e-5 of the draws) so that alpha stays representable in float32.
        z = torch.randn(batch, generator=gen, device=dev)
        if noisy_only:  # ln sigma ~ N(-1.2, 1.2^2) conditioned on sigma >= sigma_tn: invert the normal CDF
            lo = torch.special.ndtr(torch.tensor((math.log(sigma_tn_edm) + 1.2) / 1.2, device=dev))
            z = torch.special.ndtri(lo + (1 - lo) * torch.special.ndtr(z))
        sigma = (-1.2 + 1.2 * z).exp().clamp(SIGMA_MIN, SIGMA_MAX)
        noisy = sigma >= sigma_tn_edm if sigma_tn_edm > 0 else torch.zeros_like(sigma, dtype=torch.bool)
    else:
        raise ValueError(schedule)
    sigma_t, sigma_tn = vp_from_edm(sigma), vp_from_edm(torch.tensor(float(sigma_tn_edm), device=dev))
    z = torch.randn(x0.shape, generator=gen, device=dev)
    x_t_noisy = noise_further(x_tn, sigma_tn, sigma_t.maximum(sigma_tn), z)  # maximum: no NaN in the unused half
    x_t = torch.where(bcast(noisy, x0), x_t_noisy, add_noise(x0, sigma_t, z))
    y = mask_further = None
    if labels is not None:
        y = torch.where(torch.rand(batch, generator=gen, device=dev) < label_dropout, null_label, labels[idx])
    if mask is not None:
        mask_further = mask * (torch.rand(mask.shape, generator=gen, device=dev) >= mask_delta)
        x_t = x_t * mask_further
    return dict(idx=idx, x0=x0, x_tn=x_tn, x_t=x_t, sigma_t=sigma_t, sigma=sigma, sigma_tn=sigma_tn, noisy=noisy,
                labels=y, mask=mask, mask_further=mask_further)


def algorithm1_loss(h_theta, b, weight="released"):
    """Line 11: Eq. 6 on the noisy branch, Eq. 3 on the clean one, weighted, per sample. Eq. 3 is
    Eq. 6 at sigma_tn = 0 with x_0 in place of x_tn (bit for bit, tested), so one call serves both,
    and a clean image never reaches a noisy sample's loss or gradient. Masked batches take the
    masking loss instead, weighted per pixel as the Denoiser scales it: EDM's lambda(sigma) where the
    network sees the pixel, 1/sigma_data^2 (lambda at sigma -> infinity) where it does not. The weights
    depend only on sigma and A_further, so the minimiser is unchanged."""
    if b.get("mask") is not None:
        x0_pred = h_theta(b["x_t"], b["sigma_t"], b["labels"], mask=b["mask_further"])
        pixel_weight = torch.where(b["mask_further"] > 0, bcast(loss_weight(b["sigma_t"], 0.0), x0_pred), SIGMA_DATA ** -2)
        return masking_loss(x0_pred, b["x0"], b["mask"], pixel_weight)
    noisy = b["noisy"]
    sigma_tn = torch.where(noisy, b["sigma_tn"], torch.zeros_like(b["sigma_t"]))
    target = torch.where(bcast(noisy, b["x0"]), b["x_tn"], b["x0"])
    loss = ambient_loss(h_theta(b["x_t"], b["sigma_t"], b["labels"]), b["x_t"], target, b["sigma_t"], sigma_tn)
    return loss_weight(b["sigma_t"], sigma_tn, weight) * loss


# ------------------------------------------------------------------------------------------------
# 6. Training loop: the released recipe (Adam, EDM's EMA), atomic checkpoints.
# ------------------------------------------------------------------------------------------------
RUN_KEYS = ("data", "n", "n_per_class", "method", "mask_p", "mask_delta", "cond", "label_dropout", "sigma_tn",
            "schedule", "ambient_weight", "preset", "dropout", "resolution", "batch", "lr", "optimizer", "lr_rampup",
            "flip", "seed")


def save_atomic(obj, path):
    """torch.save to a temp file, then rename: a run killed mid-write keeps its last checkpoint."""
    tmp = Path(str(path) + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def autocast(device, precision):
    """--precision bf16: the network under bfloat16 autocast; weights, optimizer and losses stay float32."""
    return torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16")


def compiled(module, mode="none", replay=True):
    """--compile: torch.compile fuses the network's elementwise work into few kernels; `cudagraphs`
    (torch's reduce-overhead mode) also replays each training step as one CUDA graph, which removes
    the per-kernel launch cost that dominates a small network on a fast GPU. replay=False (sampling)
    compiles without graph replay: guidance reads two outputs of one step, and a replay would
    overwrite the first with the second."""
    if mode == "none":
        return module
    return torch.compile(module, mode="reduce-overhead" if mode == "cudagraphs" and replay else "default")


@contextlib.contextmanager
def compile_errors(active):
    """torch.compile builds its kernels on the first call; a machine that cannot (no compiler, no
    Triton, no Python headers) gets one line instead of a compiler traceback."""
    try:
        yield
    except Exception as e:
        if not active:
            raise
        raise UserError(f"--compile could not build the kernels ({type(e).__name__}: {str(e).strip()[:160]}); "
                        "run without --compile") from e


def distributed(backend="gloo"):
    """(rank, world size). Under torchrun (WORLD_SIZE > 1) the first call joins the process group."""
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return 0, 1
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def global_rng(device, state=None):
    """Get, or with `state` set, the state of the global generator that dropout draws from on `device`."""
    cuda = device.type == "cuda"
    if state is not None:
        return torch.cuda.set_rng_state(state, device) if cuda else torch.set_rng_state(state)
    return torch.cuda.get_rng_state(device) if cuda else torch.get_rng_state()


OPTIMIZERS = ("adam", "adamw")


def make_optimizer(params, cfg, pixels=1):
    """adam: the released code's torch.optim.Adam with weight decay 0.01 added to the gradient (an L2
    penalty, EDM's default); adamw: the decay applied to the weights directly (Loshchilov & Hutter).
    The released loss sums over the `pixels` values of an image where ours averages. Adam's steps do
    not see that scale, but an L2 term added to the gradient does: dividing it by `pixels` keeps the
    released balance between the loss and the decay. fused: one kernel for all tensors (4 ms of the
    tiny CPU step instead of 16)."""
    adamw = cfg.get("optimizer") == "adamw"
    return (torch.optim.AdamW if adamw else torch.optim.Adam)(
        params, lr=cfg["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01 if adamw else 0.01 / pixels, fused=True)


def learning_rate(cfg, images_seen):
    """EDM's warm-up: the rate grows linearly over the first lr_rampup million images (0: none)."""
    ramp = cfg.get("lr_rampup", 0) * 1e6
    return cfg["lr"] * min(images_seen / ramp, 1) if ramp else cfg["lr"]


@torch.no_grad()
def ema_update(ema, net, images_seen, batch):
    """EDM's EMA of the weights: half-life 500k images, shortened to 5% of the images seen before this
    step while that is less, so that short runs average over their own recent past."""
    halflife = min(500_000, 0.05 * images_seen)
    beta = 0.5 ** (batch / max(halflife, 1e-8))
    for p_ema, p in zip(ema.parameters(), net.parameters()):
        p_ema.lerp_(p, 1 - beta)


def train(h_theta, S, S_tn, cfg, out, log=print, state=None, labels=None, masks=None):
    """Lines 2-16 of Algorithm 1. Returns the EMA copy of h_theta. `state` resumes a checkpoint.
    masks: the masking baseline's fixed masks A (S is then A x_0).
    With several processes every rank draws the same global batch and trains on its slice of it;
    DDP averages the gradients, so a step equals the single-process step on the whole batch."""
    device, out, (rank, world) = S.device, Path(out), distributed()
    model = compiled(nn.parallel.DistributedDataParallel(h_theta) if world > 1 else h_theta, cfg.get("compile", "none"))
    opt = make_optimizer(h_theta.parameters(), cfg, S[0].numel())
    ema = copy.deepcopy(h_theta).requires_grad_(False).eval()
    gen = torch.Generator(device).manual_seed(cfg["seed"] + 2)
    step = 0
    if state is not None:
        h_theta.load_state_dict(state["net"]), ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        if state["rng"].numel() != gen.get_state().numel():
            raise UserError("--resume: the checkpoint's random state is from another device type; resume on it")
        gen.set_state(state["rng"].cpu())
        if "dropout_rng" in state:  # dropout draws from torch's global generator
            global_rng(device, state["dropout_rng"])
        step = state["step"]

    def checkpoint():
        save_atomic(dict(net=h_theta.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(), step=step,
                         rng=gen.get_state(), dropout_rng=global_rng(device), S_tn=S_tn, masks=masks, config=cfg),
                    out / "checkpoint.pt")

    t0, first = time.time(), step
    while step < cfg["iters"]:
        b = algorithm1_batch(S, S_tn, cfg["sigma_tn"], cfg["batch"], gen, cfg["schedule"], cfg["flip"],
                             cfg.get("method") == "noisy-only", labels, cfg.get("num_classes"),
                             cfg.get("label_dropout", 0), masks, cfg.get("mask_delta") or 0.0)
        if world > 1:
            b = {k: v.chunk(world)[rank] if torch.is_tensor(v) and v.dim() else v for k, v in b.items()}
        with compile_errors(step == first and cfg.get("compile", "none") != "none"):
            with autocast(device, cfg.get("precision")):
                loss = algorithm1_loss(model, b, cfg.get("ambient_weight", "released")).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
        if cfg.get("lr_rampup"):
            for group in opt.param_groups:
                group["lr"] = learning_rate(cfg, step * cfg["batch"])
        opt.step()
        ema_update(ema, h_theta, step * cfg["batch"], cfg["batch"])
        step += 1
        if rank == 0 and (step % cfg["log_every"] == 0 or step == cfg["iters"]):
            rate = (step - first) * cfg["batch"] / (time.time() - t0)
            eta = (cfg["iters"] - step) * cfg["batch"] / rate
            log(f"step {step}/{cfg['iters']}  loss {loss.item():.4f}  {rate:.0f} img/s  eta {eta / 60:.1f} min")
        if rank == 0 and (step % cfg["ckpt_every"] == 0 or step == cfg["iters"]):
            checkpoint()
    if rank == 0 and state is None and cfg["iters"] == 0:
        checkpoint()
    return ema


# ------------------------------------------------------------------------------------------------
# 7. Sampler (Eq. 5): the probability-flow ODE, integrated in EDM units where it reads
# dx/dsigma = (x - D(x; sigma)) / sigma, with D(x; sigma) = h_theta(alpha x, sigma_t). Dividing the
# VP x_t by alpha turns the VP ODE into this one, so both give the same samples. Steps follow
# EDM's rho = 7 spacing; Euler by default, Heun (EDM's second-order correction) as an option.
#
# To stop at sigma_stop > 0 (Lemma 4.1 stops at t_n), integrate in s = sqrt(sigma^2 - sigma_stop^2),
# the noise left above sigma_stop. The same ODE then reads dx/ds = (x - E[x_stop | x]) / s with
# E[x_stop | x] = r x + (1 - r) D, r = sigma_stop^2 / sigma^2 (Lemma C.1 in EDM units): EDM's form
# for the data at level sigma_stop, so the last Euler step to s = 0 lands on E[x_stop | x].
# ------------------------------------------------------------------------------------------------
def sigma_steps(steps, sigma_max=SIGMA_MAX):
    """EDM's rho = 7 grid from sigma_max down to SIGMA_MIN, then 0."""
    i = torch.arange(steps, dtype=torch.float64) / max(steps - 1, 1)
    grid = (sigma_max ** (1 / RHO) + i * (SIGMA_MIN ** (1 / RHO) - sigma_max ** (1 / RHO))) ** RHO
    return torch.cat([grid, torch.zeros(1, dtype=torch.float64)])


@torch.no_grad()
def sample(h_theta, shape, steps=40, sampler="euler", seed=0, sigma_stop=0.0, device="cpu", dtype=torch.float32):
    """Integrate Eq. 5 from sigma = 80 down to sigma_stop. Returns EDM units: x_0 + sigma_stop n."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = (x * SIGMA_MAX).to(device, dtype)  # the same noise for a seed on every device

    def x_stop_pred(x, s):  # E[x_stop | x] at the noise level sigma = sqrt(s^2 + sigma_stop^2)
        sigma = torch.full((x.shape[0],), (s ** 2 + sigma_stop ** 2) ** 0.5, dtype=x.dtype, device=x.device)
        D = h_theta(x * bcast(alpha(vp_from_edm(sigma)), x), vp_from_edm(sigma))
        r = sigma_stop ** 2 / (s ** 2 + sigma_stop ** 2)
        return r * x + (1 - r) * D

    s_grid = sigma_steps(steps, (SIGMA_MAX ** 2 - sigma_stop ** 2) ** 0.5).tolist()
    for s, s_next in zip(s_grid[:-1], s_grid[1:]):
        d = (x - x_stop_pred(x, s)) / s
        x_next = x + (s_next - s) * d
        if sampler == "heun" and s_next > 0:  # trapezoid rule, except on the last step: no slope at s = 0
            x_next = x + (s_next - s) * (d + (x_next - x_stop_pred(x_next, s_next)) / s_next) / 2
        x = x_next
    return x


def conditioned(h_theta, labels=None, guidance=1.0, mask=None):
    """h_theta(x_t, sigma_t) with its other inputs bound.
    labels: classifier-free guidance (Ho & Salimans 2022) mixes the conditional and unconditional
    predictions, h_u + w (h_c - h_u); w = 1 is plain conditional.
    mask: Ambient Diffusion's fixed-mask sampler for the masking baseline. Its network never saw a
    whole image, so each sample keeps one mask, drawn like A_further, for the whole ODE; the network
    sees those pixels of x_t and predicts all of x_0."""
    if labels is None and mask is None:
        return h_theta
    null = None if labels is None else torch.full_like(labels, h_theta.net.num_classes)

    def h(x_t, sigma_t):
        x_in = x_t if mask is None else x_t * mask
        cond = h_theta(x_in, sigma_t, labels, mask=mask)
        if labels is None or guidance == 1:
            return cond
        uncond = h_theta(x_in, sigma_t, null, mask=mask)
        return uncond + guidance * (cond - uncond)

    return h


@torch.no_grad()
def generate(h_theta, count, batch=256, log=print, sigma_stop=0.0, labels=None, guidance=1.0, mask_keep=None, **kw):
    """`count` samples from the noise of seeds seed, seed+1, ... (one per batch), clamped to [-1, 1].
    sigma_stop > 0 (a model that never trained below t_n): stop the ODE there and finish with the
    network's own E[x_0 | x_tn], Tweedie's one-step denoiser. labels: one class per sample.
    mask_keep: the masking baseline's share of visible pixels, (1 - p)(1 - delta) as in training."""
    shape, seed, out = (3, h_theta.resolution, h_theta.resolution), kw.pop("seed", 0), []
    device = kw.get("device", "cpu")
    for k, start in enumerate(range(0, count, batch)):
        n, mask = min(batch, count - start), None
        if mask_keep is not None:  # its own stream (seed + 2^32), apart from the noise's
            keep = torch.rand(n, 1, *shape[1:], generator=torch.Generator().manual_seed(2 ** 32 + seed + k))
            mask = (keep < mask_keep).float().to(device)
        h = conditioned(h_theta, None if labels is None else labels[start:start + n].to(device), guidance, mask)
        x = sample(h, (n, *shape), seed=seed + k, sigma_stop=sigma_stop, **kw)
        if sigma_stop > 0:
            s_vp = torch.full((len(x),), vp_from_edm(sigma_stop), dtype=x.dtype, device=x.device)
            x = h(x * bcast(alpha(s_vp), x), s_vp)
        out.append(x.clamp(-1, 1).cpu())
        log(f"sampled {start + len(out[-1])}/{count}")
    return torch.cat(out)


# ------------------------------------------------------------------------------------------------
# 8. Memorization, without DINOv2. The paper scores a sample by the DINOv2 cosine to its nearest
# training image (eval_memorization.py). Pixels give two weight-free stand-ins:
#   (a) the cosine of mean-centred pixels (a correlation; it ignores brightness shifts);
#   (b) d1/d2, the L2 distance to the nearest training image over the second-nearest. A copy sits
#       far closer to one image than to any other; Gu et al. (2023) count a copy when d1/d2 < 1/3.
# ------------------------------------------------------------------------------------------------
COSINE_THRESHOLDS = (0.9, 0.925, 0.95)  # Table 1's CIFAR-10 thresholds
COPY_RATIO = 1 / 3


def nearest_neighbours(samples, train, chunk=1024):
    """For each sample: best centred cosine and its index; d1/d2 and the L2 nearest index."""
    t = train.flatten(1).float()
    tc = F.normalize(t - t.mean(1, keepdim=True), dim=1)
    cos, cos_idx, ratio, l2_idx = [], [], [], []
    for s in samples.flatten(1).float().split(chunk):
        best = (F.normalize(s - s.mean(1, keepdim=True), dim=1) @ tc.T).max(1)
        d = torch.cdist(s, t).topk(min(2, len(t)), dim=1, largest=False)
        cos.append(best.values), cos_idx.append(best.indices), l2_idx.append(d.indices[:, 0])
        ratio.append(d.values[:, 0] / d.values[:, -1].clamp_min(1e-12))
    return dict(cosine=torch.cat(cos), cosine_idx=torch.cat(cos_idx), ratio=torch.cat(ratio), l2_idx=torch.cat(l2_idx))


def memorization_report(samples, train):
    nn_ = nearest_neighbours(samples, train)
    cos, ratio = nn_["cosine"], nn_["ratio"]
    report = {"samples": len(samples), "train_images": len(train),
              "cosine_mean": cos.mean().item(), "cosine_median": cos.median().item(),
              **{f"cosine_above_{th}": (cos > th).float().mean().item() for th in COSINE_THRESHOLDS},
              "ratio_median": ratio.median().item(), "copy_rate": (ratio < COPY_RATIO).float().mean().item()}
    return report, nn_


def save_neighbour_grid(samples, train, idx, path, pairs=32, per_row=8, upscale=4):
    """Each pair: a sample (left) beside its nearest training image (right)."""
    from torchvision.utils import save_image
    k = min(pairs, len(samples))
    tiles = torch.stack([samples[:k], train[idx[:k]].to(samples)], 1).flatten(0, 1)  # s0, n0, s1, n1, ...
    tiles = F.pad(F.interpolate(tiles, scale_factor=upscale), (0, 0, 0, upscale * 2), value=1)
    save_image((tiles + 1) / 2, path, nrow=2 * per_row, padding=2, pad_value=1)


# ------------------------------------------------------------------------------------------------
# 9. Closed forms: the optimal denoisers the theory is about, for tests and the tutorial.
# ------------------------------------------------------------------------------------------------
def ambient_optimal_denoiser(S_tn, sigma_tn):
    """Lemma 4.1: the minimiser of Eq. 6 when the data are the finite set S_tn (VP units), t > t_n.
    Given x_t, x_tn is one of S_tn with posterior weights from N(x_t; (alpha_t/alpha_tn) x_tn, s^2),
    s^2 = (sigma_t^2 - sigma_tn^2)/(1 - sigma_tn^2); E[x_0 | x_t] follows from Lemma C.1's map.
    With sigma_tn = 0 and S_tn = S it is the empirical optimum of Eq. 3 (Section 2.2)."""
    points = S_tn.flatten(1)
    sq_norms = points.square().sum(1)

    def h(x_t, sigma_t):
        sigma_t = torch.as_tensor(sigma_t, dtype=x_t.dtype).expand(x_t.shape[0])
        scale, s2 = alpha(sigma_t) / alpha(sigma_tn), (sigma_t ** 2 - sigma_tn ** 2) / (1 - sigma_tn ** 2)
        x = x_t.flatten(1)
        d2 = x.square().sum(1, keepdim=True) - 2 * scale[:, None] * x @ points.T + scale[:, None] ** 2 * sq_norms
        mean_x_tn = (torch.softmax(-d2 / (2 * s2[:, None]), dim=1) @ points).reshape(x_t.shape)
        c_h, c_x = ambient_coefficients(sigma_t, sigma_tn)
        return (mean_x_tn - bcast(c_x, x_t) * x_t) / bcast(c_h, x_t)

    return h


def empirical_denoiser(S):
    """Section 2.2: E[x_0 | x_t] when x_0 is uniform on the training set S. Its ODE copies S."""
    return ambient_optimal_denoiser(S, 0.0)


class GaussianMixture:
    """x_0 ~ sum_k w_k N(mu_k, Sigma_k) in R^d: E[x_0 | x_t] and log p_t(x_t) in closed form."""

    def __init__(self, weights, means, covs):
        self.weights, self.means, self.covs = weights, means, covs

    def sample(self, n, gen):
        k = torch.multinomial(self.weights, n, replacement=True, generator=gen)
        z = torch.randn(n, self.means.shape[1], generator=gen, dtype=self.means.dtype)
        return self.means[k] + (torch.linalg.cholesky(self.covs)[k] @ z[:, :, None])[:, :, 0]

    def _components(self, x_t, sigma_t):
        """Per component k: x_t ~ N(alpha mu_k, alpha^2 Sigma_k + sigma^2 I)."""
        sigma_t = torch.as_tensor(sigma_t, dtype=x_t.dtype).expand(x_t.shape[0])
        if (sigma_t == sigma_t[0]).all():  # one noise level (the sampler's case): one inverse per component
            sigma_t = sigma_t[:1]
        a, eye = alpha(sigma_t)[:, None, None, None], torch.eye(x_t.shape[1], dtype=x_t.dtype)
        cov = a ** 2 * self.covs[None] + sigma_t[:, None, None, None] ** 2 * eye  # (B or 1, K, d, d)
        diff = x_t[:, None, :] - a[..., 0] * self.means[None]  # (B, K, d)
        sol = (torch.linalg.inv(cov) @ diff[..., None])[..., 0]
        log_n = -0.5 * ((diff * sol).sum(-1) + torch.logdet(cov) + x_t.shape[1] * math.log(2 * math.pi))
        return a, sol, log_n + self.weights.log()

    def log_density(self, x_t, sigma_t):
        return torch.logsumexp(self._components(x_t, sigma_t)[2], dim=1)

    def denoiser(self, x_t, sigma_t):
        """E[x_0 | x_t] = sum_k P(k | x_t) (mu_k + alpha Sigma_k (alpha^2 Sigma_k + sigma^2 I)^-1 (x_t - alpha mu_k))."""
        a, sol, log_joint = self._components(x_t, sigma_t)
        post_means = self.means[None] + a[..., 0] * (self.covs[None] @ sol[..., None])[..., 0]
        return (torch.softmax(log_joint, dim=1)[..., None] * post_means).sum(1)


# ------------------------------------------------------------------------------------------------
# 10. Command line: train with Algorithm 1, sample, score memorization, write runs/<name>/.
# ------------------------------------------------------------------------------------------------
def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Noise levels are EDM units (x = x_0 + sigma n, data in [-1, 1]); "
                                       "the VP value is sigma/sqrt(1+sigma^2). See README.md and NOTES.md.")
    a = p.add_argument
    a("--data", default="demo", help="cifar (torchvision, into --data-dir), demo (bundled 800-image CIFAR-10 "
      "subset), a .npz with uint8 'images' N x H x W x 3, or a folder of images (default: demo)")
    a("--data-dir", default="data", help="where --data cifar is downloaded or placed (default: ./data)")
    a("--n", type=int, default=None, help="train on a seeded random subset of n images (paper: 300/1000/3000)")
    a("--n-per-class", type=int, default=None, help="train on a seeded random k images of every class instead "
      "(Table 1's ImageNet rows: 5 or 15); needs labels")
    a("--sigma-tn", type=float, default=None, help="sigma_tn in EDM units: above it train only on the noisy "
      "copies (Eq. 6), below it on clean images (Eq. 3). 0 = the DDPM baseline. Paper's Figure 2: 0.4-4; the "
      "released train.sh (FFHQ): 0.5 (default 0.4; none with --method masking)")
    a("--schedule", choices=("edm", "algorithm1"), default="edm",
      help="edm (default): the released code, ln sigma ~ N(-1.2, 1.2^2) per sample, the noisy copy when sigma >= "
           "sigma_tn. algorithm1: the paper's text, half clean with t~U(0,t_n), half noisy with t~U(t_n,T), "
           "through this project's assumed sigma(t), EDM's rho = 7 warp")
    a("--ambient-weight", choices=AMBIENT_WEIGHTS, default="released", help="weight of Eq. 6: released (default), "
      "the authors' code, EDM's lambda(sigma) on the residual in EDM units; x0: lambda(sigma) / c_h^2, which pulls "
      "on the x_0 error as EDM does at every level (NOTES.md compares them)")
    a("--method", choices=("algorithm1", "noisy-only", "masking"), default="algorithm1", help="algorithm1: the "
      "paper's method. noisy-only: the Ambient Tweedie baseline of Table 2, trained on S_tn alone above t_n, "
      "sampled down to t_n and finished with one denoising step. masking: the Ambient Diffusion baseline of "
      "Table 2, trained on images with a fixed share --mask-p of pixels missing, sampled with fixed masks")
    a("--mask-p", type=float, default=None, help="with --method masking: probability that a pixel is missing "
      "from its training image (Ambient Diffusion's CIFAR-10 runs: 0.2-0.8)")
    a("--mask-delta", type=float, default=None, help="with --method masking: share of the visible pixels hidden "
      "again in each training step, delta > 0 is what lets the network learn hidden pixels (default 0.1)")
    a("--cond", choices=("none", "class"), default="none", help="class: condition on the dataset's labels "
      "(Table 1's ImageNet rows); samples cycle through the classes")
    a("--label-dropout", type=float, default=0.1, help="with --cond class: share of training labels replaced by "
      "'no class', so that classifier-free guidance has an unconditional model (default 0.1)")
    a("--guidance", type=float, default=1.0, help="classifier-free guidance weight w: h_u + w (h_c - h_u); "
      "1 = plain conditional (default), 0 = unconditional")
    a("--preset", choices=tuple(PRESETS), default="paper", help="network: paper (6.5M parameters, GPU), edm "
      "(EDM's DDPM++ CIFAR-10 layout as in the released code, 54M, GPU) or tiny (0.7M, CPU)")
    a("--dropout", type=float, default=None, help="dropout in the residual blocks (default: the preset's, 0.05 as "
      "the released train.sh for paper and edm, 0 for tiny)")
    a("--resolution", type=int, default=None, help="downsample images to this side (default: native)")
    a("--iters", type=int, default=30000, help="training iterations (paper: 30000)")
    a("--batch", type=int, default=256, help="batch size (paper: 256)")
    a("--lr", type=float, default=1e-4, help="learning rate (paper: 1e-4)")
    a("--optimizer", choices=OPTIMIZERS, default="adam", help="adam (default): the released code's Adam with "
      "L2 weight decay 0.01 in the gradient; adamw: decoupled weight decay 0.01")
    a("--lr-rampup", type=float, default=0.0, help="raise the learning rate linearly over this many million "
      "images (the released code: 10, longer than the paper's 7.68M-image runs; default 0, none)")
    a("--flip", action="store_true", help="random horizontal flips, the same for an image and its noisy copy")
    a("--seed", type=int, default=0, help="seeds the subset, S_tn, initialisation, batches and sampling")
    a("--samples", type=int, default=256, help="images to generate after training (default 256)")
    a("--steps", type=int, default=40, help="ODE steps for sampling, as the released generate_script.sh (default 40)")
    a("--sample-batch", type=int, default=256, help="images per sampling batch; larger is faster on a GPU. Batch k "
      "draws its noise from seed + k, so the samples depend on it (default 256)")
    a("--sampler", choices=("heun", "euler"), default="heun", help="heun (default): EDM's second-order steps, "
      "as the released code samples; euler: first order, one network call a step")
    a("--out", default=None, help="run folder (default: runs/<data>-n<n>-<method>, e.g. demo-n800-ambient-0.4, "
      "demo-n16-ddpm, demo-n16-masking-0.4)")
    a("--resume", action="store_true", help="continue the checkpoint in the run folder; the config must match")
    a("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    a("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16 runs the network under bfloat16 "
      "autocast (fast on GPUs); weights, optimizer and losses stay float32 (default fp32)")
    a("--channels-last", action="store_true", help="NHWC memory layout for the network (for GPUs; see NOTES.md)")
    a("--compile", choices=("none", "default", "cudagraphs"), default="none", help="torch.compile the training "
      "step (default: fused kernels; cudagraphs: also CUDA-graph replay, GPU only) and sampling (fused kernels); "
      "the first steps pay the compilation (default none)")
    a("--log-every", type=int, default=100, help="progress line every this many steps")
    a("--ckpt-every", type=int, default=1000, help="checkpoint every this many steps")
    a("--compare", nargs="+", metavar="RUN", help="print the memorization table of finished run folders and exit")
    return p


def check_args(args):
    """Every check that needs no data, before anything slow happens. Fills in method-dependent defaults."""
    masking = args.method == "masking"
    if masking and args.sigma_tn:
        raise UserError("--method masking trains on masked images without added noise: drop --sigma-tn")
    if args.sigma_tn is None:
        args.sigma_tn = 0.0 if masking else 0.4
    if masking and args.mask_p is None:
        raise UserError("--method masking needs --mask-p, the share of missing pixels (e.g. 0.4)")
    if not masking and (args.mask_p is not None or args.mask_delta is not None):
        raise UserError("--mask-p and --mask-delta need --method masking")
    if masking:
        args.mask_delta = 0.1 if args.mask_delta is None else args.mask_delta
        if not (0 < args.mask_p < 1 and 0 <= args.mask_delta < 1):
            raise UserError(f"--mask-p {args.mask_p} must be in (0, 1) and --mask-delta {args.mask_delta} in [0, 1)")
    if args.n is not None and args.n_per_class is not None:
        raise UserError("pass --n or --n-per-class, not both")
    if args.sigma_tn < 0:
        raise UserError(f"--sigma-tn {args.sigma_tn} is negative; use 0 (DDPM) or a positive noise level such as 0.4")
    if args.sigma_tn >= SIGMA_MAX:
        raise UserError(f"--sigma-tn {args.sigma_tn} is at or above the top noise level {SIGMA_MAX}; "
                        "nothing would be trained on noisy data. Use a value below it (paper: 0.4 to 4)")
    if 0 < args.sigma_tn <= SIGMA_MIN:
        raise UserError(f"--sigma-tn {args.sigma_tn} is below the lowest trained noise level {SIGMA_MIN}; use 0 for DDPM")
    for flag in ("iters", "batch", "samples", "steps", "sample_batch", "log_every", "ckpt_every", "resolution"):
        value, least = getattr(args, flag), 0 if flag == "iters" else 1
        if value is not None and value < least:
            raise UserError(f"--{flag.replace('_', '-')} {value} must be at least {least}")
    if args.cond == "none" and (args.guidance != 1 or args.label_dropout != 0.1):
        raise UserError("--guidance and --label-dropout act on class-conditional models: add --cond class")
    if args.dropout is not None and not 0 <= args.dropout < 1:
        raise UserError(f"--dropout {args.dropout} must be in [0, 1)")
    if args.lr_rampup < 0:
        raise UserError(f"--lr-rampup {args.lr_rampup} is negative; use 0 for no warm-up or e.g. 10 (million images)")
    if not 0 <= args.label_dropout < 1:
        raise UserError(f"--label-dropout {args.label_dropout} must be in [0, 1)")
    if args.method == "noisy-only" and args.sigma_tn == 0:
        raise UserError("--method noisy-only needs the noise level of the data: pass --sigma-tn > 0")
    if args.n is not None and args.n < 2:
        raise UserError(f"--n {args.n}: train on at least 2 images")
    if args.n_per_class is not None and args.n_per_class < 1:
        raise UserError(f"--n-per-class {args.n_per_class} must be at least 1")


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is available here; use --device cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name} is not a device name; use auto, cpu or cuda")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def model_for(cfg):
    """The network a run's config describes."""
    overrides = {} if cfg.get("dropout") is None else dict(dropout=cfg["dropout"])
    return Denoiser(cfg["resolution"], cfg["preset"], cfg.get("num_classes", 0), cfg.get("method") == "masking",
                    cfg.get("channels_last", False), **overrides)


def sampling_options(cfg, count):
    """generate()'s run-dependent arguments for a run's config."""
    masking = cfg.get("method") == "masking"
    return dict(batch=cfg.get("sample_batch", 256), sigma_stop=cfg["sigma_tn"] if cfg.get("method") == "noisy-only" else 0.0,
                labels=torch.arange(count) % cfg["num_classes"] if cfg.get("num_classes") else None,
                guidance=cfg.get("guidance", 1.0),
                mask_keep=(1 - cfg["mask_p"]) * (1 - cfg["mask_delta"]) if masking else None)


def compare(run_dirs):
    """A Markdown table of the runs' metrics.json, one column per run."""
    metrics = {}
    for d in run_dirs:
        try:
            metrics[Path(d).name] = json.loads((Path(d) / "metrics.json").read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"--compare: cannot read {Path(d) / 'metrics.json'} ({e}); is {d} a finished run?")
    rows = ["| metric | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for key in next(iter(metrics.values())):
        cells = (m.get(key) for m in metrics.values())
        rows.append(f"| {key} | " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in cells) + " |")
    print("\n".join(rows))


def run(args):
    if args.compare:
        return compare(args.compare)
    check_args(args)
    device = pick_device(args.device)
    if args.compile == "cudagraphs" and device.type != "cuda":
        raise UserError("--compile cudagraphs replays CUDA graphs and needs a CUDA device; use --compile default")
    if args.compile != "none" and device.type == "cpu" and not any(map(shutil.which, ("g++", "c++", "clang++"))):
        raise UserError("--compile on CPU builds C++ kernels and no C++ compiler is installed; install g++ or "
                        "drop --compile")
    rank, world = distributed("nccl" if device.type == "cuda" else "gloo")
    if args.batch % world:
        raise UserError(f"--batch {args.batch} does not split over {world} processes; use a multiple of {world}")
    if device.type == "cuda":  # TF32 matmuls and convolutions: float32 range, 10-bit mantissa, much faster
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    images = load_images(args.data, args.data_dir)
    h, w = images.shape[1:3]
    levels = len(PRESETS[args.preset]["mults"])
    res = args.resolution or h
    if h != w or res > h or res % 2 ** (levels - 1):
        raise UserError(f"images are {h}x{w} and --resolution is {res}: preset {args.preset} needs square images "
                        f"with a side that is a multiple of {2 ** (levels - 1)} and at most the images' side; "
                        f"pass --resolution {max(2 ** (levels - 1), min(h, w) // 2 ** (levels - 1) * 2 ** (levels - 1))}")
    all_labels = load_labels(args.data, args.data_dir) if args.cond == "class" or args.n_per_class else None
    if all_labels is not None and len(all_labels) != len(images):
        raise UserError(f"--data {args.data} has {len(images)} images but {len(all_labels)} labels")
    indices = choose_subset(len(images), args.n, args.seed, all_labels, args.n_per_class)
    noisy_only, masking = args.method == "noisy-only", args.method == "masking"
    method = "ddpm" if not (args.sigma_tn or masking) else "ambient" if args.method == "algorithm1" else args.method
    level = args.mask_p if masking else args.sigma_tn
    name = f"{Path(args.data).stem}-n{len(indices)}-{method}" + (f"-{level:g}" if level else "")
    out = Path(args.out or Path("runs") / name)
    cfg = {k: v for k, v in vars(args).items() if k not in ("resume", "out", "device", "compare")}
    cfg["resolution"] = res
    state = None
    if args.resume:
        if not (out / "checkpoint.pt").is_file():
            raise UserError(f"--resume: no checkpoint at {out / 'checkpoint.pt'}; drop --resume to start fresh")
        saved = json.loads((out / "config.json").read_text())
        diff = [k for k in RUN_KEYS if saved.get(k) != cfg.get(k)]
        if diff:
            raise UserError(f"--resume: {out} was trained with a different config ("
                            + ", ".join(f"{k}: {saved.get(k)!r} there, {cfg.get(k)!r} here" for k in diff)
                            + "); repeat the original flags or use another --out")
        state = torch.load(out / "checkpoint.pt", map_location=device, weights_only=False)
    elif (out / "checkpoint.pt").exists():
        raise UserError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    logfile = open(out / "log.txt", "a") if rank == 0 else None

    def log(msg):  # rank 0 speaks for all processes
        if logfile:
            print(msg, flush=True)
            logfile.write(msg + "\n"), logfile.flush()

    torch.manual_seed(args.seed)
    S = prepare(images[indices], res).to(device)
    masks = None
    if masking:  # the run sees each image only through its fixed mask, and S_tn holds A x_0 too
        masks = (state["masks"] if state else make_masks(S.shape, args.mask_p, args.seed)).to(device)
        S_tn = observed(S, masks)
    else:
        S_tn = state["S_tn"] if state else make_noisy_copies(S.cpu(), vp_from_edm(args.sigma_tn), args.seed)
        S_tn = S_tn.to(device)
    labels, cfg["num_classes"] = None, 0
    if args.cond == "class":
        labels, cfg["num_classes"] = torch.from_numpy(all_labels[indices]).to(device), int(all_labels.max()) + 1
    h_theta = model_for(cfg).to(device)
    if rank == 0:
        (out / "config.json").write_text(json.dumps(cfg, indent=1))
        (out / "indices.json").write_text(json.dumps(indices.tolist()))
    params = sum(p.numel() for p in h_theta.parameters())
    processes = f" x {world} processes" if world > 1 else ""
    log(f"{'resuming' if state else 'training'} {out}: {len(S)} images at {res}x{res} on {device}{processes}, preset {args.preset} "
        f"({params / 1e6:.2f}M parameters), method {args.method}, "
        + (f"mask_p = {args.mask_p:g}, delta = {args.mask_delta:g}, " if masking else
           f"sigma_tn = {args.sigma_tn:g} EDM = {vp_from_edm(args.sigma_tn):.4f} VP "
           f"(t_n = {time_at(args.sigma_tn) if args.sigma_tn else 0:.3f}), ") + f"schedule {args.schedule}")
    if masking and args.mask_delta == 0:
        log("note: --mask-delta 0 never puts a hidden pixel in the loss, so the network does not learn to fill "
            "them (Ambient Diffusion's ablation); the sampler will still hide a share --mask-p of every sample")
    if device.type == "cpu" and args.preset == "paper" and args.iters > 1000:
        log("note: the paper preset on CPU takes days; try --preset tiny --resolution 16, or `make demo`")
    # The baselines of Table 2 get no clean image: S_tn is all they train on.
    ema = train(h_theta, S_tn if noisy_only or masking else S, S_tn, cfg, out, log, state, labels, masks)
    if rank > 0:
        return out
    with autocast(device, args.precision), compile_errors(args.compile != "none"):
        h_sample = compiled(ema, args.compile, replay=False)
        samples = generate(h_sample, args.samples, steps=args.steps, sampler=args.sampler, seed=args.seed, device=device,
                           log=log, **sampling_options(cfg, args.samples))
    from torchvision.utils import save_image
    save_image((samples[:64] + 1) / 2, out / "samples.png", nrow=8)
    np.savez_compressed(out / "samples.npz", images=((samples + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
    report, nn_ = memorization_report(samples, S.cpu())
    save_neighbour_grid(samples, S.cpu(), nn_["l2_idx"], out / "neighbours.png")
    (out / "metrics.json").write_text(json.dumps(report, indent=1))
    log("memorization (pixels): " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in report.items()))
    log(f"wrote {out}/: config.json, checkpoint.pt, samples.png, samples.npz, neighbours.png, metrics.json, log.txt")
    return out


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        run(args)
        if distributed()[1] > 1:
            torch.distributed.destroy_process_group()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is kept, continue with --resume", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
