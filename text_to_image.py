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

import hashlib
import json
import os
import reprlib
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
    """A caption file's text, read as UTF-8 (the encoding of diffusers' datasets)."""
    try:
        return path.read_text(encoding="utf-8")
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


def rgb8(im):
    """A PIL image as uint8 RGB pixels. 16-bit greyscale (modes I;16*, and I in older Pillow) is
    scaled to 8 bits, 65535 -> 255, where PIL's convert would clip it at 255; other modes
    (greyscale, palette, alpha) convert as diffusers' scripts convert them."""
    if im.mode == "I" or im.mode.startswith("I;16"):
        grey = np.asarray(im).astype(np.int64)
        if grey.min() < 0 or grey.max() > 65535:
            raise ValueError(f"mode {im.mode} with values outside 0-65535")
        return np.repeat(np.rint(grey / 257).astype(np.uint8)[..., None], 3, axis=-1)
    return np.asarray(im.convert("RGB"))


def load_image(path, resolution):
    """Shorter side resized to `resolution`, centre crop, [-1, 1] NCHW, as diffusers' scripts do."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            pixels = rgb8(im)
    except Exception as e:  # read_captions read the header; the pixels may still be damaged
        raise UserError(
            f"cannot read image {path} ({type(e).__name__}); remove or replace it"
        ) from None
    im = Image.fromarray(pixels)
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
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise UserError(
                f"--resume: the checkpoint's unet does not fit this model ({type(err).__name__}); "
                "resume with the same --pretrained"
            ) from None
        # step, generator states and optimizer state against the live ones, before any is used
        A.check_training_entries(saved, opt, dict(rng=state.gen, noise_rng=state.noise_gen))
        opt.load_state_dict(saved["opt"])
        state.gen.set_state(saved["rng"].cpu())
        state.noise_gen.set_state(saved["noise_rng"].cpu())
        state.step = saved["step"]
    return state


def save_checkpoint(state, data, cfg, path):
    """Atomic (save_atomic): a run stopped mid-write keeps the last one."""
    save_atomic(
        dict(
            unet=state.unet.state_dict(),
            opt=state.opt.state_dict(),
            step=state.step,
            rng=state.gen.get_state(),
            noise_rng=state.noise_gen.get_state(),
            x_tn=data.x_tn.cpu(),
            config=cfg.saved(),
        ),
        path,
    )


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
        loss, k = train_step(models, data, state, cfg)
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
        if x.isnan().any():  # an image of NaN would be saved black
            finite = A.weights_finite(models.unet)
            why = f"lower --guidance ({cfg.guidance:g})" if finite else "the weights are not"
            raise UserError(f"the samples of prompt {i + 1} are not finite: {why}")
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


def usable_device(name):
    """ambient.py's pick_device, once a tensor is made and read back there (meta holds no data)."""
    device = A.pick_device(name)
    try:
        torch.zeros(1, device=device).cpu()
    except Exception as e:  # meta: NotImplementedError; a backend this build lacks: RuntimeError
        raise UserError(
            f"--device {name} cannot hold tensors ({type(e).__name__}); use auto, cpu or cuda"
        ) from None
    return device


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
        print(msg, flush=True)
        logfile.write(msg + "\n")
        logfile.flush()

    return log


def read_run(cfg):
    """The device, captioned images, prompts, run folder, models and the checkpoint a --resume
    continues (else None), each checked; nothing is written."""
    device = usable_device(cfg.device)
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
    return device, pairs, prompts, out, models, A.open_run(cfg, out, device, need)


def run(cfg):
    """Fine-tune as cfg says, then sample the prompts; returns the run folder. Every input is read
    and checked before anything is written."""
    device, pairs, prompts, out, models, saved = read_run(cfg)
    models.to(device)
    state = training_state(models.unet, cfg, device, saved)
    latents, x_tn, cache = prepare_latents(models, pairs, cfg, out, saved, device)
    log = open_log(out)
    if cache:
        save_atomic(cache[0], out / "latents.pt")
        log(cache[1])
    ids = tokenize(models.tokenizer, [c for _, c in pairs]).to(device)
    empty = tokenize(models.tokenizer, [""]).to(device)
    data = TrainData(latents.to(device), x_tn.to(device), ids, empty)
    (out / "config.json").write_text(json.dumps(cfg.saved(), indent=1))
    sigma_tn = float(sigma_of(models.scheduler, cfg.tn)) if cfg.tn else 0.0
    log(
        f"{'resuming' if saved else 'training'} {out}: {len(pairs)} images at {cfg.resolution}px, "
        f"{models.scheduler.config.prediction_type}, t_n {cfg.tn} (VP sigma {sigma_tn:.4f}) "
        f"on {device}"
    )
    train(models, data, state, cfg, out, log)
    if prompts:
        generate(models, prompts, cfg, out, log)
    return out


def main(argv=None):
    return A.main(argv, Config, run)


if __name__ == "__main__":
    main()
