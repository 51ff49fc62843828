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

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

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
    """(image, caption) pairs: metadata.jsonl's file_name and text (or caption), else name.txt."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--data {folder}: no such folder; pass a folder of images with captions")
    meta = folder / "metadata.jsonl"
    if meta.is_file():
        return captions_from_jsonl(meta)
    pairs = []
    for image in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        txt = image.with_suffix(".txt")
        if not txt.is_file():
            raise UserError(
                f"{image} has no caption: write {txt.name} beside it, or a metadata.jsonl"
            )
        pairs.append((image, txt.read_text().strip()))
    if not pairs:
        raise UserError(f"no {'/'.join(IMAGE_SUFFIXES)} images in {folder}")
    return pairs


def captions_from_jsonl(meta):
    pairs = []
    for i, line in enumerate(meta.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            caption = row["text"] if "text" in row else row["caption"]
            pairs.append((meta.parent / row["file_name"], str(caption)))
        except (ValueError, KeyError, TypeError):
            raise UserError(
                f"{meta} line {i + 1}: expected a JSON object with file_name and text (or caption)"
            ) from None
    missing = [p for p, _ in pairs if not p.is_file()]
    if missing or not pairs:
        raise UserError(f"{meta}: {missing[0] if missing else 'no rows'}; list the folder's images")
    return pairs


def load_image(path, resolution):
    """Shorter side resized to `resolution`, centre crop, [-1, 1] NCHW, as diffusers' scripts do."""
    from PIL import Image

    try:
        im = Image.open(path).convert("RGB")
    except OSError as err:
        raise UserError(f"cannot read image {path} ({err}); remove or replace it") from None
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


def cached_latents(models, pairs, cfg, out, device, log):
    """out/latents.pt holds the latents for this folder and resolution, computed only once."""
    path, files = Path(out) / "latents.pt", [str(p) for p, _ in pairs]
    if path.is_file():
        # weights_only: a cache copied from elsewhere runs no code (one that needs more is refused)
        need = dict(latents=torch.Tensor, files=list, resolution=int)
        cache = A.load_checkpoint(path, need=need, fix="delete it to encode the images again")
        if cache["files"] == files and cache["resolution"] == cfg.resolution:
            return cache["latents"]
        log(f"{path} is for other images or another resolution: encoding again")
    t0 = time.time()
    latents = encode_latents(models, [p for p, _ in pairs], cfg.resolution, device)
    torch.save(dict(latents=latents, files=files, resolution=cfg.resolution), str(path) + ".tmp")
    os.replace(str(path) + ".tmp", path)
    log(
        f"encoded {len(files)} images to latents {tuple(latents.shape[1:])} "
        f"in {time.time() - t0:.0f} s"
    )
    return latents


# ------------------------------------------------------------------------------------------------
# 5. Training (Algorithm 1, lines 2-16): AdamW on the UNet, the text encoder and VAE frozen, as in
# both mitigations' fine-tuning scripts; atomic checkpoints that hold line 1's noisy latents.
# ------------------------------------------------------------------------------------------------
@dataclass
class TrainData:
    latents: torch.Tensor  # x_0, the VAE latents times the scaling factor
    x_tn: torch.Tensor  # line 1's one noisy copy per latent; fixed for the whole run
    ids: torch.Tensor  # each image's caption, tokenized
    empty_ids: (
        torch.Tensor
    )  # the empty prompt: caption dropout's and guidance's unconditional input
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
            opt.load_state_dict(saved["opt"])
            state.gen.set_state(saved["rng"].cpu())
            state.noise_gen.set_state(saved["noise_rng"].cpu())
            if torch.is_tensor(saved.get("caption_rng")):  # runs before --caption-aug lack it
                state.caption_gen.set_state(saved["caption_rng"].cpu())
            if fp16 and saved.get("scaler"):  # an fp16 run's loss scale; {} in other runs
                state.scaler.load_state_dict(saved["scaler"])
        except (RuntimeError, ValueError, KeyError, TypeError) as err:
            raise UserError(
                f"--resume: the checkpoint does not fit this model or device "
                f"({type(err).__name__}); "
                "resume with the same --pretrained on the same device type"
            ) from None
        state.step = saved["step"]
    return state


def save_checkpoint(state, data, cfg, path):
    """torch.save to a temporary file, then rename: a run killed mid-write keeps the last one."""
    torch.save(
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
        str(path) + ".tmp",
    )
    os.replace(str(path) + ".tmp", path)


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
        if not torch.isfinite(loss):
            raise UserError(
                f"the loss is not finite at step {state.step}; the last checkpoint is kept. "
                "Lower --lr, then --resume"
            )
        last = state.step == cfg.iters
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
        prompts = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(
            f"--prompts {path}: cannot read it ({type(err).__name__}); pass a text file "
            "with one prompt a line"
        ) from None
    if not prompts:
        raise UserError(f"--prompts {path} holds no prompt; write one prompt a line")
    return prompts


def generate(models, prompts, cfg, out, log=print):
    """samples/<prompt>_<k>.png and samples.npz (uint8 images, prompts); prompt i: seed + i."""
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
        for k, im in enumerate(x):
            save_image((im + 1) / 2, folder / f"{i:05d}_{k}.png")
        images.append(((x + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
        names += [prompt] * len(x)
    np.savez_compressed(
        Path(out) / "samples.npz", images=np.concatenate(images), prompts=np.array(names)
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
    down = models.vae_factor * 2 ** (len(models.unet.config.block_out_channels) - 1)
    cfg.resolution = cfg.resolution or models.unet.config.sample_size * models.vae_factor
    if cfg.resolution % down:
        raise UserError(
            f"--resolution {cfg.resolution}: this model needs a multiple of {down}; pass "
            f"--resolution {max(1, round(cfg.resolution / down)) * down}"
        )


def prepare_data(models, pairs, cfg, out, saved, device, log):
    latents = cached_latents(models, pairs, cfg, out, device, log).to(device)
    x_tn = (
        saved["x_tn"]
        if saved
        else make_noisy_latents(latents.cpu(), models.scheduler, cfg.tn, cfg.seed)
    )
    captions = [c for _, c in pairs]
    ids = tokenize(models.tokenizer, captions).to(device)
    empty = tokenize(models.tokenizer, [""]).to(device)
    return TrainData(latents, x_tn.to(device), ids, empty, captions)


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


def run(cfg):
    """Fine-tune as cfg says, then sample the prompts; returns the run folder. Under torchrun each
    process trains on its share of every batch and only the first writes (checkpoints, samples)."""
    rank, world, device = distributed(A.pick_device(cfg.device))
    if cfg.batch % (world * cfg.accumulate):
        raise UserError(
            f"--batch {cfg.batch} does not split into {world} processes x {cfg.accumulate} "
            f"micro-batches (--accumulate); use a multiple of {world * cfg.accumulate}"
        )
    if cfg.export and Path(cfg.export).is_file():
        raise UserError(f"--export {cfg.export} is a file; pass a folder for the UNet")
    pairs = read_captions(cfg.data)
    prompts = read_prompts(cfg.prompts) if cfg.prompts else None
    cfg.data_path = str(Path(cfg.data).resolve())
    models = load_models(cfg)
    check_model(cfg, models)
    out = Path(cfg.out or Path("runs") / f"t2i-{Path(cfg.data_path).name}-tn{cfg.tn}")
    tensor = torch.Tensor
    need = dict(unet=dict, opt=dict, step=int, rng=tensor, noise_rng=tensor, x_tn=tensor)
    saved = A.open_run(cfg, out, device, need)
    out.mkdir(parents=True, exist_ok=True)
    logfile = open(out / "log.txt", "a") if rank == 0 else None

    def log(msg):
        if logfile:
            print(msg, flush=True)
            logfile.write(msg + "\n")
            logfile.flush()

    models.to(device)
    checkpointing = prepare_unet(models.unet, cfg)
    if rank > 0:  # the first process encodes and caches the latents; the others then read them
        torch.distributed.barrier()
    data = prepare_data(models, pairs, cfg, out, saved, device, log)
    if rank == 0 and world > 1:
        torch.distributed.barrier()
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
    state = training_state(models.unet, cfg, device, saved, rank, world)
    train(models, data, state, cfg, out if rank == 0 else None, log)
    if prompts and rank == 0:
        generate(models, prompts, cfg, out, log)
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
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(cfg.seed)
    models = tiny_models(cfg.tiny_prediction, cfg.seed) if cfg.tiny else sd2_random_models(device)
    check_model(cfg, models)
    models.to(device)
    checkpointing = prepare_unet(models.unet, cfg)
    side = cfg.resolution // models.vae_factor
    shape = (4 * cfg.batch, models.unet.config.in_channels, side, side)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(cfg.seed))
    captions = [f"a photo of thing {i}" for i in range(len(latents))]
    x_tn = make_noisy_latents(latents, models.scheduler, cfg.tn, cfg.seed)
    empty = tokenize(models.tokenizer, [""]).to(device)
    ids = tokenize(models.tokenizer, captions).to(device)
    data = TrainData(latents.to(device), x_tn.to(device), ids, empty, captions)
    state = training_state(models.unet, cfg, device)
    models.unet.train()
    seconds = []
    for step in range(cfg.iters):
        start = time.perf_counter()
        try:
            loss, kept = train_step(models, data, state, cfg)
            if cuda:
                torch.cuda.synchronize(device)
        except torch.cuda.OutOfMemoryError:
            raise UserError(out_of_memory(cfg, step + 1)) from None
        seconds.append(time.perf_counter() - start)
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


def main(argv=None):
    """python text_to_image.py [flags] trains; python text_to_image.py gpu-check [flags]."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["gpu-check"]:
        return A.main(argv[1:], GpuCheck, gpu_check)
    return A.main(argv, Config, run)


if __name__ == "__main__":
    main()
