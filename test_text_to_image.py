"""Facts about text_to_image.py, Algorithm 1 for a diffusers text-to-image model (Table 5): the
usual target at t_n = 0, Lemma C.2's target has the clean target's conditional mean, no clean
latent above t_n, fixed noisy latents, the mitigations, and a tiny model trained, resumed and
sampled on CPU; and its inputs (issue 26): typed flags, UTF-8 captions, bounded JSON, images from
their headers with 16-bit ones scaled, a keyed and checked latents cache, checked --resume entries,
no .tmp left by a stop, non-finite results named, and generated damaged inputs giving one line."""

import copy
import io
import json
import os
import re
import shutil
import signal
import struct
import tempfile
import types
import weakref
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from hypothesis import example, given
from hypothesis import strategies as st
from PIL import Image

import ambient as A
import text_to_image as T
from test_ambient import error_of, two_processes
from test_inputs import (
    FUZZ,
    PNG_PIXELS_CUT,
    damaged_file,
    float_arrays,
    json_values,
    one_line,
    other_arrays,
    write,
)

f64 = torch.float64
KINDS = ("v_prediction", "epsilon")


@pytest.fixture(autouse=True, scope="module")
def one_thread():  # the tiny UNet's small ops: several times faster on one thread on a busy machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sd_scheduler(kind):
    """Stable Diffusion's training schedule (scaled_linear, 1000 steps)."""
    return DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=kind
    )


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("kind", KINDS)
def test_target_is_the_schedulers_own_at_tn_zero(kind):
    sched = sd_scheduler(kind)
    latents = torch.randn(6, 4, 8, 8, generator=gen(0))
    x_tn = T.make_noisy_latents(latents, sched, 0, seed=0)
    b = T.algorithm1_batch(sched, latents, x_tn, 0, 64, gen(1))
    x0 = latents[b["idx"]]
    clean = b["noise"] if kind == "epsilon" else sched.get_velocity(x0, b["noise"], b["t"])
    assert not b["noisy"].any() and torch.equal(x_tn, latents)
    assert torch.equal(b["target"], clean)
    assert torch.equal(b["x_t"], sched.add_noise(x0, b["noise"], b["t"]))


def gaussian_posterior_target(kind, x_t, mu, cov, abar):
    """The clean eps or v target's conditional mean given x_t when x_0 ~ N(mu, cov), in closed form:
    E[x_0 | x_t] = mu + a cov (a^2 cov + s^2 I)^-1 (x_t - a mu), a = sqrt(abar), s^2 = 1 - abar."""
    a, s = abar**0.5, (1 - abar) ** 0.5
    gain = a * cov @ torch.linalg.inv(a**2 * cov + s**2 * torch.eye(len(mu), dtype=f64))
    x0 = mu + (x_t - a * mu) @ gain.T
    return (x_t - a * x0) / s if kind == "epsilon" else (a * x_t - x0) / s


@pytest.mark.parametrize("kind", KINDS)
def test_ambient_target_has_the_clean_targets_conditional_mean_on_a_gaussian(kind):
    """Lemmas C.1/C.2 in the scheduler's units: with x_0 Gaussian, E[target | x_t] is affine in
    x_t; a least-squares fit of Lemma C.2's target on (x_t, 1), 400k draws, gives the clean one."""
    sched, n, tn, t = sd_scheduler(kind), 400_000, 100, 400
    mu = torch.tensor([0.5, -0.3, 0.1], dtype=f64)
    L = torch.tensor([[0.6, 0.0, 0.0], [0.2, 0.4, 0.0], [-0.1, 0.3, 0.5]], dtype=f64)
    x0 = (mu + torch.randn(n, 3, generator=gen(2), dtype=f64) @ L.T)[..., None, None]
    x_tn = T.make_noisy_latents(x0, sched, tn, seed=30)  # its draw: seed + 1
    b = T.noisy_batch(sched, x0, x_tn, torch.full((n,), t), tn, gen(4))
    assert b["noisy"].all()
    x_t, target = b["x_t"].flatten(1), b["target"].flatten(1)
    design = torch.cat([x_t, torch.ones(n, 1, dtype=f64)], 1)
    fit = torch.linalg.lstsq(design, target).solution
    abar = sched.alphas_cumprod.to(f64)[t]
    probe = torch.randn(64, 3, generator=gen(5), dtype=f64)
    want = gaussian_posterior_target(kind, probe, mu, L @ L.T, abar)
    got = torch.cat([probe, torch.ones(64, 1, dtype=f64)], 1) @ fit
    assert (got - want).abs().max() < 0.02, (got - want).abs().max()


def test_no_clean_latent_reaches_a_sample_above_tn():
    """Above t_n, x_t and the target are built from the stored x_tn alone: changing the clean
    latents changes nothing there, and x_t is line 10's
    sqrt(abar_t / abar_tn) x_tn + sqrt(1 - abar_t / abar_tn) z."""
    sched, tn = sd_scheduler("v_prediction"), 100
    latents = torch.randn(6, 4, 8, 8, generator=gen(6))
    x_tn = T.make_noisy_latents(latents, sched, tn, seed=0)
    b = T.algorithm1_batch(sched, latents, x_tn, tn, 256, gen(7))
    other = T.algorithm1_batch(sched, latents + 5, x_tn, tn, 256, gen(7))
    hi = b["noisy"]
    assert torch.equal(hi, b["t"] > tn) and 0 < hi.sum() < 256
    for key in ("x_t", "target"):
        assert torch.equal(b[key][hi], other[key][hi])
        assert not torch.allclose(b[key][~hi], other[key][~hi])
    ratio = (sched.alphas_cumprod.to(f64)[b["t"][hi]] / sched.alphas_cumprod.to(f64)[tn])[
        :, None, None, None
    ]
    want = ratio.sqrt() * x_tn[b["idx"][hi]] + (1 - ratio).sqrt() * b["noise"][hi]
    assert torch.allclose(b["x_t"][hi], want.float(), atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_tn_itself_is_clean_and_tn_plus_one_is_noisy(kind):
    """The split at t_n exactly: t = t_n takes the clean latent and the usual target (there
    sigma_t = sigma_tn, so Lemma C.2's c_h is 0 and its target 0/0); t = t_n + 1 starts from x_tn
    (line 10 with abar_t / abar_tn) and its target is finite."""
    sched, tn = sd_scheduler(kind), 100
    x0 = torch.randn(2, 4, 8, 8, generator=gen(26))
    x_tn = T.make_noisy_latents(x0, sched, tn, seed=0)
    t = torch.tensor([tn, tn + 1])
    b = T.noisy_batch(sched, x0, x_tn, t, tn, gen(27))
    z = b["noise"]
    assert b["noisy"].tolist() == [False, True] and b["target"].isfinite().all()
    assert torch.equal(b["x_t"][0], sched.add_noise(x0, z, t)[0])
    assert torch.equal(b["target"][0], T.usual_target(sched, x0, z, t)[0])
    ratio = sched.alphas_cumprod.to(f64)[tn + 1] / sched.alphas_cumprod.to(f64)[tn]
    want = ratio.sqrt() * x_tn[1] + (1 - ratio).sqrt() * z[1]
    assert torch.allclose(b["x_t"][1], want.float(), atol=1e-6)


def test_noisy_latents_are_one_seeded_draw_at_tn():
    sched, tn = sd_scheduler("epsilon"), 50
    latents = torch.randn(500, 4, 4, 4, generator=gen(8))
    x_tn = T.make_noisy_latents(latents, sched, tn, seed=0)
    assert torch.equal(x_tn, T.make_noisy_latents(latents, sched, tn, seed=0))
    assert not torch.equal(x_tn, T.make_noisy_latents(latents, sched, tn, seed=1))
    a = sched.alphas_cumprod[tn]
    resid = (x_tn - a.sqrt() * latents) / (1 - a).sqrt()  # should be N(0, 1) draws
    assert abs(resid.mean()) < 0.02 and abs(resid.std() - 1) < 0.02


def test_released_weight_is_eq6_residual_and_one_below_tn():
    sched, tn = sd_scheduler("v_prediction"), 100
    latents = torch.randn(6, 4, 8, 8, generator=gen(9))
    b = T.algorithm1_batch(
        sched, latents, T.make_noisy_latents(latents, sched, tn, 0), tn, 64, gen(10)
    )
    w = T.loss_weight(b, "released")
    c_h, _ = A.ambient_coefficients(b["sigma_t"], T.sigma_of(sched, tn))
    assert torch.equal(w[~b["noisy"]], torch.ones((~b["noisy"]).sum()))
    assert torch.allclose(w[b["noisy"]], c_h[b["noisy"]].float() ** 2)
    assert torch.equal(T.loss_weight(b, "x0"), torch.ones(64))


# ------------------------------------------------------------------------------------------------
# The tiny model: mitigations, training, resume, sampling, bad input.
# ------------------------------------------------------------------------------------------------
class Recorder(torch.nn.Module):
    """Wraps a UNet and keeps the inputs of each call."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.calls = unet, []

    def forward(self, x_t, t, emb):
        self.calls.append((x_t.clone(), t.clone(), emb.clone()))
        return self.unet(x_t, t, emb)


@pytest.fixture(scope="module")
def tiny():
    return T.tiny_models("v_prediction", seed=0).to("cpu")


def tiny_step_inputs(models, seed=11, batch=8):
    latents = torch.randn(5, 4, 8, 8, generator=gen(seed))
    x_tn = T.make_noisy_latents(latents, models.scheduler, 100, seed)
    b = T.algorithm1_batch(models.scheduler, latents, x_tn, 100, batch, gen(seed))
    ids = T.tokenize(models.tokenizer, [f"caption {i}" for i in range(batch)])
    return dict(b, ids=ids), ids


def cfg_for(**kw):
    return T.Config(data="x", pretrained="tiny", **kw)


def test_text_noise_changes_the_embedding_by_its_scale_and_nothing_else(tiny, monkeypatch):
    data = tiny_data(tiny)
    rec = Recorder(tiny.unet)
    monkeypatch.setattr(tiny, "unet", rec)
    runs = {}
    for scale in (0.0, 0.5):
        cfg = cfg_for(text_noise=scale, batch=8, tn=50)
        b = T.global_batch(tiny, data, T.training_state(rec.unet, cfg, "cpu"), cfg)
        loss, _ = T.training_loss(tiny, b, cfg)
        runs[scale] = (rec.calls[-1], loss)
    (x0, t0, e0), plain = runs[0.0]
    (x1, t1, e1), noised = runs[0.5]
    assert torch.equal(x0, x1) and torch.equal(t0, t1) and plain != noised
    diff = e1 - e0  # DCR's form: e + scale * N(0, I), elementwise
    assert abs(diff.mean()) < 0.05 and abs(diff.std() - 0.5) < 0.05


def eps_from_v(sched, v, x_t, t):
    """The noise prediction a v prediction implies: eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t."""
    abar = sched.alphas_cumprod[t][:, None, None, None]
    return abar.sqrt() * v + (1 - abar).sqrt() * x_t


def text_conditional_parts(models, b, ids):
    """pred(x_t, caption) - pred(x_t, ""), in the model's units (here v) and in eps units."""
    with torch.no_grad():
        emb = models.text_encoder(ids)[0]
        cond = models.unet(b["x_t"], b["t"], emb).sample
        uncond = models.unet(b["x_t"], b["t"], models.empty_emb.expand(len(ids), -1, -1)).sample
    eps = [eps_from_v(models.scheduler, p, b["x_t"], b["t"]) for p in (cond, uncond)]
    return cond, (cond - uncond).flatten(1).norm(dim=1), (eps[0] - eps[1]).flatten(1).norm(dim=1)


def test_w24_leaves_out_exactly_the_samples_with_a_large_text_conditional_prediction(tiny):
    b, ids = tiny_step_inputs(tiny)
    cond, _, norms = text_conditional_parts(tiny, b, ids)
    per_sample = (cond - b["target"]).square().flatten(1).mean(1) * T.loss_weight(b, "released")
    low, high = norms.sort().values[3:5]
    threshold = ((low + high) / 2).item()  # halfway between two samples: no rounding decides
    with torch.no_grad():
        loss, keep = T.training_loss(tiny, b, cfg_for(w24_threshold=threshold))
        full, keep_all = T.training_loss(tiny, b, cfg_for())
    assert torch.equal(keep, norms < threshold) and 0 < keep.sum() < len(keep)
    assert torch.allclose(loss, per_sample[keep].sum(), rtol=1e-5)
    assert keep_all.all() and torch.allclose(full, per_sample.sum(), rtol=1e-5)


def test_w24_thresholds_a_v_model_in_noise_units(tiny):
    """Wen et al.'s rule is on the noise prediction. At t = 999 a v model's eps difference is
    sqrt(abar_999) = 1/14.6 of its v difference; at t = 0 the two are within 0.05%. A threshold
    between a t = 999 sample's eps and v norms keeps it (a rule on raw v would drop it), and one
    below a t = 0 sample's norm drops that one."""
    ids = T.tokenize(tiny.tokenizer, ["caption 0", "caption 1"])
    latents = torch.randn(2, 4, 8, 8, generator=gen(21))
    b = T.noisy_batch(tiny.scheduler, latents, latents, torch.tensor([999, 0]), 0, gen(22))
    b["ids"] = ids
    _, v_norms, eps_norms = text_conditional_parts(tiny, b, ids)
    assert eps_norms[0] < v_norms[0] / 14 and eps_norms[0] < eps_norms[1]
    threshold = (eps_norms[0] + min(v_norms[0], eps_norms[1])).item() / 2
    with torch.no_grad():
        _, keep = T.training_loss(tiny, b, cfg_for(w24_threshold=threshold))
    assert keep.tolist() == [True, False] and v_norms[0] > threshold


def test_eps_per_output_is_the_noise_predictions_change_for_each_prediction_type():
    """eps from v: sqrt(abar) v + sqrt(1 - abar) x_t; from x_0: (x_t - sqrt(abar) x_0) /
    sqrt(1 - abar); for two predictions at one x_t the eps difference is the factor times theirs."""
    abar = torch.tensor([0.9, 0.3, 0.005], dtype=f64)[:, None]
    x_t, p, q = (torch.randn(3, 5, generator=gen(k), dtype=f64) for k in (23, 24, 25))
    to_eps = dict(
        epsilon=lambda out: out,
        v_prediction=lambda out: abar.sqrt() * out + (1 - abar).sqrt() * x_t,
        sample=lambda out: (x_t - abar.sqrt() * out) / (1 - abar).sqrt(),
    )
    for kind, eps in to_eps.items():
        want = (eps(p) - eps(q)).norm(dim=1)
        got = T.eps_per_output(kind, abar[:, 0]) * (p - q).norm(dim=1)
        assert torch.allclose(got, want, rtol=1e-12), kind


def tiny_data(models):
    latents = torch.randn(3, 4, 8, 8, generator=gen(13))
    return T.TrainData(
        latents,
        T.make_noisy_latents(latents, models.scheduler, 50, 0),
        T.tokenize(models.tokenizer, ["a", "b", "c"]),
        T.tokenize(models.tokenizer, [""]),
    )


def test_text_noise_leaves_the_batches_of_later_steps_in_place(tiny):
    """Its noise has a generator of its own: batches, timesteps and caption dropout are drawn as
    without it, step after step."""
    data, states = tiny_data(tiny), {}
    for scale in (0.0, 0.5):
        cfg = cfg_for(text_noise=scale, batch=4, tn=50, lr=1e-9)
        states[scale] = T.training_state(tiny.unet, cfg, "cpu")
        for _ in range(2):
            T.train_step(tiny, data, states[scale], cfg)
    assert torch.equal(states[0.0].gen.get_state(), states[0.5].gen.get_state())
    assert not torch.equal(states[0.0].noise_gen.get_state(), states[0.5].noise_gen.get_state())


def test_w24_with_no_sample_kept_makes_no_update():
    """No caption dropout: a dropped caption is the empty prompt, whose text-conditional difference
    is exactly 0 and below any threshold, so which samples are kept would hang on the draw."""
    models = T.tiny_models("epsilon", seed=1).to("cpu")
    data = tiny_data(models)
    cfg = cfg_for(w24_threshold=1e-9, batch=4, tn=50, caption_dropout=0.0)
    state = T.training_state(models.unet, cfg, "cpu")
    before = [p.clone() for p in models.unet.parameters()]
    _, kept = T.train_step(models, data, state, cfg)
    assert kept == 0 and all(
        torch.equal(p, q) for p, q in zip(before, models.unet.parameters(), strict=True)
    )
    cfg.w24_threshold = None
    T.train_step(models, data, state, cfg)
    assert not all(torch.equal(p, q) for p, q in zip(before, models.unet.parameters(), strict=True))


def all_close(xs, ys, **tolerance):
    return all(torch.allclose(x, y, **tolerance) for x, y in zip(xs, ys, strict=True))


def micro_step(k, **kw):
    """One train_step of a fresh tiny model in k micro-batches: how many samples were kept, and the
    clipped gradient."""
    models = T.tiny_models("v_prediction", seed=0).to("cpu")
    cfg = cfg_for(batch=4, tn=50, accumulate=k, text_noise=0.1, caption_dropout=0.5, **kw)
    state = T.training_state(models.unet, cfg, "cpu")
    _, kept = T.train_step(models, tiny_data(models), state, cfg)
    return kept, [p.grad.clone() for p in models.unet.parameters()]


def test_accumulated_micro_batches_make_the_one_batch_step():
    """--accumulate 2: the step draws one global batch (the same draws as K = 1, in the same order)
    and sums the micro-batches' gradients of the loss over the samples W24 kept in the whole
    batch: the gradient that AdamW then steps with is K = 1's to float32 rounding (relative to each
    tensor's largest entry). No clipping (max-grad-norm 1e9): it would hide a factor."""
    (kept, one), (kept_two, two) = (
        micro_step(k, w24_threshold=0.05, max_grad_norm=1e9) for k in (1, 2)
    )
    assert kept == kept_two and 0 < kept < 4  # some samples left out, in the halves' total
    assert all((g - h).abs().max() <= 1e-4 * g.abs().max() for g, h in zip(one, two, strict=True))


def test_gradient_checkpointing_recomputes_and_leaves_the_loss_and_gradients_unchanged():
    """diffusers' checkpointing runs each block again in the backward pass (a ResNet block is called
    twice a step) and gives the same loss and gradients; auto turns it on above 100M parameters."""
    models = T.tiny_models("v_prediction", seed=0).to("cpu")
    b, _ = tiny_step_inputs(models)
    calls = []
    # a pre-hook: the recomputation stops once it has what the backward pass needs, before the end
    models.unet.down_blocks[0].resnets[0].register_forward_pre_hook(lambda *a: calls.append(1))
    runs = []
    for on in (False, True):
        if on:
            models.unet.enable_gradient_checkpointing()
        models.unet.train().zero_grad()
        calls.clear()
        loss, _ = T.training_loss(models, b, cfg_for())
        loss.backward()
        runs.append((len(calls), loss, [p.grad.clone() for p in models.unet.parameters()]))
    (calls_off, loss_off, grads_off), (calls_on, loss_on, grads_on) = runs
    assert (calls_off, calls_on) == (1, 2) and torch.equal(loss_off, loss_on)
    assert all_close(grads_off, grads_on, rtol=1e-6, atol=1e-10)
    big = torch.nn.Linear(10_000, 10_001, device="meta")  # 100.02M parameters, no memory
    assert T.use_checkpointing("auto", big) and not T.use_checkpointing("auto", models.unet)
    assert T.use_checkpointing("on", models.unet) and not T.use_checkpointing("off", big)


def test_bf16_autocast_moves_the_loss_by_at_most_two_percent(tiny):
    """bf16 keeps 8 significant bits: one rounding moves a value by at most 2^-9 (0.2%); the tiny
    UNet has about five layers in sequence, and a relative error e in the residuals moves a mean of
    squares by about 2e, so 2% bounds the loss's change. The weights stay float32 and so does the
    loss; the loss does change (autocast ran)."""
    b, _ = tiny_step_inputs(tiny)
    with torch.no_grad():
        fp32, _ = T.training_loss(tiny, b, cfg_for(mixed_precision="no"))
        bf16, _ = T.training_loss(tiny, b, cfg_for(mixed_precision="bf16"))
    assert bf16.dtype == torch.float32 and next(tiny.unet.parameters()).dtype == torch.float32
    assert bf16 != fp32 and abs(bf16 - fp32) <= 0.02 * fp32


def test_fp16_loss_scale_goes_into_the_checkpoint_and_comes_back_on_resume(tmp_path):
    models = T.tiny_models("v_prediction", seed=0).to("cpu")
    data, cfg = tiny_data(models), cfg_for(batch=2, tn=50, mixed_precision="fp16")
    state = T.training_state(models.unet, cfg, "cpu")
    assert state.scaler.is_enabled()
    T.train_step(models, data, state, cfg)
    state.scaler.update(1024.0)  # a scale the fresh scaler (65536) does not start from
    T.save_checkpoint(state, data, cfg, tmp_path / "c.pt")
    saved = torch.load(tmp_path / "c.pt", weights_only=True)
    assert saved["scaler"]["scale"] == 1024.0
    resumed = T.training_state(T.tiny_models("v_prediction", seed=1).unet, cfg, "cpu", saved)
    assert resumed.scaler.get_scale() == 1024.0
    for damaged in ({**saved["scaler"], "scale": float("nan")}, {"scale": 1024.0}, [1024.0]):
        with pytest.raises(A.UserError, match="checkpoint's scaler"):
            T.training_state(models.unet, cfg, "cpu", {**saved, "scaler": damaged})
    plain = T.training_state(models.unet, cfg_for(mixed_precision="no"), "cpu")
    assert not plain.scaler.is_enabled()


def test_caption_augmentations_insert_their_words_into_the_caption(tiny):
    tok, caption = tiny.tokenizer, "a photo of the cat"
    words = caption.split(" ")
    vocabulary = {tok.decode([i]).strip() for i in range(len(tok)) if i not in tok.all_special_ids}

    def inserted(out):  # the caption's words keep their order; what else is there, in order
        rest, extra = list(words), []
        for w in out.split(" "):
            if rest and w == rest[0]:
                rest.pop(0)
            else:
                extra.append(w)
        assert not rest
        return extra

    for seed in range(20):
        add = inserted(T.augment_caption(caption, "rand_word_add", 3, tok, gen(seed)))
        repeat = inserted(T.augment_caption(caption, "rand_word_repeat", 3, tok, gen(seed)))
        number = inserted(T.augment_caption(caption, "rand_numb_add", 3, tok, gen(seed)))
        assert len(add) == 3 and set(add) <= vocabulary
        assert len(repeat) == 3 and set(repeat) <= set(words)
        assert len(number) == 3 and all(w.isdigit() and int(w) < 100_000 for w in number)
    # one number into two-word captions: each of the three gaps, either end included, a third
    gaps = [
        T.augment_caption("x y", "rand_numb_add", 1, tok, gen(s)).split(" ") for s in range(600)
    ]
    shares = [np.mean([g[k].isdigit() for g in gaps]) for k in range(3)]
    assert all(abs(share - 1 / 3) < 0.07 for share in shares), shares


def test_caption_augmentation_is_seeded_on_a_generator_of_its_own(tiny):
    """The same seed gives the same augmented captions; the batches, timesteps, noise and caption
    dropout are drawn as without it; --caption-aug-prob 0 leaves every caption as it is."""
    data = tiny_data(tiny)
    data.captions = ["a red fox", "two cats on a mat", "the sea at night"]
    data.ids = T.tokenize(tiny.tokenizer, data.captions)
    batches = {}
    for name, kw in dict(
        none={}, add=dict(caption_aug="rand_word_add"), never=dict(caption_aug="rand_word_add")
    ).items():
        cfg = cfg_for(batch=4, tn=50, caption_dropout=0.0, caption_aug_words=2, **kw)
        cfg.caption_aug_prob = 0.0 if name == "never" else 1.0
        runs = []
        for _ in range(2):
            state = T.training_state(tiny.unet, cfg, "cpu")
            runs.append((T.global_batch(tiny, data, state, cfg), state))
        (b, state), (again, _) = runs
        assert torch.equal(b["ids"], again["ids"])
        batches[name] = (b, state)
    none, add, never = (batches[k] for k in ("none", "add", "never"))
    assert torch.equal(none[1].gen.get_state(), add[1].gen.get_state())
    assert torch.equal(none[0]["x_t"], add[0]["x_t"]) and torch.equal(none[0]["idx"], add[0]["idx"])
    assert not torch.equal(none[0]["ids"], add[0]["ids"])
    assert torch.equal(never[0]["ids"], none[0]["ids"])


def test_an_exported_unet_samples_in_a_diffusers_pipeline_as_the_model_in_memory(tmp_path):
    """--export's save_pretrained folder loads with UNet2DConditionModel.from_pretrained; in a
    StableDiffusionPipeline built from the tiny model's parts it gives the images of the trained
    UNet in memory, bit for bit."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    models = T.tiny_models("v_prediction", seed=0).to("cpu")
    cfg = cfg_for(batch=2, tn=50, lr=1e-2)
    T.train_step(models, tiny_data(models), T.training_state(models.unet, cfg, "cpu"), cfg)
    T.export_unet(models.unet, tmp_path / "unet")
    loaded = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    fresh = T.tiny_models("v_prediction", seed=0).unet  # the weights before the step
    images = []
    for unet in (models.unet, loaded, fresh):
        pipe = StableDiffusionPipeline(
            vae=models.vae,
            text_encoder=models.text_encoder,
            tokenizer=models.tokenizer,
            unet=unet.eval(),
            scheduler=DDIMScheduler.from_config(
                models.scheduler.config, steps_offset=1, clip_sample=False
            ),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        out = pipe("a photo", num_inference_steps=2, generator=gen(0), output_type="np")
        images.append(out.images)
    assert images[0].shape == (1, 16, 16, 3) and np.array_equal(images[0], images[1])
    assert not np.array_equal(images[0], images[2])


def test_caption_dropout_replaces_captions_by_the_empty_prompt_at_its_rate():
    ids = torch.arange(20_000 * 3).reshape(20_000, 3)
    empty = torch.full((1, 3), -1)
    out = T.drop_captions(ids, empty, 0.1, gen(14))
    dropped = (out == -1).all(1)
    assert abs(dropped.float().mean().item() - 0.1) < 4 * (0.1 * 0.9 / 20_000) ** 0.5
    assert torch.equal(out[~dropped], ids[~dropped])
    g0, g1 = gen(15), gen(15)
    assert torch.equal(T.drop_captions(ids, empty, 0.0, g0), ids)
    T.drop_captions(ids, empty, 0.3, g1)
    assert torch.equal(g0.get_state(), g1.get_state())  # p = 0 leaves later draws where they were


def caption_folder(tmp_path, n=4, jsonl=False):
    folder = tmp_path / "data"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(
            folder / f"im{i}.png"
        )
        if jsonl:
            rows.append(json.dumps(dict(file_name=f"im{i}.png", text=f"photo {i}")))
        else:
            (folder / f"im{i}.txt").write_text(f"photo {i}")
    if jsonl:
        (folder / "metadata.jsonl").write_text("\n".join(rows))
    return folder


def test_train_resume_and_sample_end_to_end_with_fixed_noisy_latents(tmp_path):
    """The CLI trains the tiny model, and a resume keeps the checkpoint's noisy latents (tampered
    with here, so that a redraw from the seed would show), continues, and samples the prompts."""
    folder = caption_folder(tmp_path, jsonl=True)
    (tmp_path / "p.txt").write_text("a photo\n\nanother one\n")
    out = tmp_path / "run"
    argv = [
        "--pretrained",
        "tiny",
        "--data",
        str(folder),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--batch",
        "3",
        "--log-every",
        "1",
        "--tn",
        "50",
        "--text-noise",
        "0.1",
    ]
    T.main(argv + ["--iters", "3"])  # 9 images seen of 4: the noisy latents serve several epochs
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    latents = torch.load(out / "latents.pt", weights_only=False)["latents"]
    assert ckpt["step"] == 3 and latents.shape == (4, 4, 8, 8)
    assert torch.equal(
        ckpt["x_tn"], T.make_noisy_latents(latents, sd_scheduler("v_prediction"), 50, 0)
    )
    ckpt["x_tn"] = ckpt["x_tn"] + 1
    torch.save(ckpt, out / "checkpoint.pt")
    T.main(
        argv
        + [
            "--iters",
            "5",
            "--resume",
            "--prompts",
            str(tmp_path / "p.txt"),
            "--steps",
            "2",
            "--samples-per-prompt",
            "2",
            "--export",
            str(tmp_path / "unet"),
        ]
    )
    resumed = torch.load(out / "checkpoint.pt", weights_only=False)
    assert resumed["step"] == 5 and torch.equal(resumed["x_tn"], ckpt["x_tn"])
    from diffusers import UNet2DConditionModel

    exported = UNet2DConditionModel.from_pretrained(tmp_path / "unet").state_dict()
    assert all(torch.equal(v, exported[k]) for k, v in resumed["unet"].items())
    with np.load(out / "samples.npz") as f:
        assert f["images"].shape == (4, 16, 16, 3) and list(f["prompts"][::2]) == [
            "a photo",
            "another one",
        ]
    assert len(list((out / "samples").glob("*.png"))) == 4


def test_two_process_ddp_step_equals_the_one_process_step(tmp_path):
    """Two processes (gloo), each with two micro-batches of its half of the batch: every process
    draws the whole batch (captions augmented, text noise, W24 leaving samples out in the total),
    so after one step the weights are the one process's; only the first process writes. The
    processes are forked from this one (as torchrun's would run, without its 8 s of imports)."""
    argv = ["--pretrained", "tiny", "--data", str(caption_folder(tmp_path)), "--device", "cpu"]
    argv += ["--batch", "4", "--iters", "1", "--tn", "50", "--text-noise", "0.1"]
    argv += ["--caption-aug", "rand_word_add", "--w24-threshold", "0.4", "--caption-dropout", "0"]
    argv += ["--max-grad-norm", "1e9"]  # clipping would hide a gradient off by a factor
    T.main(argv + ["--out", str(tmp_path / "one")])
    two = argv + ["--out", str(tmp_path / "two"), "--accumulate", "2"]
    assert two_processes(T.main, two) == [0, 0]
    one, both = (
        torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in ("one", "two")
    )
    log = (tmp_path / "two" / "log.txt").read_text()
    kept = float(log.split("kept ")[-1].split()[0])
    assert 0 < kept < 1 and log.count("step 1/1") == 1  # one process logs
    assert both["step"] == 1 and torch.equal(one["x_tn"], both["x_tn"])
    # the step's gradient: AdamW's first moment after one step is 0.1 times it. (The weights move
    # by lr g / (|g| + 1e-8): where |g| is near 1e-8, the sum's rounding moves them.)
    moments = [[s["exp_avg"] for s in c["opt"]["state"].values()] for c in (one, both)]
    assert all((g - h).abs().max() <= 1e-4 * g.abs().max() for g, h in zip(*moments, strict=True))
    # the first process fails in its own part (its latents cache is a folder): both stop, exit 2
    (tmp_path / "three" / "latents.pt").mkdir(parents=True)
    three = argv + ["--out", str(tmp_path / "three")]
    assert two_processes(T.main, three, timeout=60) == [2, 2]


def test_gpu_check_runs_the_training_step_on_the_tiny_model(tmp_path, capsys):
    """gpu-check --tiny: the GPU check's path (models, data, train_step, report) on a CPU; without
    --tiny a CPU is refused in one line. SD2_UNET builds a UNet of the size Stability-AI's
    stablediffusion README gives SD-2's ("an 865M UNet")."""
    out = tmp_path / "check"
    argv = ["gpu-check", "--tiny", "--device", "cpu", "--iters", "2", "--out", str(out)]
    T.main(argv + ["--grad-checkpointing", "on", "--accumulate", "2"])
    report = json.loads((out / "gpu-check.json").read_text())
    assert report["steps"] == 2 and len(report["step_seconds"]) == 2 and report["batch"] == 16
    assert report["gradient_checkpointing"] and report["latents"] == [8, 8]
    assert report["peak_allocated_gb"] is None and np.isfinite(report["loss"])
    assert "gpu-check tiny" in capsys.readouterr().out
    assert "needs a CUDA device" in error_of(["gpu-check", "--device", "cpu"], capsys, T.main)
    argv[-1] = str(out / "gpu-check.json")
    assert "is a file; pass a folder" in error_of(argv, capsys, T.main)
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):  # shapes without memory
        unet = UNet2DConditionModel(**T.SD2_UNET)
    assert 865e6 <= sum(p.numel() for p in unet.parameters()) < 866e6


def test_bad_input_gives_one_clear_line(tmp_path, capsys, monkeypatch):
    folder = caption_folder(tmp_path)
    base = [
        "--pretrained",
        "tiny",
        "--data",
        str(folder),
        "--out",
        str(tmp_path / "r"),
        "--device",
        "cpu",
    ]
    main = T.main
    assert "no such folder" in error_of(base[:2] + ["--data", str(tmp_path / "none")], capsys, main)
    assert "timesteps 0 to 999" in error_of(base + ["--tn", "1000"], capsys, main)
    assert "at least 0" in error_of(base + ["--tn", "-1"], capsys, main)
    assert "caption-dropout" in error_of(base + ["--caption-dropout", "1"], capsys, main)
    assert "must divide --batch 16" in error_of(base + ["--accumulate", "3"], capsys, main)
    assert "caption-aug-prob" in error_of(base + ["--caption-aug-prob", "2"], capsys, main)
    assert "--export" in error_of(base + ["--export", str(folder / "im0.png")], capsys, main)

    def out_of_memory(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(T, "train_step", out_of_memory)
    err = error_of(base + ["--out", str(tmp_path / "oom")], capsys, main)
    assert "out of GPU memory at step 1" in err and "--accumulate" in err
    monkeypatch.undo()
    assert "multiple of 4" in error_of(base + ["--resolution", "18"], capsys, main)
    (tmp_path / "empty.txt").write_text("\n")
    assert "no prompt" in error_of(base + ["--prompts", str(tmp_path / "empty.txt")], capsys, main)
    (folder / "im0.txt").unlink()
    assert "has no caption" in error_of(base, capsys, main)
    pre = ["--data", str(caption_folder(tmp_path / "b")), "--device", "cpu", "--pretrained"]
    assert "no such folder" in error_of(pre + [str(tmp_path / "sd2")], capsys, main)

    def offline(*args, **kwargs):  # what diffusers raises on a machine without the network
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    import diffusers

    monkeypatch.setattr(diffusers.StableDiffusionPipeline, "from_pretrained", offline)
    err = error_of(pre + ["stabilityai/stable-diffusion-2"], capsys, main)
    assert "cannot load a Stable Diffusion pipeline (OSError: We couldn't connect" in err
    assert "--local-dir" in err


def test_pretrained_failures_name_their_cause(tmp_path, capsys, monkeypatch):
    """The cause comes from the exception's message, through the chain that diffusers raises (a
    gated model's Hub error under an OSError that points at the traceback), in one line."""
    import diffusers

    pre = ["--data", str(caption_folder(tmp_path)), "--device", "cpu", "--pretrained"]
    (tmp_path / "empty").mkdir()
    err = error_of(pre + [str(tmp_path / "empty")], capsys, T.main)  # diffusers' own failure
    assert "no file named model_index.json" in err and "holds a diffusers pipeline" in err
    gated = RuntimeError(
        "401 Client Error. Cannot access gated repo for url https://huggingface.co/x/y.\n"
        "Access to model x/y is restricted. You must have access to it and be authenticated."
    )
    failures = dict(gated=gated, missing=ModuleNotFoundError("No module named 'ftfy'", name="ftfy"))

    def load(*args, **kwargs):
        if failures["now"] is gated:
            raise OSError(
                "Cannot load model x/y: see the root cause in the stacktrace above"
            ) from gated
        raise failures["now"]

    monkeypatch.setattr(diffusers.StableDiffusionPipeline, "from_pretrained", load)
    failures["now"] = gated
    err = error_of(pre + ["x/y"], capsys, T.main)
    assert "RuntimeError: 401 Client Error. Cannot access gated repo" in err
    assert "huggingface-cli login" in err
    failures["now"] = failures["missing"]
    assert "pip install ftfy" in error_of(pre + ["x/y"], capsys, T.main)


class Planted:
    """Unpickling this calls os.system: what full unpickling (weights_only=False) would run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def test_a_latents_cache_holding_a_pickled_callable_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "ran"
    planted = dict(latents=torch.zeros(1), key={}, code=Planted(marker))
    torch.save(planted, tmp_path / "latents.pt")
    with pytest.raises(A.UserError, match="not a checkpoint this project wrote"):
        T.cached_latents(tmp_path / "latents.pt", {}, (1,))
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------
# score: Table 5's columns (Sim, 95%, CLIP, FID), the training images streamed in chunks.
# ------------------------------------------------------------------------------------------------
def test_clip_score_is_100_times_the_cosine_clipped_at_0():
    """Each pair clipped (Hessel et al.): identical directions 100, orthogonal 0, opposite 0 (not
    -100), cos 1/2 gives 50, whatever the embeddings' lengths."""
    image = torch.tensor([[3.0, 0.0], [0.0, 2.0], [1.0, 0.0], [2.0, 0.0]])
    text = torch.tensor([[0.5, 0.0], [1.0, 0.0], [-4.0, 0.0], [1.0, 3.0**0.5]])
    assert torch.allclose(T.clip_score(image, text), torch.tensor([100.0, 0, 0, 50], dtype=f64))


def test_clip_scorer_pairs_each_image_with_its_own_caption():
    """Sample i's score is 100 max(cos, 0) of image i's and caption i's projected embeddings, as
    CLIPModel's get_image_features and get_text_features give them."""
    torch.manual_seed(1)
    clip = T.tiny_clip()
    images = np.random.default_rng(1).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    prompts = ["a red square", "noise", "a photo of 7"]
    pixels = clip.image_processor(images=list(images), return_tensors="pt").pixel_values
    with torch.no_grad():
        image = clip.model.get_image_features(pixel_values=pixels).pooler_output
        text = clip.model.get_text_features(input_ids=T.tokenize(clip.tokenizer, prompts))
    cos = torch.nn.functional.cosine_similarity(image, text.pooler_output).double()
    got = clip(images, prompts)
    assert torch.allclose(got, 100 * cos.clamp(min=0), atol=1e-4)
    assert (cos > 0).any() and (cos < 0).any()  # both sides of the clip are exercised


def test_the_streamed_training_pass_equals_the_one_shot_pass():
    """Chunks of 1, 3 or all 7 training images give eval_memorization's one-shot top-1 cosine
    (value and index) and its mean and covariance of the features."""
    from eval_memorization import statistics, top1_cosine

    train = torch.randn(7, 3, 2, 2, generator=gen(20))
    samples = torch.randn(5, 12, generator=gen(21)).double().numpy()
    project = torch.randn(12, 4, generator=gen(22))
    nets = types.SimpleNamespace(
        similarity=lambda x: x.flatten(1), inception=lambda x: x.flatten(1) @ project
    )
    want_sims, want_idx = top1_cosine(samples, train.flatten(1).double().numpy())
    want_mu, want_cov = statistics((train.flatten(1) @ project).double().numpy())
    for chunk in (1, 3, 7):
        chunks = ((i, train[i : i + chunk]) for i in range(0, 7, chunk))
        best, (mu, cov) = T.scan_training(chunks, {"run": samples}, nets, 2, "cpu")
        sims, idx = best["run"]
        assert np.allclose(sims, want_sims, atol=1e-12) and np.array_equal(idx, want_idx), chunk
        assert np.allclose(mu, want_mu, atol=1e-6) and np.allclose(cov, want_cov, atol=1e-6)
    assert len(set(want_idx.tolist())) > 1  # the nearest images are in several chunks


def test_image_archives_are_read_a_chunk_at_a_time_as_written(tmp_path):
    images = np.random.default_rng(2).integers(0, 256, (7, 4, 5, 3), dtype=np.uint8)
    for save in (np.savez, np.savez_compressed):
        save(tmp_path / "s.npz", images=images, prompts=np.array(["a"] * 7))
        chunks = list(T.npz_chunks(tmp_path / "s.npz", 3, "fix"))
        assert [len(c) for c in chunks] == [3, 3, 1]
        assert np.array_equal(np.concatenate(chunks), images)
        assert T.npz_shape(tmp_path / "s.npz", "fix") == (7, 4, 5, 3)


def fake_t2i_run(folder, data, **settings):
    """A run folder as text_to_image.py writes it, without training: config.json alone."""
    folder.mkdir(parents=True)
    cfg = T.Config(data=str(data), pretrained="tiny", resolution=16, **settings)
    cfg.data_path = str(data.resolve())
    (folder / "config.json").write_text(json.dumps(cfg.saved()))
    return folder


def square_caption_folder(tmp_path, n=3):
    """n 16 x 16 images with captions: load_image reads them unchanged."""
    folder = tmp_path / "data"
    folder.mkdir(parents=True)
    images = np.random.default_rng(3).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"im{i}.png")
        (folder / f"im{i}.txt").write_text(f"photo {i}")
    return folder, images


def place_samples(run, images, prompts):
    shard = run / T.SCORE_SAMPLES / "000000"
    shard.mkdir(parents=True)
    np.savez(shard / "samples.npz", images=images, prompts=np.array(prompts))


SCORE_CPU = ["--random-weights", "--dinov2", "vits14", "--device", "cpu", "--batch", "4"]


def test_score_writes_one_row_per_run_and_streams_the_training_images(tmp_path, monkeypatch):
    """Two runs: one with a checkpoint and no samples (score draws them, one per training caption,
    and stores them in the run), one without a checkpoint whose samples.npz holds its training
    images for their captions (Sim and its 95th percentile are 1, each sample's nearest image its
    own). One pass over the 3 training images
    serves both runs, and at most a chunk (2) of them is ever alive."""
    folder, images = square_caption_folder(tmp_path)
    drawn = tmp_path / "drawn"
    T.main(
        ["--pretrained", "tiny", "--data", str(folder), "--out", str(drawn), "--tn", "0"]
        + ["--iters", "0", "--steps", "2", "--device", "cpu"]
    )
    copies = fake_t2i_run(tmp_path / "copies", folder, tn=100, text_noise=0.1, w24_threshold=2.0)
    captions = [f"photo {i}" for i in range(3)]
    np.savez(copies / "samples.npz", images=images, prompts=np.array(captions))  # its --prompts
    generated, live, loaded = [], [0], [0]
    real_sample, real_load, real_chunks = T.sample, T.load_image, T.training_chunks

    def spy_sample(models, prompt, *args):
        generated.append(prompt)
        return real_sample(models, prompt, *args)

    def track(x, count):  # counts images alive, and their most, until the tensor is freed
        live[0] += count
        loaded[0] = max(loaded[0], live[0])
        weakref.finalize(x, lambda: live.__setitem__(0, live[0] - count))

    def spy_load(path, resolution):
        x = real_load(path, resolution)
        track(x, 1)
        calls.append(path)
        return x

    def spy_chunks(pairs, resolution, chunk):
        for start, x in real_chunks(pairs, resolution, chunk):
            track(x, len(x))
            yield start, x
            del x

    calls = []
    monkeypatch.setattr(T, "sample", spy_sample)
    monkeypatch.setattr(T, "load_image", spy_load)
    monkeypatch.setattr(T, "training_chunks", spy_chunks)
    out = tmp_path / "table5"
    T.main(["score", str(drawn), str(copies), "--chunk", "2", "--out", str(out)] + SCORE_CPU)
    assert generated == captions  # only the run without samples drew any
    with np.load(drawn / T.SCORE_SAMPLES / "000000" / "samples.npz") as f:
        assert f["images"].shape == (3, 16, 16, 3) and list(f["prompts"]) == captions
    assert len(calls) == 3 and loaded[0] <= 2  # one pass, a chunk at a time
    rows = json.loads((out / "table5.json").read_text())["runs"]
    assert (rows["drawn"]["tn"], rows["drawn"]["text_noise"], rows["drawn"]["w24_threshold"]) == (
        0,
        0.0,
        None,
    )
    assert (rows["copies"]["tn"], rows["copies"]["w24_threshold"]) == (100, 2.0)
    assert abs(rows["copies"]["sim"] - 1) < 1e-9 and abs(rows["copies"]["sim_95"] - 1) < 1e-9
    with np.load(out / "per_sample_copies.npz") as f:
        assert np.array_equal(f["nearest_train"], np.arange(3))
    assert all(0 <= r["clip"] <= 100 and r["fid"] >= 0 for r in rows.values())
    table = (out / "table5.md").read_text()
    assert "| copies | 100 | 0.1 | 2 | 1.000 | 1.000 |" in table and "RANDOM WEIGHTS" in table


def test_score_scores_samples_of_the_checkpoint_it_finds_not_older_ones(
    tmp_path, capsys, monkeypatch
):
    """Samples belong to the checkpoint that drew them. The run's own samples.npz (--prompts the
    training captions) is scored while its checkpoint is the one that drew it; after more
    training (the checkpoint's step raised) score draws afresh, and later refuses the shards it
    drew at the step before, naming the step. Each row gives its samples' step."""
    folder, _ = square_caption_folder(tmp_path)
    captions = [f"photo {i}" for i in range(3)]
    (tmp_path / "prompts.txt").write_text("\n".join(captions))
    run, out = tmp_path / "run", tmp_path / "table5"
    T.main(
        ["--pretrained", "tiny", "--data", str(folder), "--out", str(run), "--iters", "0"]
        + ["--steps", "2", "--device", "cpu", "--prompts", str(tmp_path / "prompts.txt")]
    )
    drew, real_sample = [], T.sample
    monkeypatch.setattr(
        T,
        "sample",
        lambda models, prompt, *a: drew.append(prompt) or real_sample(models, prompt, *a),
    )

    score = ["score", str(run), "--out", str(out)] + SCORE_CPU

    def score_at(step):
        saved = torch.load(run / "checkpoint.pt", weights_only=True)
        torch.save(dict(saved, step=step), run / "checkpoint.pt")
        T.main(score)
        return json.loads((out / "table5.json").read_text())["runs"]["run"]["step"]

    assert score_at(0) == 0 and drew == []
    assert score_at(3) == 3 and drew == captions
    saved = torch.load(run / "checkpoint.pt", weights_only=True)
    torch.save(dict(saved, step=4), run / "checkpoint.pt")
    capsys.readouterr()
    assert "drawn with other settings (step;" in error_of(score, capsys, T.main)


def test_score_bad_input_gives_one_clear_line(tmp_path, capsys, monkeypatch):
    folder, images = square_caption_folder(tmp_path)
    run = fake_t2i_run(tmp_path / "run", folder)
    score = ["score", str(run), "--no-download"]

    def err(argv):
        return error_of(argv, capsys, T.main)

    assert "no such run folder" in err(["score", str(tmp_path / "none")])
    (tmp_path / "bare").mkdir()
    assert "no config.json" in err(["score", str(tmp_path / "bare")])
    assert "no checkpoint.pt to draw them" in err(score)
    assert "--train" in err(score + ["--train", str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    assert "--train" in err(score + ["--train", str(tmp_path / "empty")])
    assert "the training set has 3 captions" in err(score + ["--samples", "9"])
    assert "must be at least 1" in err(score + ["--chunk", "0"])
    assert "--seed -1 must be from 0" in err(score + ["--seed", "-1"])
    assert "--guidance nan is not a finite number" in err(score + ["--guidance", "nan"])
    assert "is a file; pass a folder" in err(score + ["--out", str(folder / "im0.txt")])
    captions = [f"photo {i}" for i in range(3)]
    place_samples(run, images[:, :8, :8], captions)
    assert "holds 3 images of 8x8, and the run needs 3 of 16x16" in err(score)
    shard = run / T.SCORE_SAMPLES / "000000" / "samples.npz"
    np.savez(shard, images=images, prompts=np.array(captions))
    protocol = run / T.SCORE_SAMPLES / "protocol.json"
    protocol.write_text(json.dumps(dict(seed=1, steps=50, guidance=7.5, captions=[0, 1, 2])))
    assert "drawn with other settings (seed;" in err(score)
    protocol.unlink()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("AMBIENT_WEIGHTS", str(tmp_path / "weights"))
    missing = err(score)
    for name in ("pt_inception-2015-12-05", "dinov2_vitg14_pretrain.pth", T.CLIP_DEFAULT):
        assert name in missing, name
    shard.write_bytes(shard.read_bytes()[:300])
    assert "delete" in err(score)


# ---------------------------------------------------------------------------------------------
# Inputs (issue 26): each bad one is one line and exit code 2, with nothing written
# ---------------------------------------------------------------------------------------------
def t2i_argv(folder, out, *flags):
    tiny = ["--pretrained", "tiny", "--device", "cpu", "--batch", "2", "--iters", "1"]
    return tiny + ["--data", str(folder), "--out", str(out), *flags]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run of one step on 3 captioned images, and the argv that made it."""
    tmp = tmp_path_factory.mktemp("t2i")
    argv = t2i_argv(caption_folder(tmp, n=3), tmp / "run")
    T.main(argv)
    return tmp / "run", argv


def copy_of(trained, tmp, checkpoint=True):
    """The trained run copied to tmp/run (without its checkpoint if not `checkpoint`), and the argv
    that resumes it there (a fresh run there without one)."""
    run = Path(tmp) / "run"
    shutil.copytree(trained[0], run)
    if not checkpoint:
        (run / "checkpoint.pt").unlink()
    return run, trained[1] + ["--out", str(run)] + ["--resume"] * checkpoint  # the last --out wins


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--lr", "nan"], "lr nan is not a number below 2^31"),
        (["--lr", "inf"], "lr inf is not a number"),
        (["--max-grad-norm", "nan"], "max_grad_norm nan is not a number"),
        (["--guidance", "nan"], "guidance nan is not a number"),
        (["--text-noise", "inf"], "text_noise inf is not a number"),
        (["--text-noise", "1e30"], "text_noise 1e+30 is not a number below 2^31"),
        (["--w24-threshold", "nan"], "w24_threshold nan is not a number"),
        (["--seed", "9" * 23], f"seed {'9' * 23} is not an integer below 2^31"),
        (["--device", "meta"], "--device meta is not a device that holds tensors here"),
        (["--out", "im0.txt"], "im0.txt is a file; pass a folder for the run"),
        (["--export", "im0.txt/unet"], "im0.txt/unet is or lies in a file; pass a folder"),
        (["--steps", "1001"], "--steps 1001: the scheduler has 1000 timesteps"),
    ],
)
def test_a_flag_of_the_wrong_type_or_range_is_one_line(flags, named, tmp_path, capsys):
    folder = caption_folder(tmp_path)
    if flags[0] in ("--out", "--export"):
        flags = [flags[0], str(folder / flags[1])]
    assert named in one_line(T.main, t2i_argv(folder, tmp_path / "r", *flags), capsys, tmp_path)


def png_header(width, height):
    """A PNG's signature and header for an 8-bit RGB image of this size, and a few pixel bytes."""

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = chunk(b"IDAT", zlib.compress(bytes(64)))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + pixels + chunk(b"IEND", b"")


def rows(*rows):
    return "\n".join(json.dumps(row) for row in rows).encode()


@pytest.mark.parametrize(
    "name, content, named",
    [
        ("im0.txt", "café".encode("latin-1"), "im0.txt is not UTF-8 text"),
        (
            "metadata.jsonl",
            b'{"file_name": "im0.png", "text": "caf\xe9"}',
            "metadata.jsonl is not UTF-8 text",
        ),
        ("metadata.jsonl", b"[" * 100_000, "metadata.jsonl line 1 is not JSON (RecursionError)"),
        (
            "metadata.jsonl",
            rows(dict(file_name="im0.png", text=None)),
            "line 1: its text is None, not a string",
        ),
        (
            "metadata.jsonl",
            rows(dict(file_name="im0.png", text="a"), [1]),
            "line 2 holds [1], not an object",
        ),
        ("metadata.jsonl", rows(dict(text="a")), "line 1: it has no file_name, not a string"),
        ("im0.png", png_header(15000, 15000), "PIL's decompression-bomb limit"),
    ],
)
def test_a_caption_or_image_that_cannot_be_read_as_written_is_one_line(
    name, content, named, tmp_path, capsys
):
    """Captions are UTF-8 (a Latin-1 byte is refused, not guessed), metadata.jsonl lines are JSON
    objects with string fields (null is not the caption "None"; nesting past Python's recursion
    limit is refused), and a 15000x15000 PNG is refused from its header."""
    folder = caption_folder(tmp_path)
    (folder / name).write_bytes(content)
    assert named in one_line(T.main, t2i_argv(folder, tmp_path / "r"), capsys, tmp_path)


def test_a_byte_order_mark_is_not_part_of_a_caption_or_a_prompt(tmp_path):
    """Notepad's UTF-8 starts with U+FEFF, which str.strip keeps: it would enter the caption."""
    folder = caption_folder(tmp_path, n=1)
    (folder / "im0.txt").write_bytes("\ufeffphoto é".encode())
    assert T.read_captions(folder)[0][1] == "photo é"
    (tmp_path / "p.txt").write_bytes("\ufeffa cat\n".encode())
    assert T.read_prompts(tmp_path / "p.txt") == ["a cat"]


def test_16_bit_greyscale_is_scaled_to_8_bits_not_clipped(tmp_path):
    """A 16-bit PNG's values v become round(v / 257), its 8-bit equivalent (257 * 255 = 65535),
    in ambient.py's image folders and text_to_image.py's alike."""
    k = np.arange(256).reshape(16, 16)
    Image.fromarray((257 * k).astype(np.uint16)).save(tmp_path / "g.png")
    assert Image.open(tmp_path / "g.png").mode == "I;16"
    expected = torch.from_numpy(k).float().expand(3, 16, 16) / 127.5 - 1
    assert torch.equal(T.load_image(tmp_path / "g.png", 16), expected)  # 16 px: no resampling
    rgb = np.repeat(k[..., None].astype(np.uint8), 3, axis=-1)
    assert np.array_equal(A.load_image_folder(tmp_path)[0], rgb)
    older = io.BytesIO()  # mode I: older Pillow's for 16-bit PNGs (TIFF keeps it)
    Image.fromarray((257 * k).astype(np.int32)).save(older, format="TIFF")
    assert Image.open(older).mode == "I"
    assert np.array_equal(A.open_image(older, read=True), rgb)


def test_a_latents_cache_from_another_vae_is_encoded_again_and_this_ones_is_reused(
    trained, tmp_path, capsys
):
    """The cache is keyed by the model, its VAE's weights (the tiny model's come from --seed), the
    resolution and the images: a copied run with another --seed encodes with its own VAE, the
    next start reads that cache, and a --resume whose cache was made from other images stops."""
    run, argv = copy_of(trained, tmp_path, checkpoint=False)
    capsys.readouterr()
    T.main(argv + ["--seed", "1"])
    assert "latents.pt was made from another vae)" in capsys.readouterr().out
    pairs = T.read_captions(argv[argv.index("--data") + 1])
    models, cfg = T.tiny_models(seed=1).to("cpu"), cfg_for(seed=1, resolution=16)
    own = T.encode_latents(models, [image for image, _ in pairs], 16, "cpu")
    cache = torch.load(run / "latents.pt", weights_only=True)
    assert torch.equal(cache["latents"], own)
    shape, key = T.latents_shape(models, cfg, 3), T.latents_key(models, cfg, pairs)
    assert T.cached_latents(run / "latents.pt", key, shape)[0] is not None  # read, not encoded
    torch.save({**cache, "key": {**cache["key"], "images": "0" * 64}}, run / "latents.pt")
    with pytest.raises(A.UserError, match="was made from another images than this run's"):
        T.prepare_latents(models, pairs, cfg, run, {"x_tn": own}, "cpu")  # a --resume


def test_the_latents_key_is_the_same_in_every_process(tiny, tmp_path):
    """diffusers' _use_default_values lists a set, whose order changes with the process's string
    hashing: the key leaves out such private entries of the VAE's config."""
    pairs = T.read_captions(caption_folder(tmp_path, n=1))
    config = dict(tiny.vae.config)
    shuffled = {**config, "_use_default_values": config["_use_default_values"][::-1]}
    assert shuffled != config
    other = types.SimpleNamespace(vae=types.SimpleNamespace(config=shuffled))
    other.vae.state_dict = tiny.vae.state_dict
    cfg = cfg_for(resolution=16)
    assert T.latents_key(other, cfg, pairs) == T.latents_key(tiny, cfg, pairs)


LATENTS_DAMAGE = {
    "3 channels": lambda x: x[:, :3],
    "int64": lambda x: x.long(),
    "5-D": lambda x: x[None],
    "float16": lambda x: x.half(),
    "2 rows for 3 images": lambda x: x[:2],
}


@pytest.mark.parametrize("damage", [*LATENTS_DAMAGE, "a folder"])
def test_a_latents_cache_of_another_dtype_or_shape_is_one_error(damage, trained, tmp_path):
    """(The generated damage below gives the same at the command line, writing nothing.)"""
    cache = torch.load(trained[0] / "latents.pt", weights_only=True)
    if damage == "a folder":
        (tmp_path / "latents.pt").mkdir()
    else:
        latents = LATENTS_DAMAGE[damage](cache["latents"])
        torch.save({**cache, "latents": latents}, tmp_path / "latents.pt")
    with pytest.raises(A.UserError, match="latents.pt .*; delete it to encode the images again"):
        T.cached_latents(tmp_path / "latents.pt", cache["key"], (3, 4, 8, 8))


def group(c):
    return c["opt"]["param_groups"][0]


CHECKPOINT_DAMAGE = {  # row 8 of issue 26, and a few more: (the change, the entry named)
    "x_tn[:1]": (lambda c: c.update(x_tn=c["x_tn"][:1]), "x_tn"),
    "x_tn of another side": (lambda c: c.update(x_tn=c["x_tn"][..., :4, :4]), "x_tn"),
    "x_tn float64": (lambda c: c.update(x_tn=c["x_tn"].double()), "x_tn"),
    'lr "abc"': (lambda c: group(c).update(lr="abc"), "opt group 0 lr"),
    "exp_avg of shape (7,)": (
        lambda c: c["opt"]["state"][0].update(exp_avg=torch.zeros(7)),
        "opt state of parameter 0 exp_avg",
    ),
    "1-tuple betas": (lambda c: group(c).update(betas=(0.9,)), "opt group 0 betas"),
    "param_groups None": (lambda c: c["opt"].update(param_groups=None), "opt"),
    "rng a float": (lambda c: c.update(rng=0.5), "rng"),
    "noise_rng of repeated bytes": (
        lambda c: c.update(noise_rng=torch.full((5056,), 7, dtype=torch.uint8)),
        "noise_rng",
    ),
    "step -5": (lambda c: c.update(step=-5), "step"),
    "unet of another shape": (
        lambda c: c["unet"].update({"conv_in.weight": torch.zeros(3)}),
        "unet",
    ),
}


@pytest.fixture(scope="module")
def checkpoint(trained):
    return torch.load(trained[0] / "checkpoint.pt", weights_only=True)


@pytest.mark.parametrize("damage", CHECKPOINT_DAMAGE)
def test_a_checkpoint_entry_that_does_not_fit_is_one_error_naming_it(damage, checkpoint):
    """What --resume checks before anything is written (the generated damage below runs it at the
    command line, writing nothing)."""
    saved = copy.deepcopy(checkpoint)
    change, entry = CHECKPOINT_DAMAGE[damage]
    change(saved)
    unet = T.tiny_models(seed=0).unet
    with pytest.raises(A.UserError, match=rf"^--resume: the checkpoint's {re.escape(entry)} "):
        T.saved_x_tn(saved, (3, 4, 8, 8))
        T.training_state(unet, cfg_for(), "cpu", saved)


def test_a_stop_while_saving_leaves_no_tmp_file_and_keeps_the_last_checkpoint(
    trained, tmp_path, capsys, monkeypatch
):
    """SIGTERM arrives while checkpoint.pt.tmp is written: the partial file is removed and the
    last checkpoint kept; a latents.pt.tmp that a killed run left is removed at the next start."""
    run, argv = copy_of(trained, tmp_path)
    (run / "latents.pt.tmp").write_bytes(b"PK")
    last = (run / "checkpoint.pt").read_bytes()
    save = torch.save

    def stopped(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK\x03\x04")  # the first bytes of a zip, as a save begins
        os.kill(os.getpid(), signal.SIGTERM)  # ambient.main makes it a KeyboardInterrupt
        save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", stopped)
    with pytest.raises(SystemExit) as e:
        T.main(argv + ["--iters", "2"])
    assert e.value.code == 130 and "the last checkpoint is kept" in capsys.readouterr().err
    assert (run / "checkpoint.pt").read_bytes() == last and not list(run.glob("*.tmp"))


def test_a_loss_weights_or_samples_that_are_not_finite_stop_the_run_naming_the_cause(
    tiny, tmp_path, monkeypatch
):
    """Weights: --lr or --max-grad-norm; a loss at the first step from the loaded weights: the
    inputs (--text-noise); a later loss: the updates (--lr); samples: --guidance; latents: the
    VAE."""
    net = torch.nn.Linear(2, 2)
    state, cfg, nan = (
        types.SimpleNamespace(unet=net, step=5),
        cfg_for(text_noise=0.5),
        torch.tensor(torch.nan),
    )
    T.check_finite(state, torch.tensor(1.0), cfg, first=0)  # all finite: the run goes on
    with pytest.raises(A.UserError, match=r"step 5, the first .* a lower --text-noise \(0.5\)"):
        T.check_finite(state, nan, cfg, first=4)
    with pytest.raises(A.UserError, match=r"step 5: the updates .* a lower --lr \(1e-05\)"):
        T.check_finite(state, nan, cfg, first=0)
    net.bias.data[0] = torch.inf
    with pytest.raises(A.UserError, match=r"weights are not finite after step 5; .* --lr"):
        T.check_finite(state, torch.tensor(1.0), cfg, first=4)
    monkeypatch.setattr(T, "sample", lambda *args: torch.full((1, 3, 16, 16), torch.nan))
    with pytest.raises(A.UserError, match=r"samples of prompt 1 are not finite: .*--guidance"):
        T.generate(tiny, ["a photo"], cfg_for(resolution=16), tmp_path)
    monkeypatch.setattr(T, "encode_latents", lambda *args: torch.full((3, 4, 2, 2), torch.nan))
    pairs = T.read_captions(caption_folder(tmp_path, n=3))
    with pytest.raises(A.UserError, match=r"encoded 3 images to latents that are not finite"):
        T.prepare_latents(tiny, pairs, cfg_for(resolution=16), tmp_path, None, "cpu")


def utf8(content):
    try:
        content.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def saved_bytes(obj):
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(obj, Path(tmp) / "c.pt")
        return (Path(tmp) / "c.pt").read_bytes()


tensors = (float_arrays | other_arrays).map(torch.from_numpy)
DATA_DAMAGE = st.one_of(  # (file in the data folder, its damaged content or None: a dangling link)
    st.tuples(st.just("im1.png"), damaged_file(PNG_PIXELS_CUT)),
    st.tuples(st.just("im1.txt"), st.binary(min_size=1, max_size=64).filter(lambda b: not utf8(b))),
    st.tuples(st.just("im1.txt"), st.none()),
    st.tuples(
        st.just("metadata.jsonl"),
        st.binary(max_size=200)  # not JSON, or blank: no rows
        | st.lists(json_values, min_size=1, max_size=3).map(lambda v: rows(*v))  # no file_name
        | json_values.filter(lambda v: not isinstance(v, str)).map(
            lambda v: rows(dict(file_name="im0.png", text=v))
        ),
    ),
)


def run_damage(trained, target):
    """A strategy: (file in the run folder, its damaged content) for the latents cache or the
    checkpoint of the trained run: unreadable, or one entry of another type, dtype or shape."""
    intact = (trained[0] / target).read_bytes()
    saved = torch.load(trained[0] / target, weights_only=True)
    if target == "latents.pt":
        entries = st.builds(lambda a: saved_bytes({**saved, "latents": a}), tensors)
    else:  # a step from 0 to 2^31 would be a good one
        entries = st.builds(
            lambda k, v: saved_bytes({**saved, k: v}),
            st.sampled_from(["unet", "opt", "step", "rng", "noise_rng", "x_tn"]),
            json_values | tensors,
        ).filter(lambda b: not good_step(b, saved))
    return st.tuples(st.just(target), damaged_file(intact) | entries)


def good_step(content, saved):
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "c.pt").write_bytes(content)
        step = torch.load(Path(tmp) / "c.pt", weights_only=True)["step"]
    return type(step) is int and 0 <= step < 2**31


@FUZZ
@given(target=st.sampled_from(["data", "latents.pt", "checkpoint.pt"]), data=st.data())
@example(target="checkpoint.pt", data="x_tn[:1]").via("issue 26 row 8, checked after loading")
@example(target="checkpoint.pt", data='lr "abc"').via("issue 26 row 8, checked after loading")
def test_a_damaged_data_folder_latents_cache_or_checkpoint_is_one_line_writing_nothing(
    target, data, trained, capsys
):
    """One file damaged: an image, caption or metadata.jsonl of the data folder (a fresh run), the
    latents cache (a fresh run in a folder holding it) or the checkpoint (a --resume)."""
    with tempfile.TemporaryDirectory() as tmp:
        if target == "data":
            folder = caption_folder(Path(tmp), n=3)
            argv = t2i_argv(folder, Path(tmp) / "run")
            name, content = data.draw(DATA_DAMAGE)
            write(folder / name, content)
        else:
            run, argv = copy_of(trained, tmp, checkpoint=target == "checkpoint.pt")
            if isinstance(data, str):  # one of CHECKPOINT_DAMAGE
                saved = torch.load(run / target, weights_only=True)
                CHECKPOINT_DAMAGE[data][0](saved)
                name, content = target, saved_bytes(saved)
            else:
                name, content = data.draw(run_damage(trained, target))
            write(run / name, content)
        one_line(T.main, argv, capsys, Path(tmp))
