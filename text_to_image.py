"""Algorithm 1 for a text-to-image latent diffusion model (the paper's Table 5), on ambient.py.

    python text_to_image.py --pretrained stabilityai/stable-diffusion-2 --data laion10k/ --tn 100 \
        --prompts prompts.txt                                   # Table 5's setting, a GPU job
    python text_to_image.py --pretrained tiny --data folder/ --iters 20 --device cpu   # a CPU check

Stable Diffusion works in a VAE's latent space with the DDPM schedule x_t = sqrt(abar_t) x_0
+ sqrt(1 - abar_t) eps over integer timesteps t, and its network predicts eps or v. Algorithm 1
carries over in these units, with sigma_t = sqrt(1 - abar_t) as ambient.py's VP sigma: line 1 draws
one noisy latent x_tn per image at timestep --tn, once; above t_n a sample starts from x_tn, never
from the clean latent, and regresses onto Lemma C.2's target, the Eq. 6 x_0-target
(x_tn - c_x x_t) / c_h mapped to eps or v; at or below t_n it is the usual fine-tuning step.
--tn 0 is plain fine-tuning.

Two text-side mitigations that Table 5 combines with it are options: --text-noise (Somepalli et
al. 2023: Gaussian noise on the text encoder's output during training) and --w24-threshold (Wen et
al. 2024: samples whose text-conditional prediction is large are left out of the loss). The folder
holds images and captions: a .txt beside each image, or diffusers' metadata.jsonl.
"""

import argparse
import json
import os
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
# 2. Text conditioning and the two mitigations Table 5 combines with Algorithm 1.
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


def add_text_noise(emb, scale, gen):
    """Somepalli et al. 2023 (somepago/DCR, diff_train.py's rand_noise_lam): e + scale * N(0, I)
    on the text encoder's hidden states, at every training step; their code's default is 0 (off)."""
    if not scale:
        return emb
    return emb + scale * torch.randn(emb.shape, generator=gen, device=emb.device, dtype=emb.dtype)


def w24_keep(pred, unet, x_t, t, empty_emb, threshold):
    """Wen et al. 2024 (YuxinWenRick/diffusion_memorization, train_text_to_image.py's
    hard_threshold): the text-conditional part |pred(c) - pred(empty)|_2 of each sample, without
    gradient; samples at or above the threshold leave the loss. None: keep all."""
    if threshold is None:
        return torch.ones(len(pred), dtype=torch.bool, device=pred.device)
    with torch.no_grad():
        uncond = unet(x_t, t, empty_emb.expand(len(x_t), -1, -1)).sample
    return (pred.detach() - uncond).flatten(1).norm(dim=1) < threshold


def training_loss(models, b, ids, cfg, noise_gen):
    """Line 11 with the mitigations: the mean over kept samples and how many were kept."""
    with torch.no_grad():
        emb = models.text_encoder(ids)[0]
    emb = add_text_noise(emb, cfg.text_noise, noise_gen)
    pred = models.unet(b["x_t"], b["t"], emb).sample
    per_sample = (pred.float() - b["target"].float()).square().flatten(1).mean(1)
    per_sample = per_sample * loss_weight(b, cfg.ambient_weight).to(pred.device)
    keep = w24_keep(pred, models.unet, b["x_t"], b["t"], models.empty_emb, cfg.w24_threshold)
    return (per_sample * keep).sum() / keep.sum().clamp_min(1), keep


# ------------------------------------------------------------------------------------------------
# 3. Models: a Stable Diffusion 2 pipeline's parts, or a tiny random one for CPU checks and tests.
# ------------------------------------------------------------------------------------------------
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
        raise UserError(
            f"--pretrained {name}: cannot load a Stable Diffusion pipeline "
            f"({type(err).__name__}); on an offline machine download it elsewhere "
            "(huggingface-cli download stabilityai/stable-diffusion-2 --local-dir sd2) "
            "and pass the folder"
        ) from None
    return Models(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler)


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


@dataclass
class TrainState:
    unet: torch.nn.Module
    opt: torch.optim.Optimizer
    gen: torch.Generator  # batches, timesteps, noise and caption dropout
    noise_gen: torch.Generator  # --text-noise only, so that it leaves every other draw in place
    step: int = 0


def training_state(unet, cfg, device, saved=None):
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=1e-2)
    state = TrainState(
        unet,
        opt,
        torch.Generator(device).manual_seed(cfg.seed + 2),
        torch.Generator(device).manual_seed(cfg.seed + 3),
    )
    if saved is not None:
        try:
            unet.load_state_dict(saved["unet"])
            opt.load_state_dict(saved["opt"])
            state.gen.set_state(saved["rng"].cpu())
            state.noise_gen.set_state(saved["noise_rng"].cpu())
        except (RuntimeError, ValueError, KeyError) as err:
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
            x_tn=data.x_tn.cpu(),
            config=cfg.saved(),
        ),
        str(path) + ".tmp",
    )
    os.replace(str(path) + ".tmp", path)


def train_step(models, data, state, cfg):
    """One update; Wen et al.'s code makes none when the threshold leaves no sample in the batch."""
    b = algorithm1_batch(models.scheduler, data.latents, data.x_tn, cfg.tn, cfg.batch, state.gen)
    ids = drop_captions(data.ids[b["idx"]], data.empty_ids, cfg.caption_dropout, state.gen)
    loss, keep = training_loss(models, b, ids, cfg, state.noise_gen)
    state.opt.zero_grad(set_to_none=True)
    if keep.any():
        loss.backward()
        torch.nn.utils.clip_grad_norm_(state.unet.parameters(), cfg.max_grad_norm)
        state.opt.step()
    return loss.detach(), int(keep.sum())


def train(models, data, state, cfg, out=None, log=print):
    """Steps until cfg.iters, logging and checkpointing into the folder `out` (None: nothing)."""
    models.unet.train()
    t0, first, kept = time.time(), state.step, 0
    while state.step < cfg.iters:
        loss, k = train_step(models, data, state, cfg)
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
    seed: int = option(0, "seeds the noisy latents, batches and sampling", same_run=True)
    prompts: str = option(None, "text file, one prompt a line, sampled after training", type=str)
    samples_per_prompt: int = option(1, "images per prompt")
    steps: int = option(50, "DDIM steps for sampling")
    guidance: float = option(7.5, "classifier-free guidance weight w in u + w (c - u); 1 = none")
    log_every: int = option(100, "progress line every this many steps")
    ckpt_every: int = option(1000, "checkpoint every this many steps")
    out: str = option(None, "run folder (default: runs/t2i-<data>-tn<tn>)", type=str, saved=False)
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
    ids = tokenize(models.tokenizer, [c for _, c in pairs]).to(device)
    return TrainData(latents, x_tn.to(device), ids, tokenize(models.tokenizer, [""]).to(device))


def run(cfg):
    """Fine-tune as cfg says, then sample the prompts; returns the run folder."""
    device = A.pick_device(cfg.device)
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
    logfile = open(out / "log.txt", "a")

    def log(msg):
        print(msg, flush=True)
        logfile.write(msg + "\n")
        logfile.flush()

    models.to(device)
    data = prepare_data(models, pairs, cfg, out, saved, device, log)
    (out / "config.json").write_text(json.dumps(cfg.saved(), indent=1))
    sigma_tn = float(sigma_of(models.scheduler, cfg.tn)) if cfg.tn else 0.0
    log(
        f"{'resuming' if saved else 'training'} {out}: {len(pairs)} images at {cfg.resolution}px, "
        f"{models.scheduler.config.prediction_type}, t_n {cfg.tn} (VP sigma {sigma_tn:.4f}) "
        f"on {device}"
    )
    state = training_state(models.unet, cfg, device, saved)
    train(models, data, state, cfg, out, log)
    if prompts:
        generate(models, prompts, cfg, out, log)
    return out


# ------------------------------------------------------------------------------------------------
# 8. Scoring (Table 5): Sim (the mean top-1 similarity of a sample to the training set), its 95th
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
    """Each pair's 100 max(cos(image, text), 0), torchmetrics' CLIPScore convention; the score
    is their mean."""
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
    if own.is_file() and drawn_for(own, run.prompts):
        check_sample_shape(own, len(run.prompts), side, "restore it")
        return [own], []
    folder = run.path / SCORE_SAMPLES
    protocol = folder / "protocol.json"
    if protocol.is_file():
        from eval_memorization import read_json

        drawn = read_json(protocol, f"delete {folder} to draw the samples again")
        drawn = drawn if isinstance(drawn, dict) else {}
        differ = [k for k in run.settings if drawn.get(k) != run.settings[k]]
        if differ:
            raise UserError(
                f"{folder} was drawn with other settings ({', '.join(differ)}); pass the flags it "
                f"was drawn with ({protocol}), or delete it to draw again"
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
    check_model(run.cfg, models)
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
        "CLIP: 100 max(cos(image, caption), 0) averaged (torchmetrics' CLIPScore), "
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
# Entry point: training (sections 1-7), or `score` (section 8).
# ------------------------------------------------------------------------------------------------
def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["score"]:
        return score_main(argv[1:])
    return A.main(argv, Config, run)


if __name__ == "__main__":
    main()
