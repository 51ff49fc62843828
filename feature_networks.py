"""The feature networks of eval_memorization.py (and text_to_image.py's score) and where their
weights come from.

    Inception-v3 (FID, KID, precision/recall)  pytorch-fid's FID network, TensorFlow's 2015 weights
    DINOv2 ViT/14 (FD_DINOv2, similarity)       facebookresearch/dinov2's model, its *_pretrain.pth
    SSCD ResNet-50 (similarity, Table 5)        sscd-copy-detection's *.torchvision.pt

Each network comes with the input recipe that its metric's published numbers used: the resize, the
value range and the normalisation. Weight files are looked up by their original names (find_weights)
and never replaced by another network: a missing one raises WeightsMissing, and the caller decides.
"""

import os
import socket
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from ambient import UserError


# ------------------------------------------------------------------------------------------------
# 1. Weight files: where each one comes from and where it is looked for.
# ------------------------------------------------------------------------------------------------
WEIGHTS_ENV = "AMBIENT_WEIGHTS"  # a folder holding the files below under their original names
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + INCEPTION_FILE
)
# where torch.hub.load gets DINOv2's weights
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_{0}/dinov2_{0}_pretrain.pth"


def dinov2_file(size):
    return f"dinov2_{size}_pretrain.pth"


class WeightsMissing(Exception):
    """A weight file that is nowhere to be found: one line that says which, where and from where,
    and .short, the few words a note needs while the report goes on without it (report.json keeps
    the rest)."""

    def __init__(self, message, short=None):
        super().__init__(message)
        self.short = short or message


def find_weights(filename, url, explicit=None, download=True):
    """The path of a weight file: the explicit flag, then $AMBIENT_WEIGHTS, then the torch hub cache
    (where torch.hub.load and pytorch-fid keep it), then a download into that cache."""
    if explicit:
        if not Path(explicit).is_file():
            raise UserError(
                f"weights file {explicit} does not exist; it should be {filename} from {url}"
            )
        return Path(explicit)
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    places = ([Path(os.environ[WEIGHTS_ENV])] if os.environ.get(WEIGHTS_ENV) else []) + [hub]
    for folder in places:
        if (folder / filename).is_file():
            return folder / filename
    why = "downloads are off (--no-download)"
    if download:
        socket.setdefaulttimeout(20)  # an offline machine should fail in seconds, not hang
        try:
            hub.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(hub / filename), progress=True)
            return hub / filename
        except Exception as e:  # no network, proxy, HTTP error: all mean "not here"
            why = f"the download failed ({type(e).__name__})"
    raise WeightsMissing(
        f"{filename} is not at {' nor '.join(str(p / filename) for p in places)} and {why}; "
        f"get it from {url} and put it in ${WEIGHTS_ENV} "
        "(or the torch hub folder, or pass the flag)",
        short=f"{filename} is not in ${WEIGHTS_ENV} or the torch hub folder and {why}",
    )


def first_line(error):
    """An exception's first line, for one-line messages (torch's can run to many)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_state_dict(net, path, what, rename=lambda state: state):
    """A weights-only load (a file that asks for any Python object is refused unread); `rename`
    maps a file's parameter names onto the network's."""
    try:
        net.load_state_dict(rename(torch.load(path, map_location="cpu", weights_only=True)))
    except Exception as e:  # truncated download, wrong model size, not a state dict
        raise UserError(
            f"{path} is not a {what} state dict ({first_line(e)[:200]}); "
            "re-download it or check the size flag"
        ) from e
    return net


# ------------------------------------------------------------------------------------------------
# 2. Inception-v3 for FID: pytorch-fid's network (pool3, 2048 features) with the TensorFlow weights
# that EDM's detector (NVIDIA's inception-2015-12-05.pkl) also holds. What differs between the
# published FIDs is the way to 299 x 299: EDM's fid.py resizes uint8 images as TensorFlow 1 did
# (no half-pixel centres) and scales by (v - 128) / 128, as torch-fidelity's port does;
# pytorch-fid resizes [0, 1] images with PyTorch's half-pixel bilinear and scales by 2 x - 1. Both
# are done here, outside the network, so --fid-resize picks one. pytorch-fid's constructor downloads
# the weights; we build the same network from its blocks and load the file that find_weights
# resolved instead, so the offline rules above hold for it too.
# ------------------------------------------------------------------------------------------------
INCEPTION_SIDE = 299
FID_RESIZES = ("tf1", "pytorch-fid")
FID_RECIPES = {
    "tf1": "Inception-v3 pool3; uint8 resized to 299 by TF1's legacy bilinear, (v - 128) / 128 "
    "(EDM's fid.py)",
    "pytorch-fid": "Inception-v3 pool3; [0, 1] resized to 299 by half-pixel bilinear, 2 x - 1 "
    "(pytorch-fid)",
}


def fid_inception_v3(pf):
    """pytorch-fid's fid_inception_v3 without its download: torchvision's Inception3 (1008 classes,
    no auxiliary head, PyTorch's default initialisation), whose blocks that TensorFlow's graph
    computes differently are swapped for pytorch-fid's (pf) FID versions: average pools that leave
    the padding out, and a max pool in the last block."""
    net = torchvision.models.inception_v3(
        num_classes=1008, aux_logits=False, weights=None, init_weights=False
    )
    net.Mixed_5b = pf.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pf.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pf.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pf.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pf.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pf.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pf.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pf.FIDInceptionE_1(1280)
    net.Mixed_7c = pf.FIDInceptionE_2(2048)
    return net


POOL3_LAYERS = (  # Inception3's layers up to pool3, in order: pytorch-fid's InceptionV3 blocks 0-3
    "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1",
    "Conv2d_3b_1x1", "Conv2d_4a_3x3", "maxpool2",
    "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
    "Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool",
)  # fmt: skip


def inception_network(weights_path=None):
    """The FID Inception-v3 with the weights at weights_path (None = random init, for tests):
    299 x 299 images already scaled to [-1, 1] by inception_input -> pool3, 2048 features each."""
    try:
        from pytorch_fid import inception as pf
    except ImportError:
        raise WeightsMissing(
            "pytorch-fid is not installed (pip install pytorch-fid); "
            "it provides the FID Inception-v3"
        ) from None
    net = fid_inception_v3(pf)
    if weights_path is not None:
        try:
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(
                f"cannot read {weights_path} ({type(e).__name__}); "
                f"re-download {INCEPTION_FILE} from {INCEPTION_URL}"
            ) from e
        try:
            net.load_state_dict(state)
        except RuntimeError as e:
            raise UserError(
                f"{weights_path} is not the FID Inception-v3 state dict ({first_line(e)[:200]}); "
                f"re-download {INCEPTION_FILE} from {INCEPTION_URL}"
            ) from e
    pool3 = nn.Sequential(*(getattr(net, name) for name in POOL3_LAYERS), nn.Flatten())
    return pool3.eval().requires_grad_(False)


def resize_bilinear_tf1(x, size):
    """tf.image.resize_bilinear(align_corners=False) of TensorFlow 1, the resize in EDM's detector:
    output pixel i reads input position i * n_in / n_out (float32, as TF computes it), blends its
    floor and the next pixel (clamped to the last one) linearly, along the width and then the
    height."""

    def taps(n_in, n_out):
        scale = torch.tensor(n_in / n_out, dtype=torch.float32)
        pos = torch.arange(n_out, dtype=torch.float32, device=x.device) * scale
        lo = pos.floor().long()
        return lo, (lo + 1).clamp_max(n_in - 1), (pos - lo).to(x.dtype)

    (y0, y1, dy), (x0, x1, dx) = taps(x.shape[-2], size[0]), taps(x.shape[-1], size[1])
    upper, lower = x[..., y0, :], x[..., y1, :]
    top = upper[..., x0] + (upper[..., x1] - upper[..., x0]) * dx
    bottom = lower[..., x0] + (lower[..., x1] - lower[..., x0]) * dx
    return top + (bottom - top) * dy[:, None]


def to_uint8_values(x):
    """[-1, 1] -> the 0..255 integers that a sample file holds (exact for images from uint8)."""
    return ((x + 1) * 127.5).round().clamp(0, 255)


def inception_input(x, resize="tf1"):
    """[-1, 1] images -> the network's 299 x 299 input, as EDM (tf1) or pytorch-fid prepare it."""
    side = (INCEPTION_SIDE, INCEPTION_SIDE)
    if resize == "tf1":
        return (resize_bilinear_tf1(to_uint8_values(x), side) - 128) / 128
    return 2 * F.interpolate((x + 1) / 2, size=side, mode="bilinear", align_corners=False) - 1


def inception_forward(net, resize="tf1"):
    return lambda x: net(inception_input(x, resize))


# ------------------------------------------------------------------------------------------------
# 3. DINOv2 ViT/14, a minimal re-implementation of facebookresearch/dinov2's model as torch.hub
# builds it (img_size 518, LayerScale 1.0, no register tokens, SwiGLU MLP for ViT-g). Its parameter
# names are the hub checkpoints', so *_pretrain.pth loads strictly. Own code rather than torch.hub
# (which fetches the repository's code at run time) or timm (which brings huggingface_hub,
# safetensors and pyyaml, and resamples position embeddings differently from the original).
# ------------------------------------------------------------------------------------------------
DINOV2_SIZES = {  # width, depth, heads, MLP kind
    "vits14": (384, 12, 6, "mlp"),
    "vitb14": (768, 12, 12, "mlp"),
    "vitl14": (1024, 24, 16, "mlp"),
    "vitg14": (1536, 40, 24, "swiglu"),
}
PATCH, TRAIN_SIDE = 14, 518


class LayerScale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLU(nn.Module):
    """DINOv2's SwiGLUFFNFused: hidden width 2/3 of 4 dim, rounded up to a multiple of 8."""

    def __init__(self, dim):
        super().__init__()
        hidden = (int(4 * dim * 2 / 3) + 7) // 8 * 8
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class Block(nn.Module):
    def __init__(self, dim, heads, mlp):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.ls2 = LayerScale(dim)
        self.mlp = SwiGLU(dim) if mlp == "swiglu" else Mlp(dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, PATCH, PATCH)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class DINOv2(nn.Module):
    """forward(images with sides that are multiples of 14) -> the CLS token after the final
    LayerNorm (B, width), as the hub model returns it; how the images are prepared is the recipe's
    business."""

    def __init__(self, size="vitg14"):
        super().__init__()
        dim, depth, heads, mlp = DINOV2_SIZES[size]
        grid = TRAIN_SIDE // PATCH
        self.patch_embed = PatchEmbed(dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + grid * grid, dim) * 0.02)
        # unused at inference, but in the checkpoints
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def position_embedding(self, h, w):
        """The original's interpolate_pos_encoding: bicubic from 37x37, its +0.1 on the scale."""
        grid, dim = TRAIN_SIDE // PATCH, self.pos_embed.shape[-1]
        h0, w0 = h // PATCH, w // PATCH
        if (h0, w0) == (grid, grid):
            return self.pos_embed
        patch_pos = self.pos_embed[:, 1:].float().reshape(1, grid, grid, dim).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(
            patch_pos, scale_factor=((h0 + 0.1) / grid, (w0 + 0.1) / grid), mode="bicubic"
        )
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, h0 * w0, dim)
        return torch.cat([self.pos_embed[:, :1], patch_pos.to(self.pos_embed.dtype)], dim=1)

    def forward(self, x):
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], dim=1)
        tokens = tokens + self.position_embedding(*x.shape[-2:])
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)[:, 0]


DINOV2_NAMES = {
    "vits14": "ViT-S/14",
    "vitb14": "ViT-B/14",
    "vitl14": "ViT-L/14",
    "vitg14": "ViT-g/14",
}
FD_SIDE, IMAGENET_MEAN, IMAGENET_STD = 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def similarity_recipe(size):
    return (
        f"DINOv2 {DINOV2_NAMES.get(size, size)} CLS of [0, 1] images reflect-padded (centred) "
        "to a multiple of 14, no resize, no normalisation; top-1 cosine of L2-normalised "
        "embeddings (the authors' recipe)"
    )


def fd_dinov2_recipe(size):
    return (
        f"DINOv2 {DINOV2_NAMES.get(size, size)} CLS as the hub model returns it "
        f"(not L2-normalised) of uint8 images resized to {FD_SIDE} by PIL bicubic, "
        "ImageNet mean/std (dgm-eval, Stein et al. 2023)"
    )


def dinov2_input(x):
    """The memorization similarity's recipe, as the authors' find_dataset_neighbors.py:
    [-1, 1] -> [0, 1], reflect-padded (centred) to a multiple of 14, no resize, no ImageNet
    normalisation. Reflection keeps the border statistics that zero padding would change."""
    x = (x + 1) / 2
    h, w = x.shape[-2:]
    ph, pw = -h % PATCH, -w % PATCH
    if max(ph, pw) and min(h, w) <= (max(ph, pw) + 1) // 2:
        raise UserError(
            f"images of {h}x{w} are too small to reflect-pad to a multiple of {PATCH}; "
            "use 8x8 or larger"
        )
    if not (ph or pw):
        return x
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), mode="reflect")


def dinov2_forward(net):
    return lambda x: net(dinov2_input(x))


def dinov2_fd_input(x):
    """FD_DINOv2's recipe, dgm-eval's (Stein et al. 2023): it reads uint8 images with PIL, resizes
    them to 224 x 224 with torchvision's Resize, which on a PIL image is PIL's bicubic, then
    ToTensor and Normalize with ImageNet's mean and std. PIL's bicubic (a = -0.5, rounded to uint8)
    is not torch's."""
    from PIL import Image

    device = x.device
    images = to_uint8_values(x).byte().permute(0, 2, 3, 1).cpu().numpy()
    side = (FD_SIDE, FD_SIDE)
    resized = [Image.fromarray(im).resize(side, Image.Resampling.BICUBIC) for im in images]
    x = torch.from_numpy(np.stack([np.asarray(im) for im in resized])).to(device)
    x = x.permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return (x - mean) / std


def dinov2_fd_forward(net):
    return lambda x: net(dinov2_fd_input(x))


def dinov2_network(size, weights_path=None):
    net = DINOv2(size)
    if weights_path is not None:
        load_state_dict(net, weights_path, f"DINOv2 {size}")
    return net.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------
# 4. SSCD (Pizzi et al. 2022), the copy detector whose similarity Somepalli et al. 2023 report for
# Stable Diffusion fine-tuned on LAION-10k: torchvision's ResNet-50 with its average pool replaced
# by GeM pooling (p = 3), its fc a 2048 -> 512 projection, and L2 normalisation, as
# facebookresearch/sscd-copy-detection's Model("TV_RESNET50", 512, 3.0) builds it. Its
# *.torchvision.pt files are plain state dicts and load weights-only; its TorchScript files are
# never read, as torch.jit.load would run the code they hold.
# ------------------------------------------------------------------------------------------------
SSCD_FILE = "sscd_disc_mixup.torchvision.pt"  # SSCD's recommended default model
SSCD_URL = "https://dl.fbaipublicfiles.com/sscd-copy-detection/" + SSCD_FILE
SSCD_RESIZE, SSCD_CROP = 256, 224
SSCD_RECIPE = (
    "SSCD ResNet-50 (sscd_disc_mixup), GeM p = 3, 512-d, L2-normalised; uint8 images resized "
    "(shorter side 256, PIL bilinear), centre-cropped to 224, (v / 255 - 0.5) / 0.5; top-1 cosine "
    "(somepago/DCR's diff_retrieval.py)"
)


class GeM(nn.Module):
    """Generalised mean pooling over the spatial positions: (mean of x^p)^(1/p), x clamped at 1e-6
    (SSCD's GlobalGeMPool2d); p = 1 is average pooling, a large p tends to max pooling."""

    def __init__(self, p=3.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        return x.clamp(min=1e-6).pow(self.p).mean(dim=(-2, -1)).pow(1 / self.p)


class SSCD(nn.Module):
    def __init__(self, dims=512, p=3.0):
        super().__init__()
        self.backbone = torchvision.models.resnet50(num_classes=dims)
        self.backbone.avgpool = GeM(p)  # ResNet's forward flattens its (N, 2048) output, then fc

    def forward(self, x):
        return F.normalize(self.backbone(x), dim=1)


def with_backbone_prefix(state):
    """SSCD's Model keeps the ResNet under `backbone.`; a bare torchvision state dict has none."""
    if not isinstance(state, dict) or any(k.startswith("backbone.") for k in state):
        return state
    return {f"backbone.{k}": v for k, v in state.items()}


def sscd_network(weights_path=None):
    net = SSCD()
    if weights_path is not None:
        load_state_dict(
            net, weights_path, "SSCD ResNet-50 (*.torchvision.pt)", with_backbone_prefix
        )
    return net.eval().requires_grad_(False)


def sscd_input(x):
    """somepago/DCR's ret_transform (Somepalli et al.'s similarity, also Wen et al.'s): the uint8
    image resized with PIL's bilinear so that its shorter side is 256 (torchvision's Resize(256)),
    centre-cropped to 224 (CenterCrop), then ToTensor and Normalize(0.5, 0.5)."""
    from PIL import Image

    device, (h, w) = x.device, x.shape[-2:]
    short, long = min(h, w), max(h, w)
    size = (SSCD_RESIZE, int(SSCD_RESIZE * long / short))
    height, width = size if h <= w else size[::-1]
    top, left = round((height - SSCD_CROP) / 2), round((width - SSCD_CROP) / 2)
    images = to_uint8_values(x).byte().permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for im in images:
        resized = Image.fromarray(im).resize((width, height), Image.Resampling.BILINEAR)
        out.append(np.asarray(resized)[top : top + SSCD_CROP, left : left + SSCD_CROP])
    x = torch.from_numpy(np.stack(out)).to(device).permute(0, 3, 1, 2).float() / 255
    return (x - 0.5) / 0.5


def sscd_forward(net):
    return lambda x: net(sscd_input(x))
