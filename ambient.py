"""Creative diffusion models with Ambient Diffusion, in one file.

Reference implementation of Shah, Kalavasis, Klivans & Daras, "Does Generation Require Memorization?
Creative Diffusion Models using Ambient Diffusion" (ICML 2025).

Diffusion models trained on few images copy them. Algorithm 1 trains the low-noise part of the
diffusion (t < t_n) on the clean images (Eq. 3) and the high-noise part only on ONE fixed noisy copy
x_tn of each image (Eq. 6): never seeing a clean image at high noise, it cannot snap onto one there.

    python ambient.py --data cifar --n 300 --sigma-tn 0.4   # Algorithm 1, as the authors run it
    python ambient.py --data cifar --n 300 --sigma-tn 0     # the DDPM baseline

Defaults the paper leaves open are the authors' released code's (an EDM fork); NOTES.md lists every
difference. baselines.py, conditional.py and repro_gpu.py build on this file's pieces.
"""

import argparse
import copy
import json
import math
import os
import pickle
import reprlib
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ------------------------------------------------------------------------------------------------
# 1. Noise schedule (Eq. 1): x_t = sqrt(1 - sigma_t^2) x_0 + sigma_t z, data in [-1, 1].
#
# The paper writes the variance-preserving (VP) process; its experiments (EDM code) quote noise as
# x = x_0 + sigma n. Dividing the VP x_t by sqrt(1 - sigma_t^2) gives that, with sigma = sigma_t /
# sqrt(1 - sigma_t^2). Command-line sigmas (--sigma-tn 0.4) are EDM units; the losses use VP units.
# ------------------------------------------------------------------------------------------------
SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0  # EDM's noise range and time warp (EDM units)
SIGMA_DATA = 0.5  # EDM's prior on the data's standard deviation, for the network's scalings


def vp_from_edm(sigma):
    """EDM sigma -> VP sigma_t = sigma / sqrt(1 + sigma^2)."""
    return sigma / (1 + sigma**2) ** 0.5


def edm_from_vp(sigma_t):
    """VP sigma_t -> EDM sigma = sigma_t / sqrt(1 - sigma_t^2)."""
    return sigma_t / (1 - sigma_t**2) ** 0.5


def alpha(sigma_t):
    """The VP signal scale sqrt(1 - sigma_t^2); alpha^2 + sigma_t^2 = 1."""
    return (1 - sigma_t**2) ** 0.5


def sigma_at(t):
    """sigma(t), t in [0, 1], for --schedule algorithm1: the paper names none; EDM's time warp."""
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
    """Algorithm 1, line 10: the stored x_tn noised up to sigma_t > sigma_tn. Given x_0,
    x_t = sqrt((1 - s_t^2) / (1 - s_tn^2)) x_tn + sqrt((s_t^2 - s_tn^2) / (1 - s_tn^2)) z
    has exactly Eq. 1's law: signal alpha_t x_0, noise variance sigma_t^2."""
    scale = alpha(sigma_t) / alpha(sigma_tn)
    std = ((sigma_t**2 - sigma_tn**2) / (1 - sigma_tn**2)) ** 0.5
    return bcast(scale, x_tn) * x_tn + bcast(std, x_tn) * z


# ------------------------------------------------------------------------------------------------
# 2. Compact U-Net h_theta(x_t, t) that predicts x_0 (the x_0-prediction of Eq. 3).
#
# EDM's preconditioning (Karras et al. 2022, Table 1) keeps the network's input and target at unit
# variance at every noise level, so one network serves from sigma = 0.002 to 80:
#   h = c_skip x + c_out F(c_in x, c_noise), with x = x_t / alpha the EDM-units input.
# ------------------------------------------------------------------------------------------------
# Channels, per-level multipliers, residual blocks per level, attention resolutions, dropout.
PRESETS = {
    # CPU: 0.69M parameters at 16x16
    "tiny": dict(channels=16, mults=(1, 2, 4), blocks=1, attn_at=(4,), dropout=0.0),
    # GPU: 6.47M at 32x32, named "paper" before issue 24 (it is not the paper's network: edm is)
    "small": dict(channels=64, mults=(1, 2, 2), blocks=2, attn_at=(16,), dropout=0.05),
    # EDM's DDPM++ CIFAR-10 (released train.py's default; train.sh names NCSN++): 53.6M, EDM 55.7M
    "edm": dict(channels=128, mults=(2, 2, 2), blocks=4, attn_at=(16,), dropout=0.05),
}


def groups(c):
    return math.gcd(32, c // 4)  # GroupNorm groups of at least 4 channels, at most 32 groups


def zero_init(layer):
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)


class SelfAttention(nn.Module):
    def __init__(self, c, heads=1):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups(c), c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = nn.Conv2d(c, c, 1)
        zero_init(self.proj)  # the block starts as the identity

    def forward(self, x):
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W)
        q, k, v = qkv.transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(-1, -2).reshape(B, C, H, W))


class ResBlock(nn.Module):
    def __init__(self, c_in, c_out, emb_dim, attention=False, dropout=0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups(c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2 = nn.GroupNorm(groups(c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        zero_init(self.conv2)  # the block starts as the identity
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.attention = SelfAttention(c_out) if attention else nn.Identity()
        self.dropout = dropout

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x))) + self.emb(emb)[:, :, None, None]
        h = self.conv2(F.dropout(F.silu(self.norm2(h)), self.dropout, self.training))
        return self.attention((self.skip(x) + h) * 0.5**0.5)


class UNet(nn.Module):  # F_theta, the raw network inside the preconditioning
    def __init__(self, resolution, channels, mults, blocks, attn_at, dropout=0.0, in_channels=3):
        super().__init__()
        self.channels = channels
        emb_dim = 4 * channels
        self.embed = nn.Sequential(
            nn.Linear(channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.down = nn.ModuleList()
        self.up = nn.ModuleList()
        skips = [channels]  # the channels of each skip connection, popped on the way up
        c, res = channels, resolution
        for level, m in enumerate(mults):
            for _ in range(blocks):
                self.down.append(ResBlock(c, channels * m, emb_dim, res in attn_at, dropout))
                c = channels * m
                skips.append(c)
            if level < len(mults) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
                res //= 2
        self.mid = nn.ModuleList(
            [ResBlock(c, c, emb_dim, True, dropout), ResBlock(c, c, emb_dim, False, dropout)]
        )
        for level, m in reversed(list(enumerate(mults))):
            for _ in range(blocks + 1):
                self.up.append(
                    ResBlock(c + skips.pop(), channels * m, emb_dim, res in attn_at, dropout)
                )
                c = channels * m
            if level > 0:
                self.up.append(
                    nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(c, c, 3, padding=1))
                )
                res *= 2
        self.norm_out = nn.GroupNorm(groups(c), c)
        self.conv_out = nn.Conv2d(c, 3, 3, padding=1)
        zero_init(self.conv_out)

    def forward(self, x, c_noise, extra=None):
        """extra: an embedding added to the noise level's, such as a class's."""
        # Sinusoidal embedding of c_noise = ln(sigma)/4, as EDM feeds its DDPM++ network.
        half = self.channels // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=x.device) / (half - 1))
        angles = c_noise[:, None].float() * freqs[None]
        emb = self.embed(torch.cat([angles.cos(), angles.sin()], dim=1))
        if extra is not None:
            emb = emb + extra
        h = self.conv_in(x)
        skips = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            skips.append(h)
        for layer in self.mid:
            h = layer(h, emb)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = layer(torch.cat([h, skips.pop()], 1), emb)
            else:
                h = layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Denoiser(nn.Module):  # h_theta(x_t, sigma_t) -> estimate of x_0, VP inputs as in the paper
    def __init__(self, resolution=32, preset="tiny", **overrides):
        super().__init__()
        self.resolution = resolution
        self.net = UNet(resolution, **{**PRESETS[preset], **overrides})

    def scalings(self, x_t, sigma_t):
        """EDM sigma, the EDM-units input x = x_t / alpha = x_0 + sigma n, c_skip, c_out, c_in."""
        sigma_t = torch.as_tensor(sigma_t, dtype=x_t.dtype, device=x_t.device).expand(x_t.shape[0])
        sigma = edm_from_vp(sigma_t)
        x = x_t / bcast(alpha(sigma_t), x_t)
        c_skip = SIGMA_DATA**2 / (sigma**2 + SIGMA_DATA**2)
        c_out = sigma * SIGMA_DATA / (sigma**2 + SIGMA_DATA**2) ** 0.5
        return sigma, x, c_skip, c_out, 1 / (sigma**2 + SIGMA_DATA**2) ** 0.5

    def forward(self, x_t, sigma_t, extra=None):
        sigma, x, c_skip, c_out, c_in = self.scalings(x_t, sigma_t)
        F_x = self.net(bcast(c_in, x) * x, sigma.log() / 4, extra).to(x.dtype)
        return bcast(c_skip, x) * x + bcast(c_out, x) * F_x


# ------------------------------------------------------------------------------------------------
# 3. Losses: DDPM (Eq. 3) below t_n, Ambient Score Matching (Eq. 6, Algorithm 1 line 11) above it.
#
# Why Eq. 6 works (Lemma C.1). Write x_t = (alpha_t/alpha_tn) x_tn + noise. The Gaussian noise
# from x_0 to x_t splits into the part up to t_n and the rest, so given x_t
#     E[x_tn | x_t] = sigma_tn^2 alpha_t / (sigma_t^2 alpha_tn) * x_t
#                   + (sigma_t^2 - sigma_tn^2) / (sigma_t^2 alpha_tn) * E[x_0 | x_t].
# So the minimiser of E|c_h h + c_x x_t - x_tn|^2 is h = E[x_0 | x_t], the clean-data optimum,
# though no clean image appears in the loss. At sigma_tn = 0 the map is h itself and Eq. 6 is Eq. 3.
#
# Weighting. The authors' code weights the residual in EDM units by EDM's lambda(sigma) =
# (sigma^2 + s_d^2) / (sigma s_d)^2 and nothing else: lambda / alpha_tn^2 in VP units (`released`,
# the default). The expected ambient loss is c_h^2 E|h - E[x_0|x_t]|^2 + const, so that weight
# pulls on the x_0 error c_h^2 times less than EDM does, fading to nothing just above t_n; `x0`
# divides by c_h^2 to undo it, at the price of a weight without bound there. At demo scale they
# start copying at different training lengths (NOTES.md).
# ------------------------------------------------------------------------------------------------
AMBIENT_WEIGHTS = ("released", "x0")


def ddpm_loss(x0_pred, x0):
    """Eq. 3: |h_theta(x_t, t) - x_0|^2, per sample."""
    return (x0_pred - x0).square().flatten(1).mean(1)


def ambient_coefficients(sigma_t, sigma_tn):
    """(c_h, c_x) with E[x_tn | x_t] = c_h E[x_0 | x_t] + c_x x_t (Lemma C.1), VP units."""
    c_h = (sigma_t**2 - sigma_tn**2) / (sigma_t**2 * alpha(sigma_tn))
    c_x = sigma_tn**2 * alpha(sigma_t) / (sigma_t**2 * alpha(sigma_tn))
    return c_h, c_x


def ambient_loss(x0_pred, x_t, x_tn, sigma_t, sigma_tn):
    """Eq. 6: |c_h h_theta(x_t, t) + c_x x_t - x_tn|^2, per sample; needs sigma_t > sigma_tn."""
    c_h, c_x = ambient_coefficients(sigma_t, sigma_tn)
    return (bcast(c_h, x_t) * x0_pred + bcast(c_x, x_t) * x_t - x_tn).square().flatten(1).mean(1)


def loss_weight(sigma_t, sigma_tn, kind="released"):
    """Per-sample weight of Eq. 6's VP residual; EDM's lambda at sigma_tn = 0.
    The x0 weight bounds c_h below by 1e-4, where float32 rounding would dominate."""
    sigma = edm_from_vp(sigma_t)
    lam = (sigma**2 + SIGMA_DATA**2) / (sigma * SIGMA_DATA) ** 2
    if kind == "released":
        return lam / alpha(torch.as_tensor(sigma_tn)) ** 2
    c_h, _ = ambient_coefficients(sigma_t, sigma_tn)
    return lam / torch.as_tensor(c_h).clamp_min(1e-4) ** 2


# ------------------------------------------------------------------------------------------------
# 4. Data: images as uint8 (N, H, W, 3) -> float tensors in [-1, 1], shape (N, 3, H, W).
# ------------------------------------------------------------------------------------------------
DEMO_FILE = Path(__file__).with_name("cifar10_demo.npz")
DEFAULT_MAX = 64  # the largest side trained without --resolution: the paper's FFHQ and ImageNet
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


class UserError(Exception):  # bad input: printed as one line, exit code 2, no traceback
    pass


def load_images(spec, data_dir="data", cfg=None):
    """--data cifar | demo | file.npz | image folder -> uint8 (N, H, W, 3), int labels or None;
    the memory and a training cfg's resolution (filled in) checked from headers, before reading."""
    if spec == "cifar":
        images, labels = load_cifar10(data_dir)
        check_fit(images.shape, "CIFAR-10", cfg)
        return images, labels
    path = DEMO_FILE if spec == "demo" else Path(spec)
    if path.is_dir():
        return load_image_folder(path, cfg), None
    if path.suffix == ".npz" and path.is_file():
        try:
            with np.load(path) as f, f.zip.open("images.npy") as npy:
                version = np.lib.format.read_magic(npy)
                header = np.lib.format.read_array_header_1_0 if version == (1, 0) else None
                shape, _, dtype = (header or np.lib.format.read_array_header_2_0)(npy)
                if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or 0 in shape:
                    raise UserError(f"{path}: 'images' is {dtype} {shape}; expected uint8 NxHxWx3")
                check_fit(shape, path, cfg)
                images = f["images"]
                labels = f["labels"] if "labels" in f.files else None
        except UserError:
            raise
        except Exception as e:  # not a zip archive, damaged, or no 'images' key
            raise UserError(
                f"cannot read images from {path} ({type(e).__name__}): it must be a NumPy .npz "
                "archive with a uint8 array 'images' of shape N x H x W x 3"
            ) from None
        if labels is not None and (
            labels.dtype.kind not in "iu" or labels.shape != images.shape[:1] or labels.min() < 0
        ):
            raise UserError(
                f"{path}: 'labels' is {labels.dtype} {labels.shape}; expected an int >= 0 per image"
            )
        return images, None if labels is None else labels.astype(np.int64)
    if path.suffix or os.sep in spec:
        raise UserError(f"cannot read --data {spec}: no such .npz file or image folder")
    raise UserError(
        f"unknown dataset '{spec}': use cifar, demo, a .npz file with 'images', or an image folder"
    )


def load_cifar10(data_dir):
    import socket
    import torchvision

    socket.setdefaulttimeout(20)  # offline machines should fail in seconds, not hang
    try:  # download=True only downloads when the archive is missing; a placed archive is extracted
        ds = torchvision.datasets.CIFAR10(data_dir, train=True, download=True)
    except Exception as e:
        archive = Path(data_dir) / CIFAR_URL.rsplit("/", 1)[1]
        # torchvision checks a placed archive's checksum and, if wrong, downloads a fresh copy
        where = f"{archive} is damaged" if archive.exists() else f"CIFAR-10 is not in {data_dir}"
        raise UserError(
            f"{where} and could not be downloaded ({type(e).__name__}): place {archive.name} from "
            f"{CIFAR_URL} in {data_dir}/ (or pass --data-dir), or use --data demo"
        ) from None
    return np.asarray(ds.data), np.asarray(ds.targets, dtype=np.int64)


def available_memory():  # Linux's MemAvailable (free and reclaimable); elsewhere no estimate
    try:
        return int(Path("/proc/meminfo").read_text().split("MemAvailable:")[1].split()[0]) * 1024
    except (OSError, IndexError, ValueError):
        return math.inf


PREPARE_CHUNK = 2**24  # bytes of uint8 pixels that prepare() turns into floats at a time
MEMORY_SLACK = 2**27  # torch's and the allocator's own memory: up to 75 MB measured


def memory_needed(shape, resolution=None):
    """Peak bytes of reading uint8 images of `shape` and preparing them at `resolution` (default:
    their side), as measured (test_inputs.py): the images, their float32 copy, prepare()'s chunk of
    full-size images as uint8 and float32 (decoding needs less), and MEMORY_SLACK."""
    n, h, w, c = shape
    chunk = min(n, max(1, PREPARE_CHUNK // (h * w * c))) * h * w * c
    return n * h * w * c * (1 + 4 * ((resolution or h) / h) ** 2) + 5 * chunk + MEMORY_SLACK


def check_fit(shape, source, cfg=None):
    """Refuses, before reading them, images of `shape` that a run (cfg: training at its resolution,
    which is checked first) could not hold in memory."""
    if cfg is not None:
        check_resolution(cfg, shape)
    need = memory_needed(shape, cfg and cfg.resolution)
    if need > available_memory():
        raise UserError(
            f"{source} holds {math.prod(shape) / 1e9:.1f} GB of pixels, {need / 1e9:.1f} GB with "
            f"their float32 copy, and {available_memory() / 1e9:.1f} GB of memory is free: use "
            "fewer or smaller images"
        )


def open_image(file, read=False):
    """An image's (width, height) from its header, or with read=True its RGB pixels. PIL's
    decompression-bomb warning (over 89M pixels) is an error here, raised before any decoding."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(file) as im:
                if read and im.mode.startswith("I"):  # 16-bit grey: convert() would clip at 255
                    im = Image.fromarray(np.rint(np.asarray(im) / 257).clip(0, 255).astype("uint8"))
                return np.asarray(im.convert("RGB")) if read else im.size
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise UserError(
            f"{file} has more than {Image.MAX_IMAGE_PIXELS:,} pixels, PIL's decompression-bomb "
            f"limit: downscale it first (the presets train at {DEFAULT_MAX}x{DEFAULT_MAX} or less)"
        ) from None
    except Exception as e:  # missing, empty, truncated, not an image: PIL raises many kinds
        raise UserError(f"cannot read image {file} ({type(e).__name__}: {str(e)[:120]})") from None


def load_image_folder(path, cfg=None):
    """The folder's images, read one at a time into one array once their headers say it fits."""
    suffixes = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in suffixes)
    if not files:
        raise UserError(f"no .png/.jpg/.jpeg/.bmp/.webp images in folder {path}")
    sizes = {open_image(f) for f in files}
    if len(sizes) > 1:
        raise UserError(f"images in {path} differ in size; resize them to one size first")
    w, h = sizes.pop()
    check_fit((len(files), h, w, 3), path, cfg)
    images = np.empty((len(files), h, w, 3), np.uint8)
    for i, f in enumerate(files):
        images[i] = open_image(f, read=True)
    return images


def prepare(images, resolution=None, rows=None):
    """uint8 NHWC (rows `rows`, default all) -> float NCHW in [-1, 1], area-downsampled to
    `resolution` if given; a chunk at a time in buffers made once (per image: the same numbers)."""
    rows = np.arange(len(images)) if rows is None else np.asarray(rows)
    side, full = resolution or images.shape[1], images.shape[1]
    out = torch.empty((len(rows), 3, side, side), memory_format=torch.channels_last)
    chunk = max(1, min(len(rows), PREPARE_CHUNK // max(1, images[:1].nbytes)))
    pixels = torch.empty((chunk, *images.shape[1:]), dtype=torch.uint8)
    work = torch.empty((chunk, 3, full, full), memory_format=torch.channels_last)
    for start in range(0, len(rows), chunk):
        k = min(chunk, len(rows) - start)
        for j, i in enumerate(rows[start : start + k]):  # no temporary copy of the chunk
            pixels[j] = torch.from_numpy(images[i])
        x = work[:k].copy_(pixels[:k].permute(0, 3, 1, 2)).div_(127.5).sub_(1)
        x = F.interpolate(x, size=(side, side), mode="area") if side != full else x
        out[start : start + k] = x
    return out


def choose_subset(num_images, n, seed):
    """The paper's seeded random subset of n training images (n = 300 / 1000 / 3000)."""
    if n is None:
        return np.arange(num_images)
    if n > num_images:
        raise UserError(
            f"--n {n} is larger than the dataset ({num_images} images); "
            f"pass --n {num_images} or less"
        )
    return np.sort(np.random.default_rng(seed).choice(num_images, n, replace=False))


# ------------------------------------------------------------------------------------------------
# 5. Algorithm 1. Line 1: draw ONE noisy copy x_tn of every training image, once, from a seeded
# generator; it is saved with the checkpoint and never redrawn. Lines 3-10: draw a batch, split
# it at t_n, noise it. The paper's text and its code pick noise levels differently (NOTES.md):
#   edm         the released code (default): ln sigma ~ N(-1.2, 1.2^2); the noisy copy if
#               sigma >= sigma_tn.
#   algorithm1  as written: clean image or noisy copy with equal odds; t ~ U(0, t_n) or U(t_n, T).
# sigma_tn = 0 makes every sample clean, over the whole range, with the DDPM loss: the baseline.
# ------------------------------------------------------------------------------------------------
def make_noisy_copies(S, sigma_tn, seed):
    """Line 1: S_tn = {sqrt(1 - sigma_tn^2) x_0 + sigma_tn eps}, one draw per image (VP units)."""
    eps = torch.randn(S.shape, generator=torch.Generator().manual_seed(seed + 1))
    return add_noise(S, torch.as_tensor(sigma_tn, dtype=S.dtype), eps)


def pick(per_image, batch, gen, flip=False):
    """Line 3: random indices and those rows of each per-image tensor.
    --flip mirrors an image and its noisy copy alike."""
    dev = per_image[0].device
    idx = torch.randint(len(per_image[0]), (batch,), generator=gen, device=dev)
    rows = [t[idx] for t in per_image]
    if flip:
        mirror = bcast(torch.rand(batch, generator=gen, device=dev) < 0.5, rows[0])
        rows = [torch.where(mirror, r.flip(-1), r) for r in rows]
    return idx, rows


def noise_levels(batch, sigma_tn, schedule, gen, device):
    """Lines 4-9: each sample's noise level sigma (EDM units), and whether it is a noisy one."""
    # u is drawn under both schedules, so that later draws keep their place in the stream.
    u = torch.rand(batch, generator=gen, device=device)
    if schedule == "algorithm1":
        t_n = time_at(sigma_tn) if sigma_tn > 0 else 0.0
        noisy = (torch.rand(batch, generator=gen, device=device) < 0.5) & (sigma_tn > 0)
        t = torch.where(noisy, t_n + u * (1 - t_n), u * (t_n if sigma_tn > 0 else 1.0))
        sigma = sigma_at(t)
        # float32 may round sigma_at(t_n) below sigma_tn
        return torch.where(noisy, sigma.clamp_min(sigma_tn), sigma), noisy
    # The clamp moves 1.6e-5 of the draws.
    ln_sigma = -1.2 + 1.2 * torch.randn(batch, generator=gen, device=device)
    sigma = ln_sigma.exp().clamp(SIGMA_MIN, SIGMA_MAX)
    if sigma_tn > 0:
        return sigma, sigma >= sigma_tn
    return sigma, torch.zeros_like(sigma, dtype=torch.bool)


def noise_batch(x0, x_tn, sigma, noisy, sigma_tn_edm, gen):
    """Line 10: x_t at level sigma, from the clean image below t_n and from its noisy copy above."""
    sigma_t = vp_from_edm(sigma)
    sigma_tn = vp_from_edm(torch.full((), float(sigma_tn_edm), device=x0.device))
    z = torch.randn(x0.shape, generator=gen, device=x0.device)
    # maximum: no NaN from the square root in the unused (clean) half
    x_t_noisy = noise_further(x_tn, sigma_tn, sigma_t.maximum(sigma_tn), z)
    x_t = torch.where(bcast(noisy, x0), x_t_noisy, add_noise(x0, sigma_t, z))
    return dict(
        x0=x0, x_tn=x_tn, x_t=x_t, sigma_t=sigma_t, sigma=sigma, sigma_tn=sigma_tn, noisy=noisy
    )


def algorithm1_batch(S, S_tn, sigma_tn, batch, gen, schedule="edm", flip=False):
    """Lines 3-10: a dict of idx, x0, x_tn, x_t, sigma_t (VP), sigma (EDM), sigma_tn (VP), noisy."""
    idx, (x0, x_tn) = pick([S, S_tn], batch, gen, flip)
    sigma, noisy = noise_levels(batch, sigma_tn, schedule, gen, S.device)
    return dict(noise_batch(x0, x_tn, sigma, noisy, sigma_tn, gen), idx=idx)


def algorithm1_loss(h_theta, b, weight="released"):
    """Line 11: Eq. 6 on the noisy branch, Eq. 3 on the clean one, weighted, per sample.
    Eq. 3 is Eq. 6 at sigma_tn = 0 with x_0 in place of x_tn (bit for bit, tested), so one call
    serves both, and a clean image never reaches a noisy sample's loss or gradient."""
    noisy = b["noisy"]
    sigma_tn = torch.where(noisy, b["sigma_tn"], torch.zeros_like(b["sigma_t"]))
    target = torch.where(bcast(noisy, b["x0"]), b["x_tn"], b["x0"])
    loss = ambient_loss(h_theta(b["x_t"], b["sigma_t"]), b["x_t"], target, b["sigma_t"], sigma_tn)
    return loss_weight(b["sigma_t"], sigma_tn, weight) * loss


class Algorithm1:
    """The method as the loop sees it: data and network, line 1 (use_data), lines 3-10 (batch),
    line 11 (loss), Eq. 5 (sample_batch). Other methods replace some pieces, as EDM's loss classes
    do, and reuse the rest."""

    name = "algorithm1"
    denoiser = Denoiser

    def __init__(self, cfg):
        self.cfg = cfg
        self.S = None
        self.S_tn = None

    def label(self):  # the method's part of a run folder's default name
        return "ddpm" if not self.cfg.sigma_tn else f"ambient-{self.cfg.sigma_tn:g}"

    def describe(self):
        sigma_tn = self.cfg.sigma_tn
        return f"{self.name}, sigma_tn {sigma_tn:g} (EDM) = {vp_from_edm(sigma_tn):.4f} (VP)"

    def training_set(self):
        """The dataset's images and the indices of the subset to train on."""
        images, _ = load_images(self.cfg.data, self.cfg.data_dir, self.cfg)
        return images, choose_subset(len(images), self.cfg.n, self.cfg.seed)

    def network(self, **kwargs):
        if self.cfg.dropout is not None:
            kwargs["dropout"] = self.cfg.dropout
        return self.denoiser(self.cfg.resolution, self.cfg.preset, **kwargs)

    def use_data(self, S, saved=None):
        """The training images and line 1's noisy copies (a resumed run's own, if saved)."""
        if saved:
            S_tn = saved["S_tn"]
        else:
            S_tn = make_noisy_copies(S.cpu(), vp_from_edm(self.cfg.sigma_tn), self.cfg.seed)
        if S_tn.shape != S.shape:
            raise UserError(f"--resume: the saved S_tn is {tuple(S_tn.shape)}, S {tuple(S.shape)}")
        self.S = S
        self.S_tn = S_tn.to(S.device)

    def saved_data(self):  # what a checkpoint keeps besides the weights
        return dict(S_tn=self.S_tn)

    def batch(self, gen):
        cfg = self.cfg
        return algorithm1_batch(
            self.S, self.S_tn, cfg.sigma_tn, cfg.batch, gen, cfg.schedule, cfg.flip
        )

    def loss(self, h_theta, b):
        return algorithm1_loss(h_theta, b, self.cfg.ambient_weight)

    def noise(self, h_theta, k, rows):
        """Batch k of the samples, numbers `rows` (a range), starts from the seed + k."""
        side, device = h_theta.resolution, next(h_theta.parameters()).device
        return initial_noise((len(rows), 3, side, side), self.cfg.seed + k, device)

    def sample_batch(self, h_theta, k, rows):  # Eq. 5
        return sample(h_theta, self.noise(h_theta, k, rows), self.cfg.steps, self.cfg.sampler)

    def generate(self, h_theta, count, log=print):
        def sample_batch(k, rows):
            return self.sample_batch(h_theta, k, rows)

        return generate(sample_batch, count, self.cfg.sample_batch, log)


# ------------------------------------------------------------------------------------------------
# 6. Training (Algorithm 1, lines 2-16), the released recipe: Adam, EDM's EMA; atomic checkpoints.
# ------------------------------------------------------------------------------------------------
OPTIMIZERS = ("adam", "adamw")


def make_optimizer(params, cfg, pixels=1):
    """adam: the released torch.optim.Adam, weight decay 0.01 added to the gradient; adamw:
    decoupled. The released loss sums over an image's `pixels` where ours averages. Adam's steps
    ignore that scale once eps and an L2 term in the gradient are divided by `pixels` too: then the
    steps are the released ones."""
    adamw = cfg.optimizer == "adamw"
    optimizer, decay = (torch.optim.AdamW, 0.01) if adamw else (torch.optim.Adam, 0.01 / pixels)
    return optimizer(
        params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8 / pixels, weight_decay=decay, fused=True
    )


def learning_rate(cfg, images_seen):
    """EDM's warm-up: the rate grows linearly over the first lr_rampup million images (0: none)."""
    if not cfg.lr_rampup:
        return cfg.lr
    return cfg.lr * min(images_seen / (cfg.lr_rampup * 1e6), 1)


@torch.no_grad()
def ema_update(ema, net, images_seen, batch):
    """EDM's EMA: half-life 500k images, or 5% of the images seen before this step if less."""
    beta = 0.5 ** (batch / max(min(500_000, 0.05 * images_seen), 1e-8))
    for p_ema, p in zip(ema.parameters(), net.parameters(), strict=True):
        p_ema.lerp_(p, 1 - beta)


@dataclass
class TrainState:  # everything that changes as the loop runs; a checkpoint holds all of it
    net: nn.Module
    ema: nn.Module
    opt: torch.optim.Optimizer
    # The batches' random numbers; the initialisation and dropout use torch's global generator.
    gen: torch.Generator
    step: int = 0


def eager_step(state, method, cfg):
    """Lines 3-15 as a function of nothing, the form repro_gpu.py's steps share.
    The loss stays on the device."""

    def step():
        loss = method.loss(state.net, method.batch(state.gen)).mean()
        state.opt.zero_grad(set_to_none=True)
        loss.backward()
        for group in state.opt.param_groups:
            group["lr"] = learning_rate(cfg, state.step * cfg.batch)
        state.opt.step()
        ema_update(state.ema, state.net, state.step * cfg.batch, cfg.batch)
        return loss.detach()

    return step


def global_rng(device, state=None):
    """Get, or with `state` set, the state of torch's global generator on `device`."""
    cuda = device.type == "cuda"
    if state is not None:
        return torch.cuda.set_rng_state(state, device) if cuda else torch.set_rng_state(state)
    return torch.cuda.get_rng_state(device) if cuda else torch.get_rng_state()


def save_checkpoint(state, method, cfg, path):
    """torch.save to a temp file, then rename: a run killed mid-write keeps its last checkpoint.
    Adam's settings as make_optimizer's, not a graphed step's (device lr, capturable): resumable."""
    opt = state.opt.state_dict()
    for group in opt["param_groups"]:
        group.update(lr=float(group["lr"]), capturable=False)
    saved = dict(net=state.net.state_dict(), ema=state.ema.state_dict(), opt=opt)
    saved.update(step=state.step, rng=state.gen.get_state())
    saved.update(dropout_rng=global_rng(next(state.net.parameters()).device), config=cfg.saved())
    torch.save(dict(saved, **method.saved_data()), str(path) + ".tmp")
    os.replace(str(path) + ".tmp", path)


# what --resume reads, and its type
RESUME_KEYS = dict(net=dict, ema=dict, opt=dict, step=int, rng=torch.Tensor, S_tn=torch.Tensor)


def load_checkpoint(path, device="cpu", need=None, fix="restore it from a copy"):
    """A checkpoint this project wrote: tensors and plain values only (weights_only), so that a
    shared file runs no code; one that asks for any other Python object is refused unread.
    `need`: the keys the caller reads, and their types (default: the EMA weights)."""
    need = need or dict(ema=dict)
    try:
        with warnings.catch_warnings():  # torch warns of odd pickle protocols: a damaged file
            warnings.simplefilter("ignore")
            saved = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" not in str(e):  # random bytes also fail the restricted unpickler
            raise UserError(f"{path} is damaged (UnpicklingError); {fix}") from None
        raise UserError(
            f"{path} is not a checkpoint this project wrote: it holds Python objects beyond "
            "tensors and plain values (which could run code), so it was not loaded"
        ) from None
    except Exception as e:  # truncated, empty, not a checkpoint, RecursionError: nested too deep
        why = f"{type(e).__name__}: {str(e).strip()[:100]}"
        raise UserError(f"{path} is damaged ({why}); {fix}") from None
    saved = saved if isinstance(saved, dict) else {}
    wrong = [k for k, kind in need.items() if not isinstance(saved.get(k), kind)]
    entries = [saved.get(k) for k in need]
    values = [v for e in entries for v in (e.values() if isinstance(e, dict) else [e])]
    finite = all(v.isfinite().all() for v in values if torch.is_tensor(v) and v.is_floating_point())
    if wrong or not finite:
        what = f"no {wrong[0]} {need[wrong[0]].__name__}" if wrong else "it holds NaN or inf"
        raise UserError(f"{path} is not a checkpoint this project wrote ({what}); {fix}")
    return saved


RESUME_FIX = "restore checkpoint.pt from a copy, or start again without --resume in another --out"


def described(value):
    if torch.is_tensor(value):
        return f"a {str(value.dtype)[6:]} tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__} {reprlib.repr(value)}"


def check_training_entries(saved, opt, generators, fix=RESUME_FIX):
    """A checkpoint's step, saved[name] for each torch.Generator in `generators` (of its kind; names
    absent are skipped) and optimizer state against the live `opt`, checked before anything uses
    them (a moment of the wrong shape crashes fused Adam). UserError: the entry, then `fix`."""

    def refuse(entry, problem):
        raise UserError(f"--resume: the checkpoint's {entry} {problem}; {fix}")

    step = saved.get("step")
    if type(step) is not int or not 0 <= step < 2**31:
        refuse("step", f"is {described(step)}, not an integer from 0 to 2^31")
    for name, gen in ((k, g) for k, g in generators.items() if k in saved):
        try:  # on a scratch generator of gen's kind, which checks size and type (and mt19937 more)
            torch.Generator(gen.device).set_state(saved[name].cpu())
        except (AttributeError, RuntimeError, TypeError) as e:
            kind = f"a {gen.device.type} generator's state ({str(e).strip()[:90]})"
            refuse(name, f"is {described(saved[name])}, not {kind}")
    check_optimizer_state(saved.get("opt"), opt, refuse)


def check_optimizer_state(saved, opt, refuse):
    """An optimizer state_dict against the live `opt` the config made: group settings as opt's
    (flags torch fills in may be absent), lr finite and >= 0, per parameter a step >= 0 and
    finite float moments of its shape (Adam's three for Adam, AdamW). refuse(entry, why) raises."""
    live, params = opt.state_dict(), [p for g in opt.param_groups for p in g["params"]]
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if not (isinstance(groups, list) and isinstance(saved.get("state"), dict)):
        refuse("opt", f"is {described(saved)}, not an optimizer's state_dict")
    if len(groups) != len(live["param_groups"]) or not all(isinstance(g, dict) for g in groups):
        refuse("opt", f"does not hold {len(live['param_groups'])} parameter group(s)")
    for i, (group, fresh) in enumerate(zip(groups, live["param_groups"], strict=True)):
        lr = group.get("lr")
        if type(lr) not in (int, float) or not 0 <= lr < math.inf:
            refuse(f"opt group {i} lr", f"is {described(lr)}, not a finite number >= 0")
        for key, like in fresh.items():  # repr: equal, and of the same types (no tensor's ==)
            flag = like is None or isinstance(like, bool)
            if key != "lr" and (key in group or not flag) and repr(group.get(key)) != repr(like):
                wrong = f"is {described(group.get(key))}, where this run has {like!r}"
                refuse(f"opt group {i} {key}", wrong)
    adam = {"step", "exp_avg", "exp_avg_sq"}  # amsgrad's fourth moment: a flag refused above
    for k, entries in saved["state"].items():
        if type(k) is not int or not 0 <= k < len(params) or not isinstance(entries, dict):
            refuse("opt state", f"has an entry {reprlib.repr(k)} for no parameter")
        if isinstance(opt, torch.optim.Adam) and set(entries) != adam:
            refuse(f"opt state of parameter {k}", f"holds {sorted(entries)}, not {sorted(adam)}")
        for key, v in entries.items():
            shape = () if key == "step" else params[k].shape
            ok = torch.is_tensor(v) and v.is_floating_point() and v.shape == shape
            signed = key not in ("step", "exp_avg_sq", "max_exp_avg_sq")
            if not (ok and v.isfinite().all() and (signed or (v >= 0).all())):
                kind = f"a finite float tensor of shape {tuple(shape)}" + " >= 0" * (not signed)
                refuse(f"opt state of parameter {k} {key}", f"is {described(v)}, not {kind}")


def training_state(net, cfg, pixels, saved=None):
    """A fresh TrainState for `net`, or the one a checkpoint (`saved`) holds."""
    device = next(net.parameters()).device
    ema, gen = copy.deepcopy(net).requires_grad_(False).eval(), torch.Generator(device)
    opt = make_optimizer(net.parameters(), cfg, pixels)
    state = TrainState(net, ema, opt, gen.manual_seed(cfg.seed + 2))
    if saved is not None:
        try:
            net.load_state_dict(saved["net"])
            state.ema.load_state_dict(saved["ema"])
        except (RuntimeError, ValueError, KeyError, TypeError):
            raise UserError(
                "--resume: the checkpoint holds another network; "
                "resume it with the script that trained it"
            ) from None
        generators = dict(rng=state.gen, dropout_rng=torch.Generator(device))
        check_training_entries(saved, state.opt, generators)
        state.opt.load_state_dict(saved["opt"])
        state.gen.set_state(saved["rng"].cpu())
        if "dropout_rng" in saved:  # runs before 763cef1 have none
            global_rng(device, saved["dropout_rng"])
        state.step = saved["step"]
    return state


def weights_finite(net):
    return bool(torch.stack([p.isfinite().all() for p in net.parameters()]).all())


def train(method, state, cfg, out=None, log=print, make_step=eager_step):
    """Lines 2-16: steps until cfg.iters, a progress line every cfg.log_every steps and a
    checkpoint every cfg.ckpt_every in the folder `out` (None: write nothing, as a second GPU's
    process). Returns the EMA."""
    step = make_step(state, method, cfg)
    t0 = time.time()
    first = state.step
    bad = torch.tensor(0)  # the first non-finite step, kept on the device: no sync per step
    while state.step < cfg.iters:
        loss = step()
        state.step += 1
        bad = torch.where(torch.isfinite(loss) | (bad > 0), bad, state.step)
        last = state.step == cfg.iters
        logs = state.step % cfg.log_every == 0 or last
        saves = state.step % cfg.ckpt_every == 0 or last
        if (logs or saves) and (bad.item() or not weights_finite(state.net)):
            raise UserError(
                f"training is not finite from step {bad.item() or state.step} on (a finite loss "
                "can still give infinite gradients); the last checkpoint before it is kept. "
                "Lower --lr or check the data, then --resume"
            )
        if logs:
            rate = (state.step - first) * cfg.batch / (time.time() - t0)
            eta = (cfg.iters - state.step) * cfg.batch / rate / 60
            log(
                f"step {state.step}/{cfg.iters}  loss {loss.item():.4f}  {rate:.0f} img/s  "
                f"eta {eta:.1f} min"
            )
        if out and saves:
            save_checkpoint(state, method, cfg, Path(out) / "checkpoint.pt")
    if out and first == cfg.iters == 0:
        save_checkpoint(state, method, cfg, Path(out) / "checkpoint.pt")
    return state.ema


# ------------------------------------------------------------------------------------------------
# 7. Sampler (Eq. 5): the probability-flow ODE, integrated in EDM units where it reads
# dx/dsigma = (x - D(x; sigma)) / sigma, with D(x; sigma) = h_theta(alpha x, sigma_t). Dividing
# the VP x_t by alpha turns the VP ODE into this one. Steps follow EDM's rho = 7 spacing; Heun's
# method (40 steps, as released) is the default: Euler with as many network calls lands several
# times farther from the exact flow (test_heun_error_shrinks_faster_than_euler).
#
# To stop at sigma_stop > 0 (Lemma 4.1 stops at t_n), integrate in s = sqrt(sigma^2 - sigma_stop^2):
# the ODE reads dx/ds = (x - E[x_stop | x]) / s with E[x_stop | x] = r x + (1 - r) D,
# r = sigma_stop^2 / sigma^2 (Lemma C.1 in EDM units), so the last (Euler) step to s = 0 lands on
# E[x_stop | x].
# ------------------------------------------------------------------------------------------------
def sigma_steps(steps, sigma_max=SIGMA_MAX):
    """EDM's rho = 7 grid from sigma_max down to SIGMA_MIN, then 0."""
    i = torch.arange(steps, dtype=torch.float64) / max(steps - 1, 1)
    grid = (sigma_max ** (1 / RHO) + i * (SIGMA_MIN ** (1 / RHO) - sigma_max ** (1 / RHO))) ** RHO
    return torch.cat([grid, torch.zeros(1, dtype=torch.float64)])


def initial_noise(shape, seed, device="cpu", dtype=torch.float32):
    """Eq. 5's starting point at sigma = 80, drawn on the CPU: one seed, one noise, any device."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * SIGMA_MAX).to(device, dtype)


@torch.no_grad()
def sample(h_theta, x, steps=40, sampler="heun", sigma_stop=0.0):
    """Integrate Eq. 5 from x at sigma = 80 down to sigma_stop; returns x_0 + sigma_stop n (EDM)."""

    def x_stop_pred(x, s):
        """E[x_stop | x] at the noise level sigma = sqrt(s^2 + sigma_stop^2)."""
        level = (s**2 + sigma_stop**2) ** 0.5
        sigma = torch.full((x.shape[0],), level, dtype=x.dtype, device=x.device)
        D = h_theta(x * bcast(alpha(vp_from_edm(sigma)), x), vp_from_edm(sigma))
        r = sigma_stop**2 / (s**2 + sigma_stop**2)
        return r * x + (1 - r) * D

    s_grid = sigma_steps(steps, (SIGMA_MAX**2 - sigma_stop**2) ** 0.5).tolist()
    for s, s_next in zip(s_grid[:-1], s_grid[1:], strict=True):
        d = (x - x_stop_pred(x, s)) / s
        x_next = x + (s_next - s) * d
        # Heun: the trapezoid rule, except on the last step, where s = 0 has no slope
        if sampler == "heun" and s_next > 0:
            d_next = (x_next - x_stop_pred(x_next, s_next)) / s_next
            x_next = x + (s_next - s) * (d + d_next) / 2
        x = x_next
    return x


@torch.no_grad()
def generate(sample_batch, count, batch=256, log=print):
    """`count` images, batch k (samples numbered `rows`) from sample_batch(k, rows), in [-1, 1]."""
    out = []
    for k, start in enumerate(range(0, count, batch)):
        out.append(sample_batch(k, range(start, min(count, start + batch))).clamp(-1, 1).cpu())
        log(f"sampled {start + len(out[-1])}/{count}")
    return torch.cat(out)


# ------------------------------------------------------------------------------------------------
# 8. Memorization, without DINOv2. The paper scores a sample by the DINOv2 cosine to its nearest
# training image (eval_memorization.py). Pixels give two weight-free stand-ins: the cosine of
# mean-centred pixels (it ignores brightness shifts), and d1/d2 (Gu et al. 2023), the L2 distance
# to the nearest training image over the second-nearest: a copy sits far closer to one than to any.
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
        cos.append(best.values)
        cos_idx.append(best.indices)
        l2_idx.append(d.indices[:, 0])
        ratio.append(d.values[:, 0] / d.values[:, -1].clamp_min(1e-12))
    return dict(
        cosine=torch.cat(cos),
        cosine_idx=torch.cat(cos_idx),
        ratio=torch.cat(ratio),
        l2_idx=torch.cat(l2_idx),
    )


def memorization_report(samples, train):
    nn_ = nearest_neighbours(samples, train)
    cos, ratio = nn_["cosine"], nn_["ratio"]
    report = {
        "samples": len(samples),
        "train_images": len(train),
        "cosine_mean": cos.mean().item(),
        "cosine_median": cos.median().item(),
        **{f"cosine_above_{th}": (cos > th).float().mean().item() for th in COSINE_THRESHOLDS},
        "ratio_median": ratio.median().item(),
        "copy_rate": (ratio < COPY_RATIO).float().mean().item(),
    }
    return report, nn_


def save_neighbour_grid(samples, train, idx, path, pairs=32, per_row=8, upscale=4):
    """Each pair: a sample (left) beside its nearest training image (right)."""
    from torchvision.utils import save_image

    k = min(pairs, len(samples))
    # sample 0, its neighbour, sample 1, its neighbour, ...
    tiles = torch.stack([samples[:k], train[idx[:k]].to(samples)], 1).flatten(0, 1)
    tiles = F.pad(F.interpolate(tiles, scale_factor=upscale), (0, 0, 0, upscale * 2), value=1)
    save_image((tiles + 1) / 2, path, nrow=2 * per_row, padding=2, pad_value=1)


# ------------------------------------------------------------------------------------------------
# 9. Command line: one typed Config (extensions subclass it): each setting, --flag, default, help.
# ------------------------------------------------------------------------------------------------
def option(default, help, **meta):
    """A setting with a --flag. saved=False: not in config.json."""
    return field(default=default, metadata=dict(help=help, **meta))


def fixed(default, help, **meta):
    """A setting that a --resume must repeat: it defines the run."""
    return option(default, help, same_run=True, **meta)


@dataclass
class Config:
    data: str = fixed(
        "demo", "cifar, demo (800 CIFAR-10 images), an .npz of uint8 'images' NxHxWx3, or a folder"
    )
    data_dir: str = option("data", "where --data cifar is downloaded or placed")
    n: int = fixed(None, "train on a seeded random n images (paper: 300/1000/3000)", type=int)
    sigma_tn: float = fixed(0.4, "noisy copies' EDM noise; 0 = DDPM (paper: 0.4-4; train.sh: 0.5)")
    schedule: str = fixed(
        "edm", "edm (released, log-normal) or algorithm1 (the text)", choices=("edm", "algorithm1")
    )
    ambient_weight: str = fixed("released", "Eq. 6's weight (NOTES.md)", choices=AMBIENT_WEIGHTS)
    preset: str = fixed(
        "small",
        "small (6.5M), edm (EDM's DDPM++, 54M, the paper's network) or tiny (0.7M, CPU)",
        choices=(*PRESETS, "paper"),  # "paper": the old name of small, refused with the new one
    )
    dropout: float = fixed(None, "dropout (default: the preset's; train.sh: 0.05)", type=float)
    resolution: int = fixed(None, "downsample the images to this side", type=int)
    iters: int = option(
        30000,
        "iterations (paper: 30000); a --resume with another value extends or shortens the run",
    )
    batch: int = fixed(256, "batch size (paper: 256)")
    lr: float = fixed(1e-4, "learning rate (paper: 1e-4)")
    optimizer: str = fixed("adam", "adam (released, L2) or adamw (decoupled)", choices=OPTIMIZERS)
    lr_rampup: float = fixed(0.0, "warm-up over this many million images (released: 10)")
    flip: bool = fixed(False, "random horizontal flips, an image and its noisy copy together")
    seed: int = fixed(0, "seeds the subset, S_tn, initialisation, batches and sampling")
    samples: int = option(256, "images to generate after training")
    steps: int = option(40, "ODE steps for sampling (released: 40)")
    sampler: str = option("heun", "heun (EDM's, as released) or euler", choices=("heun", "euler"))
    sample_batch: int = option(256, "images per sampling batch (batch k's noise: seed + k)")
    log_every: int = option(100, "progress line every this many steps")
    ckpt_every: int = option(1000, "checkpoint every this many steps")
    out: str = option(None, "run folder (default runs/<data>-n<n>-<method>)", type=str, saved=False)
    resume: bool = option(False, "continue --out's checkpoint; the config must match", saved=False)
    device: str = option("auto", "auto (cuda if there is one), cpu, cuda, cuda:1, ...", saved=False)
    # Not flags: the dataset's absolute path (the run fills it in), the method (baselines.py's)
    data_path: str = None
    method: str = field(default="algorithm1", metadata=dict(same_run=True))
    # What runs before 763cef1 used where their config.json lacks a key.
    LEGACY = dict(ambient_weight="x0", optimizer="adamw", dropout=0.0, lr_rampup=0.0)
    # The smallest value each number may take.
    LOWEST = dict(iters=0, lr=0, lr_rampup=0, n=2, log_every=1, ckpt_every=1)
    LOWEST.update(dict.fromkeys(["batch", "samples", "steps", "sample_batch", "resolution"], 1))
    KINDS = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}

    def __post_init__(self):
        """Each setting has its type, whether from the command line or a config.json."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type is float and type(value) is int:
                value = float(value)
                setattr(self, f.name, value)
            if value is None and f.default is None:
                continue
            number = f.type in (int, float)
            # abs(value) < 2**31 is False for NaN, inf and numbers too large for any setting
            if type(value) is not f.type or (number and not abs(value) < 2**31):
                kind = self.KINDS.get(f.type, f.type.__name__) + " below 2^31" * number
                raise UserError(f"{f.name} {reprlib.repr(value)} is not {kind}")
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise UserError(f"{f.name} {value!r} is not one of {', '.join(map(str, choices))}")
            if f.name == "preset" and value == "paper":
                raise UserError("preset 'paper' is now named 'small' (the paper's network is edm)")

    def saved(self):
        return {
            f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("saved", True)
        }

    @classmethod
    def from_saved(cls, saved, file="config.json"):
        """A run's config.json, typed and checked. Keys of other scripts' Configs are left out; a
        missing key is LEGACY's or the default (older runs lack newer ones), except data and
        resolution, which every run has written."""
        known = {f.name for f in fields(cls) if f.metadata.get("saved", True)}
        if saved.get("preset") == "paper":  # small's name before issue 24
            saved = {**saved, "preset": "small"}
        try:
            missing = [k for k in ("data", "resolution") if saved.get(k) is None]
            if missing:
                raise UserError(f"it has no {missing[0]}")
            cfg = cls(**{**cls.LEGACY, **{k: v for k, v in saved.items() if k in known}})
            cfg.check()
        except UserError as e:
            raise UserError(f"{file}: {e}; restore the run's own config.json") from None
        return cfg

    def differences(self, other):
        """The same_run keys that differ; a dataset is compared by its resolved path."""
        same_run = [f.name for f in fields(self) if f.metadata.get("same_run")]
        diff = [k for k in same_run if getattr(self, k) != getattr(other, k)]
        same_data = self.data_path and self.data_path == other.data_path
        return [k for k in diff if not (k == "data" and same_data)]

    def check(self):
        """Every check that needs no data, before anything slow happens."""
        if not (self.sigma_tn == 0 or SIGMA_MIN < self.sigma_tn < SIGMA_MAX):
            low = "below the lowest" if self.sigma_tn < 1 else "at or above the top"
            where = "negative" if self.sigma_tn < 0 else low
            raise UserError(
                f"--sigma-tn {self.sigma_tn} is {where} noise level trained ({SIGMA_MIN} to "
                f"{SIGMA_MAX}); use 0 for DDPM or a level such as 0.4 (paper: 0.4 to 4)"
            )
        for key, low in self.LOWEST.items():
            value = getattr(self, key)
            if value is not None and value < low:
                raise UserError(f"--{key.replace('_', '-')} {value} must be at least {low}")
        if not 0 <= (self.dropout or 0) < 1:
            raise UserError(f"--dropout {self.dropout} must be in [0, 1)")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        print(
            f"error: {message}; see `python {self.prog} --help` (class conditioning: "
            "conditional.py, the baselines: baselines.py, GPU options: repro_gpu.py, comparing "
            "runs: eval_memorization.py)",
            file=sys.stderr,
        )
        sys.exit(2)


def build_parser(config=Config):
    p = Parser(
        description=__doc__.split("\n\n")[0],
        epilog="Noise levels are EDM units: x = x_0 + sigma n, data in "
        "[-1, 1]; VP sigma_t = sigma / sqrt(1 + sigma^2). See README.md.",
    )
    for f in (f for f in fields(config) if "help" in f.metadata):
        meta = {k: v for k, v in f.metadata.items() if k not in ("same_run", "saved")}
        meta["help"] += "" if f.default in (None, False) else f" (default: {f.default})"
        kind = dict(default=f.default, type=type(f.default))
        if f.default is False:
            kind = dict(action="store_true")
        p.add_argument("--" + f.name.replace("_", "-"), **{**kind, **meta})
    return p


def pick_device(name):
    cuda = torch.cuda.device_count()
    try:
        device = torch.device("cuda" if cuda else "cpu") if name == "auto" else torch.device(name)
        if device.type != "cuda":  # meta holds no data; a backend this build lacks fails here
            torch.zeros(1, device=device).cpu()
    except Exception as e:
        why = f"is not a device that holds tensors here ({type(e).__name__})"
        raise UserError(f"--device {name} {why}; use auto, cpu or cuda") from None
    if device.type == "cuda" and (device.index or 0) >= cuda:
        fix = "" if cuda else "; use --device cpu"
        raise UserError(f"--device {name}: this machine has {cuda} CUDA device(s){fix}")
    return device


def check_resolution(cfg, images):
    """Fills in the config's resolution (default: the images' side, up to DEFAULT_MAX) once it
    fits the images (an array or its shape) and the network."""
    h, w = getattr(images, "shape", images)[1:3]
    step = 2 ** (len(PRESETS[cfg.preset]["mults"]) - 1)  # the U-Net halves the side this often
    if h != w:
        raise UserError(f"the images are {h}x{w}, not square: crop them to a square first")
    if h < step:
        raise UserError(
            f"the images are {h}x{w}; preset {cfg.preset} needs {step}x{step} or larger images"
        )
    if cfg.resolution is None and h > DEFAULT_MAX:
        raise UserError(
            f"the images are {h}x{w}, larger than the {DEFAULT_MAX}x{DEFAULT_MAX} the presets were "
            f"made for: pass --resolution {DEFAULT_MAX // step * step} to downsample them (or a "
            "larger side)"
        )
    cfg.resolution = cfg.resolution or h
    if cfg.resolution > h or cfg.resolution % step:
        nearest = min(h // step, max(1, round(cfg.resolution / step))) * step
        raise UserError(
            f"--resolution {cfg.resolution}: preset {cfg.preset} needs a multiple of {step} no "
            f"larger than the images' {h}; pass --resolution {nearest}"
        )


def read_config(folder):
    """A run's config.json as a dict (from_saved types and checks it)."""
    file = Path(folder) / "config.json"
    try:
        saved = json.loads(file.read_text())
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: nested too deep
        raise UserError(
            f"cannot read {file} ({type(e).__name__}): restore it or start anew"
        ) from None
    if not isinstance(saved, dict):
        raise UserError(
            f"{file} holds {reprlib.repr(saved)}, not a JSON object of settings; restore it or "
            "start anew"
        )
    return saved


def open_run(cfg, out, device, need=RESUME_KEYS):
    """The checkpoint --resume continues (keys and types as in `need`), or None: a fresh run."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder; choose another --out")
    if not cfg.resume:
        if (out / "checkpoint.pt").exists():
            raise UserError(f"{out} already holds a run; add --resume, or choose another --out")
        return None
    if not (out / "checkpoint.pt").is_file():
        raise UserError(f"--resume: no {out / 'checkpoint.pt'}; drop --resume to start fresh")
    saved = type(cfg).from_saved(read_config(out), out / "config.json")
    if saved.differences(cfg):
        differences = ", ".join(
            f"{k}: {getattr(saved, k)!r} there, {getattr(cfg, k)!r} here"
            for k in saved.differences(cfg)
        )
        raise UserError(
            f"--resume: {out} was trained with a different config ({differences}); "
            "repeat the original flags or use another --out"
        )
    # damaged: a copy or a disk that failed, not a run killed mid-write (checkpoints are atomic)
    fix = "restore it from a backup, or start again without --resume in another --out"
    return load_checkpoint(out / "checkpoint.pt", device, need, fix)


def run(cfg, method, make_step=eager_step, main_process=True):
    """Train `method` as cfg says, sample and score it; only the main process writes (multi-GPU)."""
    device = pick_device(cfg.device)
    # TF32 matmuls and convolutions on CUDA: float32 range, 10-bit mantissa, much faster
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    images, indices = method.training_set()  # fills in cfg.resolution
    cfg.data_path = str(Path(cfg.data).resolve()) if cfg.data not in ("demo", "cifar") else None
    out = Path(cfg.out or Path("runs") / f"{Path(cfg.data).stem}-n{len(indices)}-{method.label()}")
    saved = open_run(cfg, out, device)
    out.mkdir(parents=True, exist_ok=True)
    logfile = open(out / "log.txt", "a") if main_process else None

    def log(msg):
        if logfile:
            print(msg, flush=True)
            print(msg, file=logfile, flush=True)

    torch.manual_seed(cfg.seed)
    S = prepare(images, cfg.resolution, indices).to(device)
    method.use_data(S, saved)
    net = method.network().to(device)
    state = training_state(net, cfg, S[0].numel(), saved)  # checks a checkpoint before any write
    if main_process:
        (out / "config.json").write_text(json.dumps(cfg.saved(), indent=1))
        (out / "indices.json").write_text(json.dumps(indices.tolist()))
    side = cfg.resolution
    millions = sum(p.numel() for p in net.parameters()) / 1e6
    log(
        f"{'resuming' if saved else 'training'} {out}: {len(S)} images at {side}x{side} on "
        f"{device}, preset {cfg.preset} ({millions:.2f}M parameters), {method.describe()}"
    )
    if device.type == "cpu" and cfg.preset != "tiny" and cfg.iters > 1000:
        log(f"note: the {cfg.preset} preset takes days on CPU; try --preset tiny, or `make demo`")
    ema = train(method, state, cfg, out if main_process else None, log, make_step)
    if main_process:
        report(method.generate(ema, cfg.samples, log), S.cpu(), out, log)
    return out


def roughness(x):
    """Mean |difference| of neighbouring pixels: noise has far more of it than images."""
    vertical = (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    horizontal = (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    return (vertical + horizontal).item()


def report(samples, S, out, log):
    """Samples, their nearest training images, and whether they look like images at all."""
    from torchvision.utils import save_image

    enlarged = F.interpolate(samples[:64], scale_factor=max(1, 64 // samples.shape[-1]))
    save_image((enlarged + 1) / 2, out / "samples.png")
    images = ((samples + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    np.savez_compressed(out / "samples.npz", images=images)
    metrics, nn_ = memorization_report(samples, S)
    # max: training images may be flat
    metrics["roughness_vs_train"] = roughness(samples) / max(roughness(S), 1e-12)
    save_neighbour_grid(samples, S, nn_["l2_idx"], out / "neighbours.png")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    shown = (f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
    log("memorization (pixels): " + ", ".join(shown))
    # 763cef1's trained CPU runs: 0.94-1.14; untrained 2.4-3.0; noisy-only 3.6-4.0
    if metrics["roughness_vs_train"] > 1.5:
        log(
            f"warning: the samples are {metrics['roughness_vs_train']:.1f}x as rough as the "
            "training images, as noise is: the model has not learned the data, so its copy rate "
            "says nothing"
        )
    log(
        f"wrote {out}/: config.json, checkpoint.pt, samples.png, samples.npz, neighbours.png, "
        "metrics.json, log.txt"
    )


def main(argv=None, config=Config, start=lambda cfg: run(cfg, Algorithm1(cfg))):
    """ambient.py's command line; baselines.py, conditional.py and repro_gpu.py pass their own."""
    args = build_parser(config).parse_args(argv)
    # Schedulers and `timeout` stop a run as Ctrl-C does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        cfg = config(**vars(args))
        cfg.check()
        return start(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(
            "interrupted (Ctrl-C or SIGTERM); the last checkpoint is kept, continue with --resume",
            file=sys.stderr,
        )
        sys.exit(130)


if __name__ == "__main__":
    main()
