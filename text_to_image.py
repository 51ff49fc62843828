"""Algorithm 1 for a text-to-image latent diffusion model (the paper's Table 5), on ambient.py.

    python text_to_image.py --pretrained stabilityai/stable-diffusion-2 --data laion10k/ --tn 100 \
        --prompts prompts.txt                                   # Table 5's setting, a GPU job
    python text_to_image.py --pretrained tiny --data folder/ --iters 20 --device cpu   # a CPU check
    torchrun --nproc_per_node=4 -- text_to_image.py --data laion10k/ --tn 100 ...   # 4 GPUs, DDP
    python text_to_image.py gpu-check            # SD-2's step at 768 px, batch 16: memory, img/s

Stable Diffusion works in a VAE's latent space with the DDPM schedule x_t = sqrt(abar_t) x_0
+ sqrt(1 - abar_t) eps over integer timesteps t, and its network predicts eps or v. Algorithm 1
carries over in these units, with sigma_t = sqrt(1 - abar_t) as ambient.py's VP sigma: line 1 draws
one noisy latent x_tn per image at timestep --tn, once; above t_n a sample starts from x_tn, never
from the clean latent, and regresses onto Lemma C.2's target, the Eq. 6 x_0-target
(x_tn - c_x x_t) / c_h mapped to eps or v; at or below t_n it is the usual fine-tuning step.
--tn 0 is plain fine-tuning.

Two text-side mitigations that Table 5 combines with it are options: Somepalli et al. 2023
(--text-noise: Gaussian noise on the text encoder's output during training; --caption-aug: random
words or numbers inserted into the captions) and --w24-threshold (Wen et al. 2024: samples whose
text-conditional noise prediction is large are left out of the loss). The folder holds images and
captions: a .txt beside each image, or diffusers' metadata.jsonl. --mixed-precision,
--grad-checkpointing and --accumulate fit SD-2 at 768 px and batch 16 on one GPU; torchrun spreads
each batch over several.
"""

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import reprlib
import shutil
import signal
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import ambient as A
from ambient import UserError, option

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


# ------------------------------------------------------------------------------------------------
# 1. Algorithm 1 in the scheduler's units. ambient.py's VP sigma_t is sqrt(1 - abar_t) and its alpha
# is sqrt(abar_t), so its noise_further (line 10) and ambient_coefficients (Lemma C.1) apply as
# they are; only the map from an x_0-target to the eps or v the network predicts is new.
# ------------------------------------------------------------------------------------------------
def sigma_of(scheduler, t):
    """VP sigma_t = sqrt(1 - abar_t) at integer timesteps t, in float64 (abar_t ~ 1 at t ~ 0)."""
    abar = scheduler.alphas_cumprod.to(torch.float64)[torch.as_tensor(t).cpu()]
    return (1 - abar).sqrt()


def make_noisy_latents(latents, scheduler, tn, seed):
    """Line 1: x_tn = sqrt(abar_tn) x_0 + sqrt(1 - abar_tn) eps, one seeded draw per image.
    tn = 0: the clean latents, plain fine-tuning."""
    if tn == 0:
        return latents.clone()
    eps = torch.randn(
        latents.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=latents.dtype
    )
    return A.add_noise(latents, sigma_of(scheduler, tn).to(latents.dtype), eps)


def usual_target(scheduler, x0, noise, t):
    """What the pretrained model regresses onto, as diffusers' fine-tuning scripts build it."""
    if scheduler.config.prediction_type == "epsilon":
        return noise
    return scheduler.get_velocity(x0, noise, t)


def ambient_target(prediction_type, x_t, x_tn, sigma_t, sigma_tn):
    """Lemma C.2: E[x_tn | x_t] = c_h E[x_0 | x_t] + c_x x_t, so (x_tn - c_x x_t) / c_h has the
    clean x_0's conditional mean; eps and v are affine in x_0 at fixed x_t, so their targets too."""
    c_h, c_x = A.ambient_coefficients(sigma_t, sigma_tn)
    a, s, c_h, c_x = (A.bcast(v.to(x_t.dtype), x_t) for v in (A.alpha(sigma_t), sigma_t, c_h, c_x))
    x0_target = (x_tn - c_x * x_t) / c_h
    if prediction_type == "epsilon":
        return (x_t - a * x0_target) / s
    # v = alpha eps - sigma x_0 with eps = (x_t - alpha x_0) / sigma, and alpha^2 + sigma^2 = 1
    return (a * x_t - x0_target) / s


def noisy_batch(scheduler, x0, x_tn, t, tn, gen):
    """Line 10 and the target at timesteps t: from x_tn above t_n (x_0 never enters), else x_0."""
    z = torch.randn(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
    noisy = (t > tn) & (tn > 0)
    sigma_t = sigma_of(scheduler, t).to(x0.device)
    # clean rows take sigma_tn = 0 and x_0 here, which keeps the unused half finite (c_h = 1)
    sigma_tn = torch.where(noisy, sigma_of(scheduler, tn).to(x0.device), torch.zeros_like(sigma_t))
    start = torch.where(A.bcast(noisy, x0), x_tn, x0)
    x_t_noisy = A.noise_further(start, sigma_tn.to(x0.dtype), sigma_t.to(x0.dtype), z)
    x_t = torch.where(A.bcast(noisy, x0), x_t_noisy, scheduler.add_noise(x0, z, t))
    kind = scheduler.config.prediction_type
    target_noisy = ambient_target(kind, x_t, start, sigma_t, sigma_tn)
    target = torch.where(A.bcast(noisy, x0), target_noisy, usual_target(scheduler, x0, z, t))
    return dict(
        x_t=x_t, target=target, t=t, noisy=noisy, noise=z, sigma_t=sigma_t, sigma_tn=sigma_tn
    )


def algorithm1_batch(scheduler, latents, x_tn, tn, batch, gen):
    """Lines 3-10: random images and t ~ U{0, ..., T-1}, as diffusers' fine-tuning draws them."""
    idx = torch.randint(len(latents), (batch,), generator=gen, device=latents.device)
    steps = scheduler.config.num_train_timesteps
    t = torch.randint(steps, (batch,), generator=gen, device=latents.device)
    return dict(noisy_batch(scheduler, latents[idx], x_tn[idx], t, tn, gen), idx=idx)


def loss_weight(b, kind):
    """released: Eq. 6's residual in the model's units (c_h^2 times the target's error), as the
    authors' code weights the x_0 form; x0: Lemma C.2's target regressed as written.
    Both are 1 at or below t_n."""
    if kind == "x0":
        return torch.ones_like(b["sigma_t"], dtype=torch.float32)
    c_h, _ = A.ambient_coefficients(b["sigma_t"], b["sigma_tn"])
    return c_h.float() ** 2


# ------------------------------------------------------------------------------------------------
# 2. Text conditioning and the mitigations Table 5 combines with Algorithm 1.
# ------------------------------------------------------------------------------------------------
def tokenize(tokenizer, captions):
    return tokenizer(
        list(captions),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def drop_captions(ids, empty_ids, p, gen):
    """Classifier-free guidance's training: a share p of the captions becomes the empty prompt."""
    drop = torch.rand(len(ids), generator=gen, device=ids.device) < p  # drawn at p = 0 too
    return torch.where(drop[:, None], empty_ids.to(ids.device), ids)


def draw_text_noise(scale, shape, gen, device):
    """Somepalli et al. 2023 (somepago/DCR, diff_train.py's rand_noise_lam): e + scale * N(0, I)
    on the text encoder's hidden states, at every training step; their code's default is 0 (off).
    Drawn for the whole batch at once (None when off), so each sample's noise is the same however
    the batch is split over processes and micro-batches."""
    if not scale:
        return None
    return scale * torch.randn(shape, generator=gen, device=device)


CAPTION_AUGS = ("none", "rand_word_add", "rand_word_repeat", "rand_numb_add")


def augment_caption(caption, kind, words, tokenizer, gen):
    """Somepalli et al. 2023's caption-side mitigations, as DCR's code writes them (datasets.py's
    insert_rand_word, sd_mitigation.py's prompt_augmentation; Wen et al.'s optim_utils.py has the
    same): `words` times a word goes into a uniformly drawn gap between the caption's
    space-separated words, either end included. rand_word_add: a random vocabulary entry (DCR
    draws a token id below 49400 and decodes it; special tokens are left out here);
    rand_word_repeat: one of the caption's own words; rand_numb_add: an integer below 100000.
    Each draw comes from `gen`: the word, then the gap."""

    def draw(n):
        return int(torch.randint(n, (), generator=gen))

    own = caption.split(" ")
    out = list(own)
    for _ in range(words):
        if kind == "rand_word_add":
            token = draw(min(49400, len(tokenizer)))
            while token in tokenizer.all_special_ids:  # CLIP's lie above 49400; drawn again
                token = draw(min(49400, len(tokenizer)))
            word = tokenizer.decode([token]).strip()
        elif kind == "rand_word_repeat":
            word = own[draw(len(own))]
        else:
            word = str(draw(100000))
        out.insert(draw(len(out) + 1), word)
    return " ".join(out)


def caption_ids(tokenizer, data, idx, cfg, gen):
    """The batch's tokenized captions; with --caption-aug each is augmented anew at every step
    with probability --caption-aug-prob (one draw per caption, made at any probability)."""
    if cfg.caption_aug == "none":
        return data.ids[idx]
    captions = []
    for i in idx.tolist():
        caption = data.captions[i]
        if float(torch.rand((), generator=gen)) < cfg.caption_aug_prob:
            caption = augment_caption(
                caption, cfg.caption_aug, cfg.caption_aug_words, tokenizer, gen
            )
        captions.append(caption)
    return tokenize(tokenizer, captions).to(data.ids.device)


def eps_per_output(prediction_type, abar):
    """How far eps moves per unit of the model's output at fixed x_t: 1 for eps; sqrt(abar_t) for
    v, from eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t; sqrt(abar_t / (1 - abar_t)) for x_0 (its
    sign dropped), from eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t)."""
    if prediction_type == "epsilon":
        return torch.ones_like(abar)
    if prediction_type == "v_prediction":
        return abar.sqrt()
    if prediction_type == "sample":
        return (abar / (1 - abar)).sqrt()
    raise UserError(f"prediction_type {prediction_type!r}: W24 knows epsilon, v_prediction, sample")


def w24_keep(pred, unet, b, empty_emb, threshold, scheduler):
    """Wen et al. 2024 (YuxinWenRick/diffusion_memorization, train_text_to_image.py's
    hard_threshold): the text-conditional part |eps(c) - eps(empty)|_2 of each sample, without
    gradient; samples at or above the threshold leave the loss. None: keep all. Their rule is on the
    noise prediction (their model predicts eps), so another model's output difference is mapped to
    eps units first: for v, sqrt(abar_t) times the v difference (1/14.6 at t = 999 for SD)."""
    if threshold is None:
        return torch.ones(len(pred), dtype=torch.bool, device=pred.device)
    x_t, t = b["x_t"], b["t"]
    with torch.no_grad():
        uncond = unet(x_t, t, empty_emb.expand(len(x_t), -1, -1)).sample
    abar = scheduler.alphas_cumprod.to(torch.float64)[t.cpu()].to(pred.device)
    scale = eps_per_output(scheduler.config.prediction_type, abar)
    diff = pred.detach().float() - uncond.float()  # in float32 under autocast too
    return diff.flatten(1).norm(dim=1) * scale < threshold


def autocast_dtype(setting, device_type):
    """--mixed-precision: auto is bf16 on CUDA and full float32 elsewhere; None = no autocast."""
    if setting == "auto":
        setting = "bf16" if device_type == "cuda" else "no"
    return dict(bf16=torch.bfloat16, fp16=torch.float16).get(setting)


def training_loss(models, b, cfg, forward=None):
    """Line 11 with the mitigations for the samples in b, whose captions' ids are b["ids"] and
    text noise b.get("text_noise"): the sum of the kept samples' weighted losses, and which were
    kept. The UNet runs under autocast (--mixed-precision) with float32 weights; the loss is
    float32. forward: the UNet or its DistributedDataParallel wrapper."""
    forward = forward or models.unet
    with torch.no_grad():
        emb = models.text_encoder(b["ids"])[0]
    if b.get("text_noise") is not None:
        emb = emb + b["text_noise"]
    dtype = autocast_dtype(cfg.mixed_precision, b["x_t"].device.type)
    with torch.autocast(b["x_t"].device.type, dtype or torch.bfloat16, enabled=dtype is not None):
        pred = forward(b["x_t"], b["t"], emb).sample
        keep = w24_keep(pred, models.unet, b, models.empty_emb, cfg.w24_threshold, models.scheduler)
    per_sample = (pred.float() - b["target"].float()).square().flatten(1).mean(1)
    per_sample = per_sample * loss_weight(b, cfg.ambient_weight).to(pred.device)
    return (per_sample * keep).sum(), keep


# ------------------------------------------------------------------------------------------------
# 3. Models: a Stable Diffusion 2 pipeline's parts, or a tiny random one for CPU checks and tests.
# ------------------------------------------------------------------------------------------------
# --grad-checkpointing auto: on for UNets above this many parameters (NOTES.md). Stable Diffusion's
# UNets (SD-1/2: 865M, SDXL: 2.6B) are far above it; the tiny CPU model (0.05M) and small UNets
# whose activations fit without it are below.
CHECKPOINTING_ABOVE = 100e6


class Models:
    """unet, vae, text_encoder, tokenizer and a DDPM scheduler for training, on one device."""

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler):
        from diffusers import DDPMScheduler

        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.scheduler = DDPMScheduler.from_config(scheduler.config)  # as diffusers' train script
        self.vae.requires_grad_(False).eval()
        self.text_encoder.requires_grad_(False).eval()
        kind = self.scheduler.config.prediction_type
        if kind not in ("epsilon", "v_prediction"):
            raise UserError(
                f"the scheduler's prediction_type is {kind!r}; this script trains epsilon "
                "or v_prediction models (Stable Diffusion 2: v_prediction)"
            )

    def to(self, device):
        for m in (self.unet, self.vae, self.text_encoder):
            m.to(device)
        with torch.no_grad():
            self.empty_emb = self.text_encoder(tokenize(self.tokenizer, [""]).to(device))[0]
        return self

    @property
    def vae_factor(self):
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def tiny_tokenizer(max_length=16):
    """A CLIP tokenizer with one token per byte and no merges: built in memory, no download."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())
    words = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    return CLIPTokenizer(
        vocab={w: i for i, w in enumerate(words)}, merges=[], model_max_length=max_length
    )


def tiny_models(prediction_type="v_prediction", seed=0):
    """Random SD-shaped parts, small enough for a CPU test: 16x16 images, 8x8 latents."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=tok.model_max_length,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        norm_num_groups=4,
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=2,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4,
        sample_size=16,
    )
    sched = DDPMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction_type,
    )  # Stable Diffusion's schedule
    return Models(unet, vae, text, tok, sched)


def load_pretrained(name):
    """A Stable Diffusion pipeline's parts from a local folder or the Hugging Face Hub."""
    looks_local = name.startswith((".", "/", "~")) or os.sep in name.strip("/").split("/", 1)[-1]
    if looks_local and not Path(name).expanduser().is_dir():
        raise UserError(
            f"--pretrained {name}: no such folder; pass a folder holding a Stable Diffusion "
            "pipeline, a Hub name such as stabilityai/stable-diffusion-2, or tiny"
        )
    try:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(
            str(Path(name).expanduser()) if looks_local else name, safety_checker=None
        )
    except Exception as err:  # offline, a missing repo, a gated one: all end here
        cause, fix = load_failure(err)
        raise UserError(
            f"--pretrained {name}: cannot load a Stable Diffusion pipeline ({cause}); {fix}"
        ) from None
    return Models(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler)


def load_failure(err):
    """(the cause in one line, its fix) for a failed from_pretrained. diffusers re-raises a Hub
    error (gated, missing, offline) as an OSError that points at the traceback, so the chain of
    causes is read, as Python prints it."""
    chain = [err]
    while len(chain) < 8:
        last = chain[-1]
        nxt = last.__cause__ or (None if last.__suppress_context__ else last.__context__)
        if nxt is None:
            break
        chain.append(nxt)
    names = {type(e).__name__ for e in chain}
    text = " ".join(str(e) for e in chain).lower()
    missing = next((e for e in chain if isinstance(e, ImportError)), None)
    offline = "huggingface-cli download stabilityai/stable-diffusion-2 --local-dir sd2"
    if "GatedRepoError" in names or "gated" in text:
        fix = (
            "the model is gated: accept its terms on its huggingface.co page, then run "
            "`huggingface-cli login` (or download it where you can and pass the folder)"
        )
    elif missing is not None:
        fix = f"a package is missing: pip install {missing.name or 'it'}"
    elif "RepositoryNotFoundError" in names or "repository not found" in text:
        fix = "no such model on the Hub (or it is private): check the name"
    elif "model_index.json" in text:
        fix = "pass a folder that holds a diffusers pipeline (its model_index.json)"
    elif any(w in text for w in ("connect", "offline", "cached", "resolve", "timed out")):
        fix = f"on an offline machine download it elsewhere ({offline}) and pass the folder"
    else:
        fix = "pass a Stable Diffusion pipeline's folder or Hub name, or tiny"
    root = chain[-1]
    message = " ".join(str(root).split())
    message = message[:200] + "..." if len(message) > 200 else message
    return f"{type(root).__name__}: {message}" if message else type(root).__name__, fix


def load_models(cfg):
    if cfg.pretrained == "tiny":
        return tiny_models(cfg.tiny_prediction, cfg.seed)
    return load_pretrained(cfg.pretrained)


# ------------------------------------------------------------------------------------------------
# 4. Data: a folder of images and captions -> VAE latents (times the scaling factor), computed once.
# ------------------------------------------------------------------------------------------------
def read_captions(folder):
    """(image, caption) pairs: metadata.jsonl's file_name and text (or caption), else name.txt;
    every image's header is read (its size, PIL's bomb check) before anything is decoded."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--data {folder}: no such folder; pass a folder of images with captions")
    meta = folder / "metadata.jsonl"
    if meta.exists() or meta.is_symlink():
        pairs = captions_from_jsonl(meta)
    else:
        pairs = []
        for image in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            txt = image.with_suffix(".txt")
            if not txt.is_file():
                raise UserError(
                    f"{image} has no caption: write {txt.name} beside it, or a metadata.jsonl"
                )
            pairs.append((image, read_text(txt).strip()))
        if not pairs:
            raise UserError(f"no {'/'.join(IMAGE_SUFFIXES)} images in {folder}")
    for image, _ in pairs:
        A.open_image(image)
    return pairs


def read_text(path):
    """A caption file's text, read as UTF-8 (the encoding of diffusers' datasets); a leading byte
    order mark is not part of the caption."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8"
        ) from None
    except OSError as e:
        raise UserError(f"cannot read {path} ({type(e).__name__}); restore or remove it") from None


def captions_from_jsonl(meta):
    pairs = []
    for i, line in enumerate(read_text(meta).splitlines()):
        if line.strip():
            pairs.append(caption_row(meta, i + 1, line))
    missing = [p for p, _ in pairs if not p.is_file()]
    if missing or not pairs:
        raise UserError(f"{meta}: {missing[0] if missing else 'no rows'}; list the folder's images")
    return pairs


def caption_row(meta, number, line):
    """One metadata.jsonl line: a JSON object whose file_name and text (or caption) are strings."""
    where, fix = f"{meta} line {number}", "write a JSON object with file_name and text strings"
    try:
        row = json.loads(line)
    except (ValueError, RecursionError) as e:  # RecursionError: nested too deep
        raise UserError(f"{where} is not JSON ({type(e).__name__}); {fix}") from None
    if not isinstance(row, dict):
        raise UserError(f"{where} holds {reprlib.repr(row)}, not an object; {fix}")
    for key in ("file_name", "text" if "text" in row else "caption"):
        if not isinstance(row.get(key), str):
            what = f"its {key} is {reprlib.repr(row[key])}" if key in row else f"it has no {key}"
            raise UserError(f"{where}: {what}, not a string; {fix}")
    return meta.parent / row["file_name"], row["text" if "text" in row else "caption"]


def load_image(path, resolution):
    """Shorter side resized to `resolution`, centre crop, [-1, 1] NCHW, as diffusers' scripts do."""
    from PIL import Image

    im = Image.fromarray(A.open_image(path, read=True))  # 16-bit grey scaled, not clipped
    scale = resolution / min(im.size)
    w, h = max(resolution, round(im.width * scale)), max(resolution, round(im.height * scale))
    im = im.resize((w, h), Image.BILINEAR)
    left, top = (w - resolution) // 2, (h - resolution) // 2
    im = im.crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 127.5 - 1


@torch.no_grad()
def encode_latents(models, paths, resolution, device, batch=8):
    """The VAE posterior's mean times the scaling factor: one fixed latent x_0 per image."""
    out = []
    for i in range(0, len(paths), batch):
        x = torch.stack([load_image(p, resolution) for p in paths[i : i + batch]]).to(device)
        out.append(models.vae.encode(x).latent_dist.mean.float().cpu())
    return torch.cat(out) * models.vae.config.scaling_factor


def latents_key(models, cfg, pairs):
    """What the latents are made of, each part of which changes them: the model named, its VAE's
    config and weights (the tiny model's depend on --seed), the resolution, and the images' bytes
    in order; the captions are tokenized at each start, so they may change."""
    vae, images = hashlib.sha256(), hashlib.sha256()
    # without diffusers' own entries: _use_default_values lists a set, in another order each run
    config = {k: v for k, v in models.vae.config.items() if not k.startswith("_")}
    vae.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, weights in models.vae.state_dict().items():
        vae.update(name.encode())
        vae.update(weights.detach().cpu().reshape(-1).view(torch.uint8).numpy())
    for image, _ in pairs:
        content = image.read_bytes()  # read_captions opened each one
        images.update(len(content).to_bytes(8, "little") + content)
    return dict(
        pretrained=cfg.pretrained,
        vae=vae.hexdigest(),
        resolution=cfg.resolution,
        images=images.hexdigest(),
    )


def latents_shape(models, cfg, count):
    side = cfg.resolution // models.vae_factor
    return (count, models.vae.config.latent_channels, side, side)


def cached_latents(path, key, shape):
    """(latents, []) from path when it was made from what `key` names, once checked against
    `shape`; else None and the parts of the key that differ (none: no cache, or one made before
    caches had keys), to be encoded again. Writes nothing."""
    fix = "delete it to encode the images again"
    if not (path.exists() or path.is_symlink()):
        return None, []
    if not path.is_file():
        raise UserError(f"{path} is not a file; {fix}")
    # weights_only: a cache copied from elsewhere runs no code (one that needs more is refused)
    cache = A.load_checkpoint(path, need=dict(latents=torch.Tensor), fix=fix)
    old = cache.get("key")
    if old != key:
        return None, [k for k in key if isinstance(old, dict) and old.get(k) != key[k]]
    latents = cache["latents"]
    if latents.dtype != torch.float32 or tuple(latents.shape) != shape:
        raise UserError(
            f"{path} holds {str(latents.dtype)[6:]} latents of shape {tuple(latents.shape)}, "
            f"not float32 ones of shape {shape} for {shape[0]} images; {fix}"
        )
    return latents, []


def prepare_latents(models, pairs, cfg, out, saved, device):
    """x_0 from out/latents.pt, or encoded (every image decoded, nothing written yet), and x_tn
    from the checkpoint, or drawn; with the cache still to save and its log line (None: cached)."""
    shape, key = latents_shape(models, cfg, len(pairs)), latents_key(models, cfg, pairs)
    latents, other = cached_latents(out / "latents.pt", key, shape)
    if saved and other:
        raise UserError(
            f"--resume: {out / 'latents.pt'} was made from another {', '.join(other)} than this "
            "run's: resume with the images and model it was trained on, or start anew"
        )
    x_tn, cache = saved_x_tn(saved, shape), None
    if latents is None:
        t0 = time.time()
        latents = encode_latents(models, [p for p, _ in pairs], cfg.resolution, device)
        bad = (~latents.flatten(1).isfinite().all(1)).nonzero().flatten().tolist()
        if bad:
            raise UserError(
                f"the VAE encoded {len(bad)} images to latents that are not finite (the first: "
                f"{pairs[bad[0]][0]}); check --pretrained's VAE (its weights and dtype)"
            )
        why = f" ({out / 'latents.pt'} was made from another {', '.join(other)})" if other else ""
        note = f"encoded {len(pairs)} images to latents {shape[1:]} in {time.time() - t0:.0f} s"
        cache = dict(latents=latents, key=key), note + why
    if x_tn is None:
        x_tn = make_noisy_latents(latents, models.scheduler, cfg.tn, cfg.seed)
    return latents, x_tn, cache


def save_atomic(obj, path):
    """torch.save to path.tmp, then rename: a run stopped or failing midway keeps the last file
    and leaves no .tmp behind."""
    tmp = Path(str(path) + ".tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt too: SIGTERM arrives as one (ambient.main)
        tmp.unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------------------
# 5. Training (Algorithm 1, lines 2-16): AdamW on the UNet, the text encoder and VAE frozen, as in
# both mitigations' fine-tuning scripts; atomic checkpoints that hold line 1's noisy latents.
# ------------------------------------------------------------------------------------------------
@dataclass
class TrainData:
    latents: torch.Tensor  # x_0, the VAE latents times the scaling factor
    x_tn: torch.Tensor  # line 1's one noisy copy per latent; fixed for the whole run
    ids: torch.Tensor  # each image's caption, tokenized
    # the empty prompt: caption dropout's and guidance's unconditional input
    empty_ids: torch.Tensor
    captions: list = None  # each image's caption, for --caption-aug


@dataclass
class TrainState:
    unet: torch.nn.Module
    opt: torch.optim.Optimizer
    gen: torch.Generator  # batches, timesteps, noise and caption dropout
    noise_gen: torch.Generator  # --text-noise only, so that it leaves every other draw in place
    caption_gen: torch.Generator = None  # --caption-aug only, on the CPU, likewise
    scaler: torch.amp.GradScaler = None  # fp16's loss scale; a no-op otherwise
    forward: torch.nn.Module = None  # the UNet, or its DistributedDataParallel wrapper
    rank: int = 0  # this process and the number of processes (torchrun)
    world: int = 1
    step: int = 0


def training_state(unet, cfg, device, saved=None, rank=0, world=1):
    device = torch.device(device)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=1e-2)
    fp16 = autocast_dtype(cfg.mixed_precision, device.type) == torch.float16
    forward = unet
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        forward = torch.nn.parallel.DistributedDataParallel(unet, device_ids=ids)
    state = TrainState(
        unet,
        opt,
        torch.Generator(device).manual_seed(cfg.seed + 2),
        torch.Generator(device).manual_seed(cfg.seed + 3),
        torch.Generator().manual_seed(cfg.seed + 4),
        torch.amp.GradScaler(device.type, enabled=fp16),
        forward,
        rank,
        world,
    )
    if saved is not None:
        try:
            unet.load_state_dict(saved["unet"])
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise UserError(
                f"--resume: the checkpoint's unet does not fit this model ({type(err).__name__}); "
                "resume with the same --pretrained"
            ) from None
        # step, generator states and optimizer state against the live ones, before any is used;
        # caption_rng: runs before --caption-aug lack it
        generators = dict(rng=state.gen, noise_rng=state.noise_gen, caption_rng=state.caption_gen)
        A.check_training_entries(saved, opt, generators)
        opt.load_state_dict(saved["opt"])
        for name, gen in generators.items():
            if name in saved:
                gen.set_state(saved[name].cpu())
        if fp16 and saved.get("scaler"):  # an fp16 run's loss scale; {} in other runs
            load_scaler(state.scaler, saved["scaler"])
        state.step = saved["step"]
    return state


def load_scaler(scaler, saved):
    """An fp16 run's GradScaler state from its checkpoint, checked first: a positive finite scale,
    positive factors and counts."""
    keys = dict(scale=float, growth_factor=float, backoff_factor=float, growth_interval=int)
    keys["_growth_tracker"] = int
    ok = isinstance(saved, dict) and all(type(saved.get(k)) is t for k, t in keys.items())
    if not ok or not all(0 <= saved[k] < math.inf for k in keys) or not saved["scale"] > 0:
        raise UserError(
            f"--resume: the checkpoint's scaler is {reprlib.repr(saved)}, not an fp16 loss "
            "scale's state; restore checkpoint.pt from a copy, or start anew in another --out"
        )
    scaler.load_state_dict(saved)


def save_checkpoint(state, data, cfg, path):
    """Atomic (save_atomic): a run stopped mid-write keeps the last one."""
    save_atomic(
        dict(
            unet=state.unet.state_dict(),
            opt=state.opt.state_dict(),
            step=state.step,
            rng=state.gen.get_state(),
            noise_rng=state.noise_gen.get_state(),
            caption_rng=state.caption_gen.get_state(),
            scaler=state.scaler.state_dict(),
            x_tn=data.x_tn.cpu(),
            config=cfg.saved(),
        ),
        path,
    )


def global_batch(models, data, state, cfg):
    """Every draw of one optimizer step, for the whole batch of cfg.batch: images, timesteps and
    noise (lines 3-10), the captions (--caption-aug on its own generator), caption dropout, the
    text noise (its own generator). Every process makes all of them from generators seeded alike,
    so all hold the same batch, whatever the number of processes and micro-batches."""
    b = algorithm1_batch(models.scheduler, data.latents, data.x_tn, cfg.tn, cfg.batch, state.gen)
    ids = caption_ids(models.tokenizer, data, b["idx"], cfg, state.caption_gen)
    b["ids"] = drop_captions(ids, data.empty_ids, cfg.caption_dropout, state.gen)
    shape = (cfg.batch, *models.empty_emb.shape[1:])
    b["text_noise"] = draw_text_noise(cfg.text_noise, shape, state.noise_gen, data.latents.device)
    return b


def micro_batches(b, rank, world, accumulate):
    """This process's slice of the global batch (rank r of w: its r-th w-th), in `accumulate`
    consecutive micro-batches."""
    mine = {k: v.chunk(world)[rank] for k, v in b.items() if v is not None}
    return [{k: v.chunk(accumulate)[i] for k, v in mine.items()} for i in range(accumulate)]


def train_step(models, data, state, cfg):
    """One optimizer step on the global batch, in this process's micro-batches: the gradient of the
    mean loss over the samples W24 kept in the whole batch, as one process with the whole batch in
    one piece computes it (DDP averages the processes' gradients). Wen et al.'s code makes no update
    when the threshold leaves no sample."""
    b = global_batch(models, data, state, cfg)
    share = cfg.batch / state.world  # each process's loss sum over its share of the batch
    totals = torch.zeros(2, device=b["x_t"].device)  # loss sum, samples kept
    state.opt.zero_grad(set_to_none=True)
    parts = micro_batches(b, state.rank, state.world, cfg.accumulate)
    for i, part in enumerate(parts):
        sync = state.world == 1 or i == len(parts) - 1  # DDP reduces on the last one only
        with contextlib.nullcontext() if sync else state.forward.no_sync():
            loss_sum, keep = training_loss(models, part, cfg, state.forward)
            state.scaler.scale(loss_sum / share).backward()
        totals += torch.stack([loss_sum.detach(), keep.sum().to(totals.dtype)])
    if state.world > 1:
        torch.distributed.all_reduce(totals)
    kept = int(totals[1])
    if kept:
        state.scaler.unscale_(state.opt)
        if kept < cfg.batch:  # a mean over the kept samples, not the whole batch
            for p in state.unet.parameters():
                if p.grad is not None:
                    p.grad.mul_(cfg.batch / kept)
        torch.nn.utils.clip_grad_norm_(state.unet.parameters(), cfg.max_grad_norm)
        state.scaler.step(state.opt)
        state.scaler.update()
    return totals[0] / max(kept, 1), kept


def check_finite(state, loss, cfg, first):
    """Stops the run at a loss or weights that are not finite, before a checkpoint keeps them,
    naming which and the setting to change (`first`: the step this start began at)."""
    weights = A.weights_finite(state.unet)
    if weights and torch.isfinite(loss):
        return
    again = "start again with a lower"
    if not weights:
        what = f"the weights are not finite after step {state.step}"
        fix = f"{again} --lr ({cfg.lr:g}) or --max-grad-norm ({cfg.max_grad_norm:g})"
    elif state.step == first + 1:  # from the weights as loaded: the inputs overflow
        what = f"the loss is not finite at step {state.step}, the first from the loaded weights"
        fix = (
            f"{again} --text-noise ({cfg.text_noise:g})" if cfg.text_noise else "check --pretrained"
        )
    else:
        what = f"the loss is not finite at step {state.step}: the updates overflowed the weights"
        fix = f"{again} --lr ({cfg.lr:g})"
    raise UserError(f"{what}; {fix} (the last checkpoint is kept)")


def train(models, data, state, cfg, out=None, log=print):
    """Steps until cfg.iters, logging and checkpointing into the folder `out` (None: nothing)."""
    models.unet.train()
    t0, first, kept = time.time(), state.step, 0
    while state.step < cfg.iters:
        try:
            loss, k = train_step(models, data, state, cfg)
        except torch.cuda.OutOfMemoryError:
            raise UserError(out_of_memory(cfg, state.step + 1)) from None
        state.step, kept = state.step + 1, kept + k
        last = state.step == cfg.iters
        if not torch.isfinite(loss) or state.step % cfg.ckpt_every == 0 or last:
            check_finite(state, loss, cfg, first)
        if state.step % cfg.log_every == 0 or last:
            rate = (state.step - first) * cfg.batch / (time.time() - t0)
            log(
                f"step {state.step}/{cfg.iters}  loss {loss.item():.4f}  {rate:.1f} img/s  "
                f"kept {kept / ((state.step - first) * cfg.batch):.2f}"
            )
        if out and (state.step % cfg.ckpt_every == 0 or last):
            save_checkpoint(state, data, cfg, Path(out) / "checkpoint.pt")
    if out and first == cfg.iters == 0:
        save_checkpoint(state, data, cfg, Path(out) / "checkpoint.pt")
    models.unet.eval()


# ------------------------------------------------------------------------------------------------
# 6. Sampling with classifier-free guidance: DDIM on the model's own schedule, u + w (c - u).
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def sample(models, prompt, count, guidance, steps, seed, resolution):
    """`count` images for one prompt, in [-1, 1]; the initial noise comes from `seed` alone."""
    from diffusers import DDIMScheduler

    device = next(models.unet.parameters()).device
    sched = DDIMScheduler.from_config(models.scheduler.config)
    sched.set_timesteps(steps, device=device)
    cond = models.text_encoder(tokenize(models.tokenizer, [prompt] * count).to(device))[0]
    emb = torch.cat([models.empty_emb.expand(count, -1, -1), cond])
    side, channels = resolution // models.vae_factor, models.unet.config.in_channels
    x = torch.randn((count, channels, side, side), generator=torch.Generator().manual_seed(seed))
    x = x.to(device) * sched.init_noise_sigma
    for t in sched.timesteps:
        u, c = models.unet(torch.cat([x, x]), t, emb).sample.chunk(2)
        x = sched.step(u + guidance * (c - u), t, x).prev_sample
    return models.vae.decode(x / models.vae.config.scaling_factor).sample.clamp(-1, 1).float().cpu()


def read_prompts(path):
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
        prompts = [line.strip() for line in lines if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(
            f"--prompts {path}: cannot read it ({type(err).__name__}); pass a text file "
            "with one prompt a line"
        ) from None
    if not prompts:
        raise UserError(f"--prompts {path} holds no prompt; write one prompt a line")
    return prompts


def generate(models, prompts, cfg, out, log=print, step=None):
    """samples/<prompt>_<k>.png and samples.npz (uint8 images, prompts, and `drawn`: the seed,
    steps, guidance and training step they were drawn with, which score compares); prompt i:
    seed + i."""
    from torchvision.utils import save_image

    folder = Path(out) / "samples"
    folder.mkdir(exist_ok=True)
    images, names = [], []
    for i, prompt in enumerate(prompts):
        x = sample(
            models,
            prompt,
            cfg.samples_per_prompt,
            cfg.guidance,
            cfg.steps,
            cfg.seed + i,
            cfg.resolution,
        )
        if x.isnan().any():  # an image of NaN would be saved black
            finite = A.weights_finite(models.unet)
            why = f"lower --guidance ({cfg.guidance:g})" if finite else "the weights are not"
            raise UserError(f"the samples of prompt {i + 1} are not finite: {why}")
        for k, im in enumerate(x):
            save_image((im + 1) / 2, folder / f"{i:05d}_{k}.png")
        images.append(((x + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
        names += [prompt] * len(x)
    drawn = json.dumps(dict(seed=cfg.seed, steps=cfg.steps, guidance=cfg.guidance, step=step))
    np.savez_compressed(
        Path(out) / "samples.npz",
        images=np.concatenate(images),
        prompts=np.array(names),
        drawn=np.array(drawn),
    )
    log(f"wrote {len(names)} samples for {len(prompts)} prompts to {folder} and {out}/samples.npz")


# ------------------------------------------------------------------------------------------------
# 7. Command line: ambient.py's option(), parser, resume checks and error handling.
# ------------------------------------------------------------------------------------------------
@dataclass
class Config:
    data: str = option(
        None,
        "folder of images with captions (name.txt beside each image, or "
        "metadata.jsonl with file_name and text)",
        type=str,
        same_run=True,
    )
    pretrained: str = option(
        "stabilityai/stable-diffusion-2",
        "a Stable Diffusion pipeline: Hub name "
        "or local folder; tiny = a small random model for CPU checks",
        same_run=True,
    )
    tiny_prediction: str = option(
        "v_prediction",
        "the tiny model's prediction_type (a pretrained model's scheduler says its own)",
        choices=("v_prediction", "epsilon"),
        same_run=True,
    )
    resolution: int = option(
        None, "image side (default: the model's; SD2: 768)", type=int, same_run=True
    )
    tn: int = option(
        100,
        "the noisy latents' scheduler timestep t_n; 0 = plain fine-tuning "
        "(paper, Appendix E: 25, 50, 100 tried)",
        same_run=True,
    )
    ambient_weight: str = option(
        "released",
        "released (Eq. 6's residual, the authors' weighting) or x0 (Lemma C.2's target unweighted)",
        choices=A.AMBIENT_WEIGHTS,
        same_run=True,
    )
    iters: int = option(100000, "iterations (paper: 100k); a --resume may extend the run")
    batch: int = option(16, "batch size (paper: 16)", same_run=True)
    lr: float = option(1e-5, "AdamW learning rate (Wen et al.'s fine-tuning: 1e-5)", same_run=True)
    max_grad_norm: float = option(
        1.0, "gradient clipping (both mitigations' scripts: 1)", same_run=True
    )
    caption_dropout: float = option(
        0.1,
        "share of captions replaced by the empty prompt, for classifier-free guidance",
        same_run=True,
    )
    text_noise: float = option(
        0.0,
        "Somepalli et al. 2023: std of Gaussian noise added to the text "
        "embedding in training (DCR's rand_noise_lam; 0 = off)",
        same_run=True,
    )
    w24_threshold: float = option(
        None,
        "Wen et al. 2024: leave out samples whose text-conditional "
        "prediction norm is at least this (their README: 2)",
        type=float,
        same_run=True,
    )
    caption_aug: str = option(
        "none",
        "Somepalli et al. 2023's caption augmentation, drawn anew each step (NOTES.md): "
        "rand_word_add, rand_word_repeat or rand_numb_add",
        choices=CAPTION_AUGS,
        same_run=True,
    )
    caption_aug_words: int = option(
        1,
        "words inserted per augmented caption (Wen et al.'s training: 1; DCR's: 2)",
        same_run=True,
    )
    caption_aug_prob: float = option(
        1.0,
        "share of captions augmented at each step (Wen et al.'s training: 1; DCR's: 0.1)",
        same_run=True,
    )
    seed: int = option(0, "seeds the noisy latents, batches and sampling", same_run=True)
    mixed_precision: str = option(
        "auto",
        "autocast for the UNet, float32 weights and optimizer: bf16, fp16 (with a loss scale) or "
        "no; auto = bf16 on CUDA, no (float32) on CPU",
        choices=("auto", "bf16", "fp16", "no"),
    )
    grad_checkpointing: str = option(
        "auto",
        "recompute the UNet's activations in the backward pass (less memory, about a third more "
        f"time): on, off, or auto = on above {CHECKPOINTING_ABOVE / 1e6:.0f}M parameters",
        choices=("auto", "on", "off"),
    )
    accumulate: int = option(
        1, "micro-batches per step: each process runs its share of --batch in this many pieces"
    )
    prompts: str = option(None, "text file, one prompt a line, sampled after training", type=str)
    samples_per_prompt: int = option(1, "images per prompt")
    steps: int = option(50, "DDIM steps for sampling")
    guidance: float = option(7.5, "classifier-free guidance weight w in u + w (c - u); 1 = none")
    log_every: int = option(100, "progress line every this many steps")
    ckpt_every: int = option(1000, "checkpoint every this many steps")
    out: str = option(None, "run folder (default: runs/t2i-<data>-tn<tn>)", type=str, saved=False)
    export: str = option(
        None,
        "after training, write the UNet (the weights sampling uses) to this folder with "
        "save_pretrained, for UNet2DConditionModel.from_pretrained",
        type=str,
        saved=False,
    )
    resume: bool = option(
        False, "continue the checkpoint in --out; the config must match", saved=False
    )
    device: str = option("auto", "auto (cuda if there is one), cpu, cuda, ...", saved=False)
    data_path: str = None  # not a flag: the resolved data folder, which a resume compares
    LEGACY = {}
    KINDS = A.Config.KINDS

    # typed as ambient.py's: each setting of its type, numbers finite and below 2^31, choices kept
    __post_init__ = A.Config.__post_init__
    saved = A.Config.saved
    differences = A.Config.differences
    from_saved = classmethod(A.Config.from_saved.__func__)

    def check(
        self,
    ):  # what needs no model; the timestep range is checked once the scheduler is loaded
        if self.data is None:
            raise UserError("pass --data FOLDER, a folder of images with captions")
        for key, low in dict(
            iters=0,
            batch=1,
            tn=0,
            samples_per_prompt=1,
            steps=1,
            log_every=1,
            ckpt_every=1,
            resolution=8,
        ).items():
            if getattr(self, key) is not None and getattr(self, key) < low:
                raise UserError(
                    f"--{key.replace('_', '-')} {getattr(self, key)} must be at least {low}"
                )
        if not 0 <= self.caption_dropout < 1:
            raise UserError(f"--caption-dropout {self.caption_dropout} must be in [0, 1)")
        if self.text_noise < 0 or (self.w24_threshold is not None and self.w24_threshold <= 0):
            raise UserError("--text-noise must be at least 0 and --w24-threshold above 0")
        if self.lr <= 0 or self.max_grad_norm <= 0:
            raise UserError("--lr and --max-grad-norm must be above 0")
        if not 1 <= self.accumulate <= self.batch or self.batch % self.accumulate:
            raise UserError(
                f"--accumulate {self.accumulate} must divide --batch {self.batch} into "
                "micro-batches of one size"
            )
        if not 1 <= self.caption_aug_words <= 64 or not 0 <= self.caption_aug_prob <= 1:
            raise UserError("--caption-aug-words must be 1 to 64 and --caption-aug-prob in [0, 1]")


def check_model(cfg, models):
    """--tn and --resolution against the loaded scheduler, VAE and UNet; fills in the resolution."""
    steps = models.scheduler.config.num_train_timesteps
    if cfg.tn >= steps:
        raise UserError(
            f"--tn {cfg.tn}: the scheduler has timesteps 0 to {steps - 1}; "
            "the paper tried 25, 50 and 100"
        )
    if cfg.steps > steps:
        raise UserError(
            f"--steps {cfg.steps}: the scheduler has {steps} timesteps; pass {steps} or fewer"
        )
    down = models.vae_factor * 2 ** (len(models.unet.config.block_out_channels) - 1)
    cfg.resolution = cfg.resolution or models.unet.config.sample_size * models.vae_factor
    if cfg.resolution % down:
        raise UserError(
            f"--resolution {cfg.resolution}: this model needs a multiple of {down}; pass "
            f"--resolution {max(1, round(cfg.resolution / down)) * down}"
        )


def distributed(device):
    """(rank, world size, this process's device). Under torchrun (WORLD_SIZE > 1) the first call
    joins the process group: nccl with one GPU a process (LOCAL_RANK) on CUDA, gloo on a CPU."""
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return 0, 1, device
    import torch.distributed as dist

    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        if local >= torch.cuda.device_count():
            raise UserError(
                f"process {local} of torchrun has no GPU of its own ({torch.cuda.device_count()} "
                "here); pass --nproc_per_node at most the number of GPUs"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def first_rank_done(world, error=None):
    """Under torchrun: the first process's outcome of its part (an error's message, or None)
    reaches every process, and each raises the error, so that none waits at a barrier for a process
    that has stopped."""
    box = [error]
    if world > 1:
        torch.distributed.broadcast_object_list(box, src=0)
    if box[0]:
        raise UserError(box[0])


def use_checkpointing(setting, unet):
    """--grad-checkpointing auto: on above CHECKPOINTING_ABOVE parameters (NOTES.md)."""
    if setting == "auto":
        return sum(p.numel() for p in unet.parameters()) > CHECKPOINTING_ABOVE
    return setting == "on"


def prepare_unet(unet, cfg):
    """Gradient checkpointing as --grad-checkpointing says; whether it is on."""
    if use_checkpointing(cfg.grad_checkpointing, unet):
        unet.enable_gradient_checkpointing()
    return unet.is_gradient_checkpointing


def out_of_memory(cfg, step):
    return (
        f"out of GPU memory at step {step} (batch {cfg.batch}, --accumulate {cfg.accumulate}, "
        f"--mixed-precision {cfg.mixed_precision}, --grad-checkpointing "
        f"{cfg.grad_checkpointing}); raise --accumulate, or pass --grad-checkpointing on or "
        "--mixed-precision bf16 (python text_to_image.py gpu-check measures a setting)"
    )


def export_unet(unet, folder):
    """The UNet in diffusers' format (config.json and safetensors weights), for
    UNet2DConditionModel.from_pretrained or a pipeline's unet=."""
    unet.save_pretrained(folder)


def saved_x_tn(saved, shape):
    """The checkpoint's noisy latents, one per image, of the latents' shape (None: a fresh run)."""
    if saved is None:
        return None
    x_tn = saved["x_tn"]
    if x_tn.dtype != torch.float32 or tuple(x_tn.shape) != shape:
        raise UserError(
            f"--resume: the checkpoint's x_tn is {str(x_tn.dtype)[6:]} of shape "
            f"{tuple(x_tn.shape)}, not float32 of shape {shape} for these {shape[0]} images; "
            "resume with the images it was trained on, or start anew in another --out"
        )
    return x_tn


def open_log(out):
    """Makes the run folder, removes what a killed save left, and returns the log function."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        logfile = open(out / "log.txt", "a")
    except OSError as e:
        raise UserError(f"--out {out}: cannot write there ({type(e).__name__})") from None
    for tmp in out.glob("*.pt.tmp"):  # a run killed (SIGKILL) while saving
        tmp.unlink()

    def log(msg):
        if logfile:
            print(msg, flush=True)
            logfile.write(msg + "\n")
            logfile.flush()

    return log


def read_run(cfg, device):
    """The captioned images, prompts, run folder, models and the checkpoint a --resume continues
    (else None), each checked; nothing is written."""
    pairs = read_captions(cfg.data)
    prompts = read_prompts(cfg.prompts) if cfg.prompts else None
    cfg.data_path = str(Path(cfg.data).resolve())
    out = Path(cfg.out or Path("runs") / f"t2i-{Path(cfg.data_path).name}-tn{cfg.tn}")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a folder for the run")
    models = load_models(cfg)
    check_model(cfg, models)
    tensor = torch.Tensor
    need = dict(unet=dict, opt=dict, step=int, rng=tensor, noise_rng=tensor, x_tn=tensor)
    return pairs, prompts, out, models, A.open_run(cfg, out, device, need)


def run(cfg):
    """Fine-tune as cfg says, then sample the prompts; returns the run folder. Every input is read
    and checked before anything is written. Under torchrun each process trains on its share of
    every batch and only the first writes (latents, checkpoints, samples)."""
    rank, world, device = distributed(A.pick_device(cfg.device))
    if cfg.batch % (world * cfg.accumulate):
        raise UserError(
            f"--batch {cfg.batch} does not split into {world} processes x {cfg.accumulate} "
            f"micro-batches (--accumulate); use a multiple of {world * cfg.accumulate}"
        )
    if cfg.export and any(p.is_file() for p in (Path(cfg.export), *Path(cfg.export).parents)):
        raise UserError(f"--export {cfg.export} is or lies in a file; pass a folder for the UNet")
    pairs, prompts, out, models, saved = read_run(cfg, device)
    models.to(device)
    checkpointing = prepare_unet(models.unet, cfg)
    state = training_state(models.unet, cfg, device, saved, rank, world)
    if rank == 0:  # the first process encodes and caches the latents; the others then read them
        try:
            latents, x_tn, cache = prepare_latents(models, pairs, cfg, out, saved, device)
            log = open_log(out)
            if cache:
                save_atomic(cache[0], out / "latents.pt")
                log(cache[1])
        except UserError as e:
            first_rank_done(world, str(e))
        first_rank_done(world)
    else:
        first_rank_done(world)
        latents, x_tn, _ = prepare_latents(models, pairs, cfg, out, saved, device)
        log = lambda msg: None  # noqa: E731 (only the first process logs)
    captions = [c for _, c in pairs]
    ids = tokenize(models.tokenizer, captions).to(device)
    empty = tokenize(models.tokenizer, [""]).to(device)
    data = TrainData(latents.to(device), x_tn.to(device), ids, empty, captions)
    if rank == 0:
        (out / "config.json").write_text(json.dumps(cfg.saved(), indent=1))
    sigma_tn = float(sigma_of(models.scheduler, cfg.tn)) if cfg.tn else 0.0
    precision = autocast_dtype(cfg.mixed_precision, device.type)
    log(
        f"{'resuming' if saved else 'training'} {out}: {len(pairs)} images at {cfg.resolution}px, "
        f"{models.scheduler.config.prediction_type}, t_n {cfg.tn} (VP sigma {sigma_tn:.4f}) "
        f"on {device}" + (f" x {world} processes" if world > 1 else "") + ", autocast "
        f"{str(precision).replace('torch.', '') if precision else 'off'}, gradient checkpointing "
        f"{'on' if checkpointing else 'off'}, {cfg.accumulate} micro-batch(es) a step"
    )
    train(models, data, state, cfg, out if rank == 0 else None, log)
    if prompts and rank == 0:
        generate(models, prompts, cfg, out, log, state.step)
    if cfg.export and rank == 0:
        export_unet(models.unet, cfg.export)
        log(f"wrote the UNet to {cfg.export} (UNet2DConditionModel.from_pretrained reads it)")
    if world > 1:
        torch.distributed.destroy_process_group()
    return out


# ------------------------------------------------------------------------------------------------
# 8. gpu-check: memory and speed of Table 5's training step on SD-2's architecture at 768 px, with
# random weights (nothing is downloaded), for the one GPU call a change gets.
# ------------------------------------------------------------------------------------------------
# stabilityai/stable-diffusion-2's unet/, text_encoder/ and vae/config.json (the 768 px v model)
SD2_UNET = dict(
    sample_size=96,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=1024,
    attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True,
    norm_num_groups=32,
    norm_eps=1e-5,
    act_fn="silu",
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    center_input_sample=False,
    mid_block_scale_factor=1,
    dual_cross_attention=False,
    only_cross_attention=False,
)
SD2_TEXT = dict(
    vocab_size=49408,
    hidden_size=1024,
    intermediate_size=4096,
    num_attention_heads=16,
    num_hidden_layers=23,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=512,
)
SD2_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=2,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32,
    sample_size=768,
    scaling_factor=0.18215,
)


def sd2_random_models(device):
    """SD-2's UNet, text encoder and VAE with random weights, built on `device`; a byte-level
    tokenizer (77 tokens) stands in for OpenCLIP's. The scheduler is SD-2's (v-prediction)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = tiny_tokenizer(max_length=77)
    special = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    with torch.device(device):
        unet = UNet2DConditionModel(**SD2_UNET)
        text = CLIPTextModel(CLIPTextConfig(**SD2_TEXT, pad_token_id=tok.pad_token_id, **special))
        vae = AutoencoderKL(**SD2_VAE)
    sched = DDPMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="v_prediction",
    )
    return Models(unet, vae, text, tok, sched)


@dataclass
class GpuCheck(Config):
    data: str = option("random", "not read: random latents stand in for the images", type=str)
    iters: int = option(3, "training steps; img/s is over all but the first (warm-up)")
    tiny: bool = option(False, "the tiny model instead of SD-2's: this path on a CPU, in seconds")


def random_train_data(models, cfg, device):
    """gpu-check's data: 4 batches of random latents at cfg.resolution, numbered captions, and
    their fixed noisy copies, on `device`."""
    side = cfg.resolution // models.vae_factor
    shape = (4 * cfg.batch, models.unet.config.in_channels, side, side)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(cfg.seed))
    captions = [f"a photo of thing {i}" for i in range(len(latents))]
    x_tn = make_noisy_latents(latents, models.scheduler, cfg.tn, cfg.seed)
    empty = tokenize(models.tokenizer, [""]).to(device)
    ids = tokenize(models.tokenizer, captions).to(device)
    return TrainData(latents.to(device), x_tn.to(device), ids, empty, captions)


def timed_steps(models, data, state, cfg, device):
    """cfg.iters train_steps, each timed to its end on the device; (seconds, last loss, kept)."""
    seconds = []
    for step in range(cfg.iters):
        start = time.perf_counter()
        try:
            loss, kept = train_step(models, data, state, cfg)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        except torch.cuda.OutOfMemoryError:
            raise UserError(out_of_memory(cfg, step + 1)) from None
        seconds.append(time.perf_counter() - start)
    return seconds, loss, kept


def gpu_check(cfg, log=print):
    """cfg.iters training steps (train_step, as a run takes them) of SD-2 at 768 px (96x96
    latents), batch 16 by default, random weights; logs and returns peak memory and img/s. The
    peak counts everything on the GPU from the start: weights, AdamW's state, text encoder, VAE."""
    device = A.pick_device(cfg.device)
    cuda = device.type == "cuda"
    if not (cuda or cfg.tiny):
        raise UserError(
            "gpu-check trains SD-2's 866M-parameter UNet and needs a CUDA device; on a CPU "
            "pass --tiny (the same path on the tiny model)"
        )
    if cfg.iters < 1:
        raise UserError(f"--iters {cfg.iters}: gpu-check needs at least 1 step")
    if cfg.batch % cfg.accumulate:
        raise UserError(f"--accumulate {cfg.accumulate} must divide --batch {cfg.batch}")
    if cfg.out and Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise UserError(f"--out {cfg.out} is a file; pass a folder for gpu-check.json")
    if cuda:
        torch.cuda.init()  # an explicit index (cuda:0) is refused before CUDA is initialised
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(cfg.seed)
    models = tiny_models(cfg.tiny_prediction, cfg.seed) if cfg.tiny else sd2_random_models(device)
    check_model(cfg, models)
    models.to(device)
    checkpointing = prepare_unet(models.unet, cfg)
    data = random_train_data(models, cfg, device)
    state = training_state(models.unet, cfg, device)
    models.unet.train()
    seconds, loss, kept = timed_steps(models, data, state, cfg, device)
    side = data.latents.shape[-1]
    timed = seconds[1:] or seconds
    dtype = autocast_dtype(cfg.mixed_precision, device.type)
    gb = 1e9
    report = dict(
        model="tiny" if cfg.tiny else "SD-2 (random weights)",
        unet_parameters=sum(p.numel() for p in models.unet.parameters()),
        device=torch.cuda.get_device_name(device) if cuda else str(device),
        latents=[side, side],
        batch=cfg.batch,
        accumulate=cfg.accumulate,
        autocast=str(dtype).replace("torch.", "") if dtype else "off",
        gradient_checkpointing=checkpointing,
        steps=cfg.iters,
        step_seconds=seconds,
        img_per_s=cfg.batch * len(timed) / sum(timed),
        peak_allocated_gb=torch.cuda.max_memory_allocated(device) / gb if cuda else None,
        peak_reserved_gb=torch.cuda.max_memory_reserved(device) / gb if cuda else None,
        loss=float(loss),
        kept=kept,
    )
    peak = (
        f"peak {report['peak_allocated_gb']:.1f} GB allocated (torch.cuda.max_memory_allocated), "
        f"{report['peak_reserved_gb']:.1f} GB reserved"
        if cuda
        else "peak memory not measured (no GPU)"
    )
    log(
        f"gpu-check {report['model']}: UNet {report['unet_parameters'] / 1e6:.1f}M parameters, "
        f"{side}x{side} latents, batch {cfg.batch} in {cfg.accumulate} micro-batch(es), autocast "
        f"{report['autocast']}, gradient checkpointing {'on' if checkpointing else 'off'}, on "
        f"{report['device']}: {peak}; {report['img_per_s']:.2f} img/s over steps "
        f"{cfg.iters - len(timed) + 1}-{cfg.iters}"
    )
    if cfg.out:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out) / "gpu-check.json").write_text(json.dumps(report, indent=1))
    return report


# ------------------------------------------------------------------------------------------------
# 9. Scoring (Table 5): Sim (the mean top-1 similarity of a sample to the training set), its 95th
# percentile, the CLIP score and FID, for samples drawn from the training captions as Somepalli et
# al. 2023 score theirs (somepago/DCR: diff_inference.py draws them, diff_retrieval.py scores them).
# Each run's samples are scored first, a chunk at a time (what is kept is their features); then
# one pass over the training images, read a chunk at a time and never held together, serves every
# run trained on them.
#
#   python text_to_image.py score runs/t2i-laion10k-tn0 runs/t2i-laion10k-tn100 --train laion10k/
# ------------------------------------------------------------------------------------------------
SCORE_SAMPLES = "table5-samples"  # in the run folder: the samples score drew, in shards
SHARD = 500  # prompts per shard: a stopped generation loses at most one shard
CLIP_DEFAULT = "openai/clip-vit-large-patch14"  # torchmetrics' CLIPScore default
COPY_THRESHOLD = 0.5  # DCR's sim_gt_05pc: the share of samples with a similarity above it


def clip_score(image_emb, text_emb):
    """Each pair's 100 max(cos(image, text), 0): Hessel et al.'s CLIPScore with 100 for its 2.5;
    the score is their mean. torchmetrics' CLIPScore clips the mean instead: the same whenever no
    cosine is negative."""
    cos = (F.normalize(image_emb.double(), dim=-1) * F.normalize(text_emb.double(), dim=-1)).sum(-1)
    return 100 * cos.clamp(min=0)


class ClipScorer:
    """A CLIP model's image-text alignment: its processor resizes, crops and normalises the images,
    and the captions are tokenized and truncated to the text model's length."""

    def __init__(self, model, tokenizer, image_processor, name):
        self.model, self.tokenizer, self.image_processor = model.eval(), tokenizer, image_processor
        self.name = name

    @torch.no_grad()
    def __call__(self, images, prompts):
        """uint8 images (N, H, W, 3) and their N prompts -> N scores."""
        device = next(self.model.parameters()).device
        pixels = self.image_processor(images=list(images), return_tensors="pt").pixel_values
        ids = tokenize(self.tokenizer, prompts).to(device)
        out = self.model(input_ids=ids, pixel_values=pixels.to(device))
        return clip_score(out.image_embeds, out.text_embeds).cpu()


def load_clip(name, download):
    """A CLIP model and its processor from a local folder or the Hub (its cache first)."""
    from feature_networks import WeightsMissing, first_line

    try:
        from transformers import CLIPModel, CLIPProcessor

        model = CLIPModel.from_pretrained(name, local_files_only=not download)
        processor = CLIPProcessor.from_pretrained(name, local_files_only=not download)
    except Exception as err:  # offline, a wrong name, a folder without a CLIP model in it
        raise WeightsMissing(
            f"--clip-model {name} cannot be loaded ({first_line(err)[:150]}); download it where "
            f"there is a network (huggingface-cli download {name} --local-dir clip) and pass "
            "--clip-model clip"
        ) from None
    return ClipScorer(model, processor.tokenizer, processor.image_processor, name)


def tiny_clip():
    """A random CLIP for 16 x 16 images with the byte-level tokenizer: --random-weights' CLIP."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tok = tiny_tokenizer()
    common = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)
    text = dict(
        common,
        vocab_size=len(tok),
        max_position_embeddings=tok.model_max_length,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    vision = dict(common, image_size=16, patch_size=8)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    pixels = CLIPImageProcessor(size=dict(shortest_edge=16), crop_size=dict(height=16, width=16))
    return ClipScorer(model, tok, pixels, "tiny random CLIP (--random-weights)")


@dataclass
class ScoreNetworks:
    similarity: object  # [-1, 1] images -> descriptors (DINOv2 or SSCD, each with its recipe)
    similarity_recipe: str
    inception: object  # [-1, 1] images -> pool3 features
    fid_recipe: str
    clip: ClipScorer
    files: dict  # the weight files used


def score_networks(args):
    """The three networks, or one line naming every missing weight file and where to get it.
    --random-weights: the same architectures randomly initialised (and a tiny CLIP), seeded."""
    import feature_networks as N

    missing, files = [], {}

    def weights(key, filename, url, explicit):
        if args.random_weights:
            return None
        try:
            files[key] = str(N.find_weights(filename, url, explicit, not args.no_download))
            return files[key]
        except N.WeightsMissing as e:
            missing.append(str(e))

    inception = weights("inception", N.INCEPTION_FILE, N.INCEPTION_URL, args.inception_weights)
    size = args.dinov2
    if args.sscd_weights:
        similarity = weights("sscd", N.SSCD_FILE, N.SSCD_URL, args.sscd_weights)
    else:
        dinov2_url = N.DINOV2_URL.format(size)
        similarity = weights("dinov2", N.dinov2_file(size), dinov2_url, args.dinov2_weights)
    torch.manual_seed(0)  # --random-weights: the same networks at every call
    try:
        clip = (
            tiny_clip() if args.random_weights else load_clip(args.clip_model, not args.no_download)
        )
    except N.WeightsMissing as e:
        missing.append(str(e))
    if missing:
        raise UserError(" Also: ".join(missing))
    device = args.device
    if args.sscd_weights:
        sim = N.sscd_forward(N.sscd_network(similarity).to(device))
        recipe = N.SSCD_RECIPE
    else:
        sim = N.dinov2_forward(N.dinov2_network(size, similarity).to(device))
        recipe = N.similarity_recipe(size)
    clip.model.to(device)
    fid = N.inception_forward(N.inception_network(inception).to(device), args.fid_resize)
    return ScoreNetworks(sim, recipe, fid, N.FID_RECIPES[args.fid_resize], clip, files)


# The samples: which captions, and the .npz files that hold them, read as a stream.
def chosen_captions(n, count, seed):
    """The training captions the samples are drawn for, one sample each: every caption in order,
    or `count` of them without repetition, seeded (the same captions for every run)."""
    if count is None or count == n:
        return np.arange(n)
    if count > n:
        raise UserError(f"--samples {count}: the training set has {n} captions; pass {n} or fewer")
    return np.sort(np.random.default_rng(seed).choice(n, count, replace=False))


def npy_image_header(f):
    """The shape of the uint8 N x H x W x 3 array whose .npy stream f is at its start."""
    fmt = np.lib.format
    version = fmt.read_magic(f)
    read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
    shape, fortran, dtype = read(f)
    if dtype != np.uint8 or fortran or len(shape) != 4 or shape[3] != 3:
        raise ValueError(f"'images' is {dtype} of shape {shape}, not uint8 N x H x W x 3")
    return shape


NPZ_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)


def npz_shape(file, fix):
    """The shape of an .npz's 'images', from its header alone."""
    try:
        with zipfile.ZipFile(file) as archive, archive.open("images.npy") as f:
            return npy_image_header(f)
    except NPZ_ERRORS as e:
        raise UserError(f"cannot read images from {file} ({one_line(e)}); {fix}") from None


def npz_chunks(file, chunk, fix):
    """An .npz's 'images', `chunk` at a time, decompressed from the archive as a stream: the whole
    array is never in memory."""
    try:
        with zipfile.ZipFile(file) as archive, archive.open("images.npy") as f:
            shape = npy_image_header(f)
            row = int(np.prod(shape[1:]))
            for start in range(0, shape[0], chunk):
                n = min(chunk, shape[0] - start)
                data = f.read(n * row)
                if len(data) != n * row:
                    raise EOFError(f"it ends within image {start + len(data) // row}")
                yield np.frombuffer(data, np.uint8).reshape(n, *shape[1:]).copy()
    except NPZ_ERRORS as e:
        raise UserError(f"cannot read images from {file} ({one_line(e)}); {fix}") from None


def npz_prompts(file, fix):
    try:
        with np.load(file) as f:  # reads the prompts alone; no pickle
            return [str(p) for p in f["prompts"]]
    except NPZ_ERRORS as e:
        raise UserError(f"cannot read prompts from {file} ({one_line(e)}); {fix}") from None


def checkpoint_step(path):
    """The training step of path/checkpoint.pt, read memory-mapped (weights-only, nothing else
    loaded), or None without one."""
    file = path / "checkpoint.pt"
    if not file.is_file():
        return None
    try:
        step = torch.load(file, map_location="cpu", weights_only=True, mmap=True)["step"]
    except Exception as e:  # truncated, not a zip archive, not a dict, no step
        raise UserError(f"{file} is damaged ({one_line(e)}); restore it from a copy") from None
    if type(step) is not int:
        raise UserError(f"{file} holds a step {reprlib.repr(step)}; restore it from a copy")
    return step


def npz_drawn(file):
    """How a run's samples.npz was drawn (generate's `drawn`), or None where it does not say."""
    try:
        with np.load(file) as f:
            return json.loads(str(f["drawn"])) if "drawn" in f.files else None
    except (*NPZ_ERRORS, RecursionError):
        return None


def same_drawing(run, drawn):
    """Whether a run's own samples, drawn as `drawn` says (None: it does not say), are those score
    would draw now: the same seed, steps, guidance and checkpoint step. Without a checkpoint to
    draw from they are used as they are (placed by hand, or the checkpoint deleted), and the row
    gives what their record says."""
    keys = ("seed", "steps", "guidance", "step")
    drawn = drawn if isinstance(drawn, dict) else {}
    if run.settings["step"] is None:
        run.settings.update({k: drawn.get(k) for k in keys if k in drawn})
        return True
    return all(k in drawn and drawn[k] == run.settings[k] for k in keys)


def drawn_for(file, prompts):
    """Whether an .npz of samples holds the prompts `prompts`, in order (one sample each)."""
    try:
        return npz_prompts(file, "") == prompts
    except UserError:
        return False


def one_line(error):
    from feature_networks import first_line

    return first_line(error)[:150]


@dataclass
class ScoreRun:
    """A run folder to score: its config, training set, the captions its samples are drawn for,
    the .npz files that hold them in order, and the shards still to draw (their first prompts)."""

    path: Path
    cfg: Config
    pairs: list  # the training set's (image file, caption)
    prompts: list
    files: list
    todo: list
    settings: dict  # how the samples are drawn: seed, steps, guidance


def training_pairs(train, path, cfg):
    """(image, caption) pairs of --train, else of the folder the run was trained on."""
    if train is None:
        train = cfg.data_path if cfg.data_path and Path(cfg.data_path).is_dir() else None
    if train is None:
        raise UserError(
            f"{path} was trained on {cfg.data_path or cfg.data}, which is not a folder here; "
            "pass --train FOLDER, the images and captions it was trained on"
        )
    if not Path(train).is_dir():
        raise UserError(
            f"--train {train}: no such folder; pass the runs' folder of images and captions"
        )
    try:
        return read_captions(train)
    except UserError as e:
        raise UserError(f"--train {train}: {e}") from None


def open_score_run(spec, args):
    """A run folder checked whole before anything slow: config, training set, stored samples, and a
    checkpoint wherever samples are still to be drawn."""
    path = Path(spec)
    if not path.is_dir():
        raise UserError(f"{spec}: no such run folder; pass folders that text_to_image.py trained")
    if not (path / "config.json").is_file():
        raise UserError(f"{spec} has no config.json: it is not a text_to_image.py run folder")
    saved = A.read_config(path)
    if "pretrained" not in saved:
        raise UserError(
            f"{path / 'config.json'} is not text_to_image.py's (it names no --pretrained); "
            "eval_memorization.py scores ambient.py's runs"
        )
    cfg = Config.from_saved(saved, path / "config.json")
    pairs = training_pairs(args.train, path, cfg)
    chosen = chosen_captions(len(pairs), args.samples, args.seed)
    steps = cfg.steps if args.steps is None else args.steps
    guidance = cfg.guidance if args.guidance is None else args.guidance
    settings = dict(seed=args.seed, steps=steps, guidance=guidance, captions=chosen.tolist())
    settings["step"] = checkpoint_step(path)  # None: no checkpoint, the stored samples' step
    run = ScoreRun(path, cfg, pairs, [pairs[i][1] for i in chosen], [], [], settings)
    run.files, run.todo = stored_samples(run)
    if run.todo and not (path / "checkpoint.pt").is_file():
        raise UserError(
            f"{path} holds no samples for the training captions and no checkpoint.pt to draw them "
            f"from; restore checkpoint.pt, or put them in {path / SCORE_SAMPLES}"
        )
    return run


def stored_samples(run):
    """The .npz files that hold the run's samples for run.prompts, in order, and the shards still
    to draw: the run's own samples.npz when it was drawn for exactly these prompts (--prompts with
    the training captions), else table5-samples/<first prompt>/samples.npz."""
    own, side = run.path / "samples.npz", run.cfg.resolution
    if own.is_file() and drawn_for(own, run.prompts) and same_drawing(run, npz_drawn(own)):
        check_sample_shape(own, len(run.prompts), side, "restore it")
        return [own], []
    folder = run.path / SCORE_SAMPLES
    protocol = folder / "protocol.json"
    if protocol.is_file():
        from eval_memorization import read_json

        drawn = read_json(protocol, f"delete {folder} to draw the samples again")
        drawn = drawn if isinstance(drawn, dict) else {}
        if run.settings["step"] is None:  # no checkpoint to compare with: the samples' own step
            run.settings["step"] = drawn.get("step")
        differ = [k for k in run.settings if drawn.get(k) != run.settings[k]]
        if differ:
            raise UserError(
                f"{folder} was drawn with other settings ({', '.join(differ)}; step: the "
                f"checkpoint's training step); pass the flags it was drawn with ({protocol}), or "
                "delete it to draw again"
            )
    files, todo = [], []
    for start in range(0, len(run.prompts), SHARD):
        file = folder / f"{start:06d}" / "samples.npz"
        files.append(file)
        if not file.is_file():
            todo.append(start)
            continue
        fix = f"delete {file.parent} to draw it again"
        if npz_prompts(file, fix) != run.prompts[start : start + SHARD]:
            raise UserError(f"{file} holds samples of other prompts; {fix}")
        check_sample_shape(file, len(run.prompts[start : start + SHARD]), side, fix)
    return files, todo


def check_sample_shape(file, count, side, fix):
    n, h, w, _ = npz_shape(file, fix)
    if (n, h, w) != (count, side, side):
        raise UserError(
            f"{file} holds {n} images of {h}x{w}, and the run needs {count} of {side}x{side} "
            f"(its resolution); {fix}"
        )


def run_models(run, device):
    """The run's pipeline with its fine-tuned UNet from checkpoint.pt (weights-only)."""
    fix = f"restore it, or put the samples in {run.path / SCORE_SAMPLES}"
    saved = A.load_checkpoint(run.path / "checkpoint.pt", need=dict(unet=dict), fix=fix)
    models = load_models(run.cfg)
    check_model(
        dataclasses.replace(run.cfg, steps=run.settings["steps"]), models
    )  # score's --steps
    try:
        models.unet.load_state_dict(saved["unet"])
    except RuntimeError as e:
        raise UserError(
            f"{run.path / 'checkpoint.pt'} does not fit the model of {run.path / 'config.json'} "
            f"({one_line(e)}); restore the run's own config.json"
        ) from None
    return models.to(device)


def draw_samples(run, device, log):
    """The missing shards: caption i of the list draws one image with `sample` from seed + i, as
    `generate` does, and a shard's images and prompts go to an .npz of generate's layout (no PNGs:
    10,000 at 768 px would fill 10 GB), written in a temporary folder that is renamed when whole,
    so that a stop keeps every finished shard."""
    folder, s = run.path / SCORE_SAMPLES, run.settings
    folder.mkdir(exist_ok=True)
    (folder / "protocol.json").write_text(json.dumps(s))
    models = run_models(run, device)
    for start in run.todo:
        prompts, t0 = run.prompts[start : start + SHARD], time.time()
        images = []
        for i, prompt in enumerate(prompts, start):
            x = sample(
                models, prompt, 1, s["guidance"], s["steps"], s["seed"] + i, run.cfg.resolution
            )
            images.append(to_uint8(x))
        images = np.concatenate(images)
        tmp = folder / f"{start:06d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        np.savez_compressed(tmp / "samples.npz", images=images, prompts=np.array(prompts))
        os.replace(tmp, folder / f"{start:06d}")
        log(
            f"{run.path.name}: drew captions {start} to {start + len(prompts) - 1} "
            f"({len(prompts) / (time.time() - t0):.2f} img/s)"
        )
    run.todo = []


def to_uint8(x):
    """[-1, 1] NCHW -> uint8 NHWC, as generate stores samples."""
    return ((x + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def sample_chunks(run, chunk):
    """(uint8 images, their prompts), `chunk` at a time, over the run's sample files in order."""
    done = 0
    for file in run.files:
        for images in npz_chunks(file, chunk, f"delete {file.parent} to draw it again"):
            yield images, run.prompts[done : done + len(images)]
            done += len(images)


def score_samples(chunks, nets, args, log, name):
    """Each sample's similarity descriptor, Inception features and CLIP score, a chunk at a time."""
    from eval_memorization import features

    sims, incs, clips, t0 = [], [], [], time.time()
    for images, prompts in chunks:
        x = A.prepare(images)
        sims.append(features(nets.similarity, x, args.batch, args.device))
        incs.append(features(nets.inception, x, args.batch, args.device))
        for i in range(0, len(images), args.batch):
            clips.append(nets.clip(images[i : i + args.batch], prompts[i : i + args.batch]))
        done = sum(len(s) for s in sims)
        log(f"{name}: {done} samples scored ({done / (time.time() - t0):.1f} img/s)")
    return np.concatenate(sims), np.concatenate(incs), torch.cat(clips).numpy()


# The training images: a chunk at a time, once for every run trained on them.
def training_chunks(pairs, resolution, chunk):
    """(index of the first, images) of the training set as it was trained (load_image: shorter
    side resized, centre-cropped, [-1, 1]), `chunk` images at a time."""
    for start in range(0, len(pairs), chunk):
        files = [file for file, _ in pairs[start : start + chunk]]
        yield start, torch.stack([load_image(file, resolution) for file in files])


def add_moments(moments, feats):
    """(count, mean, sum of centred outer products) merged with a chunk's (Chan, Golub and LeVeque
    1979): exact, in float64, whatever the chunks."""
    feats = np.asarray(feats, np.float64)
    n_b, mean_b = len(feats), feats.mean(0)
    centred = feats - mean_b
    if moments is None:
        return n_b, mean_b, centred.T @ centred
    n_a, mean_a, m2_a = moments
    n, delta = n_a + n_b, mean_b - mean_a
    return (
        n,
        mean_a + delta * n_b / n,
        m2_a + centred.T @ centred + np.outer(delta, delta * n_a * n_b / n),
    )


def scan_training(chunks, sample_sims, nets, batch, device, log=None):
    """One pass over the training images: for each run, every sample's top-1 cosine to them and
    its index; and their Inception mean and covariance (1 / (N - 1), as pytorch-fid). A chunk is
    dropped before the next is read."""
    from eval_memorization import features, top1_cosine

    best = {
        k: (np.full(len(s), -np.inf), np.zeros(len(s), np.int64)) for k, s in sample_sims.items()
    }
    moments, t0 = None, time.time()
    for start, x in chunks:
        train = features(nets.similarity, x, batch, device)
        for name, s in sample_sims.items():
            value, index = best[name]
            sims, idx = top1_cosine(s, train)
            better = sims > value
            value[better] = sims[better]
            index[better] = idx[better] + start
        moments = add_moments(moments, features(nets.inception, x, batch, device))
        done = start + len(x)
        del x, train  # the next chunk is read without this one
        if log:
            log(f"training images: {done} read ({done / (time.time() - t0):.1f} img/s)")
    n, mean, m2 = moments
    return best, (mean, m2 / (n - 1))


# The table: one row per run folder, Table 5's four columns beside the run's settings.
def score(args):
    """Table 5's columns for each run folder: table5.md, table5.json and per-sample numbers in
    args.out; returns the rows."""
    args.device = A.pick_device(args.device)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    runs = {}
    for spec in args.runs:  # every input checked first: a bad one is reported before anything slow
        run = open_score_run(spec, args)
        name = run.path.resolve().name
        runs[name if name not in runs else f"{name}-{len(runs)}"] = run
    nets = score_networks(args)  # missing weights: reported before hours of sampling
    for name, run in runs.items():
        if run.todo:
            log(f"{name}: drawing {len(run.todo)} shard(s) of samples for the training captions")
            draw_samples(run, args.device, log)
    per_run = {
        name: score_samples(sample_chunks(run, args.chunk), nets, args, log, name)
        for name, run in runs.items()
    }
    groups = {}  # runs trained on the same images at the same side share one pass over them
    for name, run in runs.items():
        key = (tuple(str(p) for p, _ in run.pairs), run.cfg.resolution)
        groups.setdefault(key, []).append(name)
    rows, numbers = {}, {}
    for names in groups.values():
        first = runs[names[0]]
        chunks = training_chunks(first.pairs, first.cfg.resolution, args.chunk)
        sample_sims = {name: per_run[name][0] for name in names}
        best, (mu, cov) = scan_training(chunks, sample_sims, nets, args.batch, args.device, log)
        for name in names:
            rows[name], numbers[name] = table5_row(runs[name], best[name], per_run[name], mu, cov)
    return write_table5(rows, numbers, nets, args, log)


def table5_row(run, best, scored, mu, cov):
    from eval_memorization import frechet_distance_to

    (sims, nearest), (_, inception, clips), cfg = best, scored, run.cfg
    row = dict(
        tn=cfg.tn,
        text_noise=cfg.text_noise,
        w24_threshold=cfg.w24_threshold,
        sim=float(sims.mean()),
        sim_95=float(np.percentile(sims, 95)),
        clip=float(clips.mean()),
        fid=frechet_distance_to(inception, mu, cov) if min(len(run.pairs), len(sims)) > 1 else None,
        share_above_threshold=float((sims > COPY_THRESHOLD).mean()),
        samples=len(sims),
        train_images=len(run.pairs),
        resolution=cfg.resolution,
        pretrained=cfg.pretrained,
        iters=cfg.iters,
        batch=cfg.batch,
        **{k: v for k, v in run.settings.items() if k != "captions"},
    )
    numbers = dict(similarity=sims, nearest_train=nearest, clip_score=clips)
    return row, numbers


def table5_markdown(rows, nets):
    lines = [
        "| run | t_n | text noise | W24 | Sim | 95% | CLIP | FID | samples |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        w24 = "off" if r["w24_threshold"] is None else f"{r['w24_threshold']:g}"
        fid = "n/a" if r["fid"] is None else f"{r['fid']:.2f}"
        lines.append(
            f"| {name} | {r['tn']} | {r['text_noise']:g} | {w24} | {r['sim']:.3f} | "
            f"{r['sim_95']:.3f} | {r['clip']:.2f} | {fid} | {r['samples']} |"
        )
    r = next(iter(rows.values()))
    notes = [
        f"Sim: each sample's top-1 cosine to the {r['train_images']} training images, averaged; "
        f"95%: its 95th percentile. {nets.similarity_recipe}",
        "CLIP: 100 max(cos(image, caption), 0) averaged (Hessel et al.'s CLIPScore, w = 100), "
        f"{nets.clip.name}",
        f"FID of the samples against the training images: {nets.fid_recipe} (fewer than 50,000 "
        "samples bias it upwards)",
        f"samples: one per training caption, seed {r['seed']} (caption i: seed + i), the same "
        f"captions and seeds for every run; DDIM {sampling(rows)}",
    ]
    if not nets.files:
        notes.append(
            "RANDOM WEIGHTS (--random-weights): a check of the pipeline; the numbers mean nothing"
        )
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"


def sampling(rows):
    settings = {(r["steps"], r["guidance"]) for r in rows.values()}
    if len(settings) > 1:
        return "steps and guidance: each run's own (table5.json)"
    steps, guidance = settings.pop()
    return f"{steps} steps, guidance {guidance:g}"


def write_table5(rows, numbers, nets, args, log):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = table5_markdown(rows, nets)
    (out / "table5.md").write_text(table)
    recipes = dict(
        similarity=nets.similarity_recipe,
        clip_model=nets.clip.name,
        fid=nets.fid_recipe,
        weights=nets.files,
    )
    (out / "table5.json").write_text(json.dumps(dict(runs=rows, **recipes), indent=1))
    for name, arrays in numbers.items():
        np.savez(out / f"per_sample_{name}.npz", **arrays)
    print(table, end="")
    log(f"wrote {out}/table5.md, table5.json and per_sample_<run>.npz")
    return rows


def score_parser():
    from feature_networks import DINOV2_SIZES, FID_RESIZES, SSCD_FILE, SSCD_URL

    p = argparse.ArgumentParser(
        prog="text_to_image.py score",
        description="Table 5's columns (Sim, 95%, CLIP, FID) for each run folder, from samples "
        "drawn for the training captions (drawn here from checkpoint.pt when the run has none)",
    )
    a = p.add_argument
    a("runs", nargs="+", metavar="RUN", help="run folders of text_to_image.py; one row each")
    a(
        "--train",
        metavar="FOLDER",
        help="the images and captions the runs were trained on (default: each run's --data)",
    )
    a(
        "--samples",
        type=int,
        help="how many captions to draw a sample for (default: every "
        "training caption once; fewer: a seeded subset, the same for every run)",
    )
    a("--seed", type=int, default=0, help="seeds the subset and the samples (caption i: seed + i)")
    a("--steps", type=int, help="DDIM steps (default: the run's --steps)")
    a("--guidance", type=float, help="guidance weight (default: the run's --guidance)")
    a(
        "--sscd-weights",
        metavar="FILE",
        help=f"SSCD's {SSCD_FILE} ({SSCD_URL}): similarity in "
        "SSCD's space, as Somepalli et al. 2023, instead of DINOv2's",
    )
    a(
        "--dinov2",
        choices=tuple(DINOV2_SIZES),
        default="vitg14",
        help="DINOv2 size of the similarity (the paper's: vitg14)",
    )
    a("--dinov2-weights", metavar="FILE", help="local dinov2_<size>_pretrain.pth")
    a("--inception-weights", metavar="FILE", help="local pt_inception-2015-12-05-6726825d.pth")
    a(
        "--fid-resize",
        choices=FID_RESIZES,
        default="tf1",
        help="how FID images reach 299 x 299: tf1 (EDM's fid.py, the default) or pytorch-fid",
    )
    a(
        "--clip-model",
        default=CLIP_DEFAULT,
        help=f"a CLIP model: Hub name or local folder "
        f"(default {CLIP_DEFAULT}, torchmetrics' CLIPScore default)",
    )
    a("--no-download", action="store_true", help="never download weights")
    a(
        "--random-weights",
        action="store_true",
        help="a CPU check of the pipeline: every network "
        "randomly initialised (a tiny CLIP); the numbers mean nothing",
    )
    a(
        "--chunk",
        type=int,
        default=128,
        help="images read at a time (default 128; at 768 px about 0.9 GB as float32)",
    )
    a("--batch", type=int, default=32, help="images per network call (default 32)")
    a("--device", default="auto", help="auto (cuda if there is one), cpu, cuda, ...")
    a("--out", default="runs/table5", help="table5.md, table5.json, per-sample numbers")
    return p


def score_main(argv):
    args = score_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        for flag in ("samples", "steps", "chunk", "batch"):
            if getattr(args, flag) is not None and getattr(args, flag) < 1:
                raise UserError(f"--{flag} {getattr(args, flag)} must be at least 1")
        if not 0 <= args.seed < 2**31:
            raise UserError(f"--seed {args.seed} must be from 0 to below 2^31")
        if args.guidance is not None and not math.isfinite(args.guidance):
            raise UserError(f"--guidance {args.guidance} is not a finite number")
        if Path(args.out).exists() and not Path(args.out).is_dir():
            raise UserError(f"--out {args.out} is a file; pass a folder for table5.md")
        return score(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(
            "interrupted; every finished shard of samples is kept: run score again to go on",
            file=sys.stderr,
        )
        sys.exit(130)


# ------------------------------------------------------------------------------------------------
# Entry point: training (sections 1-7), `gpu-check` (section 8) or `score` (section 9).
# ------------------------------------------------------------------------------------------------
def main(argv=None):
    """python text_to_image.py [flags] trains; gpu-check [flags] measures SD-2's step; score RUN
    ... --train DATA writes Table 5's columns."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["gpu-check"]:
        return A.main(argv[1:], GpuCheck, gpu_check)
    if argv[:1] == ["score"]:
        return score_main(argv[1:])
    return A.main(argv, Config, run)


if __name__ == "__main__":
    main()
