"""Facts about text_to_image.py, Algorithm 1 for a diffusers text-to-image model (Table 5): the
usual target at t_n = 0, Lemma C.2's target has the clean target's conditional mean, no clean
latent above t_n, fixed noisy latents, the mitigations, and a tiny model trained, resumed and
sampled on CPU; and its inputs (issue 26): typed flags, UTF-8 captions, bounded JSON, images from
their headers with 16-bit ones scaled, a keyed and checked latents cache, checked --resume entries,
no .tmp left by a stop, non-finite results named, and generated damaged inputs giving one line."""

import copy
import json
import os
import re
import shutil
import signal
import struct
import tempfile
import types
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
from test_ambient import error_of
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
    return b, ids


def cfg_for(**kw):
    return T.Config(data="x", pretrained="tiny", **kw)


def test_text_noise_changes_the_embedding_by_its_scale_and_nothing_else(tiny, monkeypatch):
    b, ids = tiny_step_inputs(tiny)
    rec = Recorder(tiny.unet)
    monkeypatch.setattr(tiny, "unet", rec)
    runs = {}
    for scale in (0.0, 0.5):
        noise_gen = gen(12)
        loss, _ = T.training_loss(tiny, b, ids, cfg_for(text_noise=scale), noise_gen)
        runs[scale] = (rec.calls[-1], loss)
    (x0, t0, e0), plain = runs[0.0]
    (x1, t1, e1), noised = runs[0.5]
    assert torch.equal(x0, x1) and torch.equal(t0, t1) and plain != noised
    diff = e1 - e0  # DCR's form: e + scale * N(0, I), elementwise
    assert abs(diff.mean()) < 0.05 and abs(diff.std() - 0.5) < 0.05


def test_w24_leaves_out_exactly_the_samples_with_a_large_text_conditional_prediction(tiny):
    b, ids = tiny_step_inputs(tiny)
    with torch.no_grad():
        emb = tiny.text_encoder(ids)[0]
        cond = tiny.unet(b["x_t"], b["t"], emb).sample
        uncond = tiny.unet(b["x_t"], b["t"], tiny.empty_emb.expand(len(ids), -1, -1)).sample
    norms = (cond - uncond).flatten(1).norm(dim=1)
    per_sample = (cond - b["target"]).square().flatten(1).mean(1) * T.loss_weight(b, "released")
    threshold = norms.median().item()
    with torch.no_grad():
        loss, keep = T.training_loss(tiny, b, ids, cfg_for(w24_threshold=threshold), None)
        full, keep_all = T.training_loss(tiny, b, ids, cfg_for(), None)
    assert torch.equal(keep, norms < threshold) and 0 < keep.sum() < len(keep)
    assert torch.allclose(loss, per_sample[keep].mean(), rtol=1e-5)
    assert keep_all.all() and torch.allclose(full, per_sample.mean(), rtol=1e-5)


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
    models = T.tiny_models("epsilon", seed=1).to("cpu")
    data = tiny_data(models)
    cfg = cfg_for(w24_threshold=1e-9, batch=4, tn=50, caption_dropout=0.0)  # empty: cond = uncond
    state = T.training_state(models.unet, cfg, "cpu")
    before = [p.clone() for p in models.unet.parameters()]
    _, kept = T.train_step(models, data, state, cfg)
    assert kept == 0 and all(
        torch.equal(p, q) for p, q in zip(before, models.unet.parameters(), strict=True)
    )
    cfg.w24_threshold = None
    T.train_step(models, data, state, cfg)
    assert not all(torch.equal(p, q) for p, q in zip(before, models.unet.parameters(), strict=True))


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
        ]
    )
    resumed = torch.load(out / "checkpoint.pt", weights_only=False)
    assert resumed["step"] == 5 and torch.equal(resumed["x_tn"], ckpt["x_tn"])
    with np.load(out / "samples.npz") as f:
        assert f["images"].shape == (4, 16, 16, 3) and list(f["prompts"][::2]) == [
            "a photo",
            "another one",
        ]
    assert len(list((out / "samples").glob("*.png"))) == 4


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
    assert "cannot load a Stable Diffusion pipeline (OSError)" in err and "--local-dir" in err


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
        (["--device", "meta"], "--device meta cannot hold tensors"),
        (["--out", "im0.txt"], "im0.txt is a file; pass a folder for the run"),
    ],
)
def test_a_flag_of_the_wrong_type_or_range_is_one_line(flags, named, tmp_path, capsys):
    folder = caption_folder(tmp_path)
    if flags[0] == "--out":
        flags = ["--out", str(folder / flags[1])]
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


def test_16_bit_greyscale_is_scaled_to_8_bits_not_clipped(tmp_path):
    """A 16-bit PNG's values v become round(v / 257), its 8-bit equivalent (257 * 255 = 65535)."""
    k = np.arange(256).reshape(16, 16)
    Image.fromarray((257 * k).astype(np.uint16)).save(tmp_path / "g.png")
    assert Image.open(tmp_path / "g.png").mode == "I;16"
    expected = torch.from_numpy(k).float().expand(3, 16, 16) / 127.5 - 1
    assert torch.equal(T.load_image(tmp_path / "g.png", 16), expected)  # 16 px: no resampling
    older = Image.fromarray((257 * k).astype(np.int32))  # mode I: older Pillow's for 16-bit PNGs
    assert np.array_equal(T.rgb8(older), np.repeat(k[..., None].astype(np.uint8), 3, axis=-1))


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
