"""Inputs from elsewhere: a shared checkpoint runs no code, its training entries are checked before
--resume uses them, config.json is read through the typed Config, image sizes are bounded, and
generated damaged files give one line and exit code 2 at every entry point (ambient.py,
baselines.py, conditional.py, repro_gpu.py train, eval_memorization.py; repro_cpu.py's run reading
and onset's stage folders), writing nothing. FUZZ_EXAMPLES=500 runs the fuzz longer."""

import functools
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays
from PIL import Image, ImageFile

import ambient as A
import baselines
import conditional
import eval_memorization as E
import repro_cpu
import repro_gpu

TINY = "--data demo --n 16 --preset tiny --resolution 8 --batch 8 --samples 4 --iters 1".split()
TINY += ["--device", "cpu"]
TRAINERS = {  # each entry point that trains, with the flags that make its config valid
    "ambient": A.main,
    "baselines": lambda argv: baselines.main(argv + ["--method", "masking", "--mask-p", "0.4"]),
    "conditional": conditional.main,
    "repro_gpu": lambda argv: repro_gpu.main(["train"] + argv),
}
FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", 12)),
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


def files_in(folder):
    return {p: p.lstat().st_mtime_ns for p in Path(folder).rglob("*")}


def one_line(main, argv, capsys, folder):
    """main(argv) exits with code 2 and one line on stderr, and writes nothing under folder."""
    before = files_in(folder)
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert files_in(folder) == before, err
    return err


# ---------------------------------------------------------------------------------------------
# A checkpoint is loaded as weights only: a pickled callable is refused and never runs
# ---------------------------------------------------------------------------------------------
class Planted:
    """Unpickling this calls os.system: what full unpickling (weights_only=False) would run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def run_folder(folder, config, checkpoint):
    """A run folder as ambient.py writes it: config.json, indices.json, 4 samples, checkpoint.pt."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config.saved()))
    (folder / "indices.json").write_text(json.dumps(list(range(16))))
    np.savez(folder / "samples.npz", images=np.zeros((4, 8, 8, 3), np.uint8))
    torch.save(checkpoint, folder / "checkpoint.pt")
    return folder


def config_of(argv, kind=A.Config):
    cfg = kind(**vars(A.build_parser(kind).parse_args(argv)))
    cfg.check()
    return cfg


def eval_outputs(tmp):
    """eval_memorization.py's pixel-only flags, writing only under tmp."""
    folders = ["--out", str(tmp / "out"), "--cache-dir", str(tmp / "cache")]
    return ["--pixels-only", *folders, "--device", "cpu"]


def eval_argv(run, tmp):
    return [str(run), "--train", "demo", "--samples", "6"] + eval_outputs(tmp)


@pytest.mark.parametrize(
    "entry", ["ambient", "baselines", "conditional", "repro_gpu", "eval", "repro_cpu"]
)
def test_a_checkpoint_holding_a_pickled_callable_is_refused_and_the_callable_never_runs(
    entry, tmp_path, capsys, monkeypatch
):
    marker = tmp_path / "ran"
    Planted(marker).__reduce__()[0]("true")  # the call itself works here: only the loading stops it
    kind = dict(
        baselines=baselines.Config, conditional=conditional.Config, repro_gpu=repro_gpu.Config
    )
    extra = ["--method", "masking", "--mask-p", "0.4"] if entry == "baselines" else []
    cfg = config_of(TINY + extra, kind.get(entry, A.Config))
    net = A.Denoiser(8, "tiny").state_dict()
    run = run_folder(tmp_path / "r", cfg, dict(net=net, ema=net, step=0, planted=Planted(marker)))
    if entry == "repro_cpu":  # it reads the runs it trained, in runs/cpu
        monkeypatch.setattr(repro_cpu, "RUNS", tmp_path)
        with pytest.raises(A.UserError, match="not a checkpoint this project wrote"):
            repro_cpu.load_run("r")
    elif entry == "eval":
        assert "not a checkpoint this project wrote" in one_line(
            E.main, eval_argv(run, tmp_path), capsys, tmp_path
        )
    else:
        err = one_line(TRAINERS[entry], TINY + ["--out", str(run), "--resume"], capsys, tmp_path)
        assert "not a checkpoint this project wrote" in err and "could run code" in err
    assert not marker.exists()


def onset_stage(runs, checkpoint, **files):
    """repro_cpu.py onset's first stage of DDPM at n = 16 under runs: config.json, metrics.json,
    samples.npz, checkpoint.pt, and `files` (name: bytes) written over them."""
    stage = runs / "onset" / "n16-ddpm" / "0008k"
    run_folder(stage, config_of(TINY), checkpoint)
    metrics = {"copy_rate": 0.5, "cosine_above_0.95": 0.25, "roughness_vs_train": 1.0}
    (stage / "metrics.json").write_text(json.dumps(metrics))
    for name, content in files.items():
        write(stage / name, content)
    return stage


ONSET_DATA = functools.cache(repro_cpu.data)  # the bundled images at 8x8, prepared once


def onset_no_train(runs, capsys, monkeypatch, argv=()):
    """repro_cpu.py onset --no-train over runs: exit 2, one line, nothing written; the line."""
    monkeypatch.setattr(repro_cpu, "RUNS", runs)
    monkeypatch.setattr(repro_cpu, "data", ONSET_DATA)
    monkeypatch.setattr(repro_cpu, "FIGS", runs / "figures")
    return one_line(repro_cpu.main, ["onset", "--no-train", *argv], capsys, runs)


def test_onset_refuses_a_stage_checkpoint_holding_a_pickled_callable_which_never_runs(
    tmp_path, capsys, monkeypatch
):
    marker = tmp_path / "ran"
    net = A.Denoiser(8, "tiny").state_dict()
    onset_stage(tmp_path, dict(ema=net, planted=Planted(marker)))
    assert "not a checkpoint this project wrote" in onset_no_train(tmp_path, capsys, monkeypatch)
    assert not marker.exists()


def test_the_projects_own_checkpoints_load_as_weights_only(tmp_path):
    """Everything a checkpoint holds (state dicts, step, RNG states, config, S_tn, masks) is a
    tensor or a plain value: --resume and eval read it with weights_only=True."""
    cfg = config_of(
        TINY + ["--method", "masking", "--mask-p", "0.4", "--iters", "0"], baselines.Config
    )
    method = baselines.Masking(cfg)
    S = A.prepare(np.load(A.DEMO_FILE)["images"][:16], 8)
    method.use_data(S)
    net = method.network()
    state = A.training_state(net, cfg, S[0].numel())
    A.train(method, state, cfg, tmp_path, log=lambda m: None)
    saved = A.load_checkpoint(
        tmp_path / "checkpoint.pt", need={**A.RESUME_KEYS, "masks": torch.Tensor}
    )
    assert saved["config"] == cfg.saved() and torch.equal(saved["masks"], method.masks)
    A.training_state(method.network(), cfg, S[0].numel(), saved)  # --resume's use of it


# ---------------------------------------------------------------------------------------------
# Every training entry of a checkpoint is checked before --resume uses it
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A run of one step: its checkpoint holds Adam's step and moments for every parameter."""
    run = tmp_path_factory.mktemp("trained") / "r"
    A.main(TINY + ["--samples", "1", "--out", str(run)])
    return run


def with_entry(saved, path, value):
    """A copy of saved with the entry at path (keys, e.g. ("opt", "state", 0, "exp_avg")) set to
    value, or to value(the entry) if value is a function; only the containers on the path are
    copied."""
    if not path:
        return value(saved) if callable(value) else value
    copied = dict(enumerate(saved)) if isinstance(saved, list) else dict(saved)
    copied[path[0]] = with_entry(copied.get(path[0]), path[1:], value)
    return list(copied.values()) if isinstance(saved, list) else copied


@pytest.fixture(scope="module")
def trained_checkpoint(trained_run):
    return A.load_checkpoint(trained_run / "checkpoint.pt", need=A.RESUME_KEYS)


RANDOM_BYTES = torch.from_numpy(np.random.default_rng(0).integers(0, 256, 5056, np.uint8))
RANDOM_STATE = "a uint8 tensor of shape (5056,), not a cpu generator's state"
EXP_AVG = ("opt", "state", 0, "exp_avg")


@pytest.mark.parametrize(
    "path, value, named",
    [
        (EXP_AVG, torch.zeros(7), "opt state of parameter 0 exp_avg"),  # fused Adam segfaulted
        (EXP_AVG, lambda m: m.long(), "opt state of parameter 0 exp_avg is a int64 tensor"),
        (EXP_AVG, lambda m: m / 0, "opt state of parameter 0 exp_avg is a float32 tensor"),
        (
            ("opt", "state", 0, "exp_avg_sq"),
            lambda m: -1 - m,
            "opt state of parameter 0 exp_avg_sq is a float32",
        ),
        (("opt", "state", 0, "step"), torch.tensor(-1.0), "opt state of parameter 0 step"),
        (
            ("opt", "state", 0),
            {"step": torch.tensor(1.0)},
            "opt state of parameter 0 holds ['step']",
        ),
        (("opt", "state", 999), {}, "opt state has an entry 999 for no parameter"),
        (("opt", "state"), [], "opt is dict"),  # opt.state as a list
        (("opt", "param_groups"), None, "opt is dict"),
        (("opt", "param_groups", 0, "betas"), (0.9,), "opt group 0 betas is tuple (0.9,)"),
        (("opt", "param_groups", 0, "eps"), float("nan"), "opt group 0 eps is float nan"),
        (("opt", "param_groups", 0, "lr"), "abc", "opt group 0 lr is str 'abc'"),
        (("opt", "param_groups", 0, "lr"), float("inf"), "opt group 0 lr is float inf"),
        (("opt", "param_groups", 0, "fused"), "yes", "opt group 0 fused is str 'yes'"),
        (("opt", "param_groups", 0, "params"), [0, 1], "opt group 0 params is list [0, 1]"),
        (("step",), -5, "step is int -5, not an integer from 0"),  # trained from -5, exit 0
        (("dropout_rng",), 0.5, "dropout_rng is float 0.5, not a cpu generator's state"),
        (("dropout_rng",), 3, "dropout_rng is int 3"),
        (("dropout_rng",), RANDOM_BYTES, f"dropout_rng is {RANDOM_STATE} (Invalid mt19937"),
        (("rng",), RANDOM_BYTES, f"rng is {RANDOM_STATE} (Invalid mt19937"),
        (("rng",), torch.zeros(16, dtype=torch.uint8), "rng is a uint8 tensor of shape (16,), not"),
    ],
)
def test_a_damaged_training_entry_of_a_checkpoint_is_one_line_naming_it(
    path, value, named, trained_checkpoint
):
    saved = with_entry(trained_checkpoint, path, value)
    opt = A.make_optimizer(A.Denoiser(8, "tiny").parameters(), config_of(TINY), 3 * 8 * 8)
    with pytest.raises(A.UserError) as e:
        A.check_training_entries(
            saved, opt, dict(rng=torch.Generator(), dropout_rng=torch.Generator())
        )
    message = str(e.value)
    assert message.startswith(f"--resume: the checkpoint's {named}")
    assert message.endswith(f"; {A.RESUME_FIX}") and "\n" not in message


@pytest.mark.parametrize(
    "path, value", [(EXP_AVG, torch.zeros(7)), (("step",), -5)]
)  # a segmentation fault (exit 139) and training from step -5 (exit 0) before the check
def test_resume_from_a_damaged_entry_exits_2_with_one_line_writing_nothing(
    path, value, trained_run, tmp_path, capsys
):
    run = tmp_path / "r"
    shutil.copytree(trained_run, run)
    saved = torch.load(run / "checkpoint.pt", weights_only=True)
    torch.save(with_entry(saved, path, value), run / "checkpoint.pt")
    err = one_line(A.main, TINY + ["--iters", "2", "--out", str(run), "--resume"], capsys, tmp_path)
    assert "--resume: the checkpoint's" in err


def test_the_entry_check_passes_the_projects_own_checkpoint_and_resume_continues(
    trained_checkpoint,
):
    saved = with_entry(trained_checkpoint, (), dict)
    assert saved["step"] == 1 and len(saved["opt"]["state"]) == len(saved["net"])
    cfg = config_of(TINY)
    state = A.training_state(A.Denoiser(8, "tiny"), cfg, 3 * 8 * 8, saved)
    assert state.step == 1 and torch.equal(state.gen.get_state(), saved["rng"])


# ---------------------------------------------------------------------------------------------
# config.json through the typed Config
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change, named",
    [
        (dict(steps="forty"), "steps 'forty' is not an integer"),
        (dict(sampler="rk4"), "sampler 'rk4' is not one of heun, euler"),
        (dict(sigma_tn=float("nan")), "sigma_tn nan is not a number"),
        (
            dict(resolution=10**30),
            "resolution 1000000000000000000000000000000 is not an integer below 2^31",
        ),
        (dict(flip="yes"), "flip 'yes' is not true or false"),
        (dict(n=True), "n True is not an integer"),
        (dict(batch=0), "--batch 0 must be at least 1"),
        (dict(data=None), "it has no data"),
        (dict(resolution=None), "it has no resolution"),
    ],
)
def test_a_bad_setting_in_config_json_is_one_line_naming_key_and_file(change, named, tmp_path):
    saved = {**config_of(TINY).saved(), **change}
    with pytest.raises(A.UserError) as e:
        A.Config.from_saved(saved, tmp_path / "config.json")
    assert str(e.value).startswith(f"{tmp_path / 'config.json'}: {named}")


def test_config_json_keys_missing_take_the_legacy_or_default_and_unknown_ones_are_left_out():
    saved = {
        "data": "demo",
        "resolution": 8,
        "steps": 18,
        "num_classes": 10,
    }  # num_classes: conditional.py's
    cfg = A.Config.from_saved(saved)
    assert (cfg.steps, cfg.sampler, cfg.ambient_weight, cfg.sigma_tn) == (18, "heun", "x0", 0.4)
    assert isinstance(
        A.Config.from_saved({**saved, "sigma_tn": 1}).sigma_tn, float
    )  # JSON's 1 for 1.0


@pytest.mark.parametrize(
    "name, text, named",
    [
        ("config.json", json.dumps({**config_of(TINY).saved(), "steps": "forty"}), "steps 'forty'"),
        (
            "indices.json",
            "[3, -1]",
            "not a list of image numbers",
        ),  # numpy would take -1 from the end
        ("indices.json", "[800]", "within the 800 images"),
        ("indices.json", '{"0": 1}', "not a list"),
    ],
)
def test_a_hand_edited_run_file_stops_eval_with_one_line_naming_it(
    name, text, named, tmp_path, capsys
):
    run = run_folder(tmp_path / "r", config_of(TINY), {"step": 0})
    (run / name).write_text(text)
    err = one_line(E.main, eval_argv(run, tmp_path), capsys, tmp_path)
    assert str(run / name) in err and named in err


# ---------------------------------------------------------------------------------------------
# Image sizes: a bounded default resolution, PIL's bomb check, a memory estimate before reading
# ---------------------------------------------------------------------------------------------
def test_images_larger_than_the_presets_need_an_explicit_resolution_and_the_named_one_fits():
    for preset in A.PRESETS:
        cfg = A.Config(preset=preset)
        A.check_resolution(cfg, np.zeros((1, A.DEFAULT_MAX, A.DEFAULT_MAX, 3), np.uint8))
        assert cfg.resolution == A.DEFAULT_MAX  # up to the bound, the images' own side
        big = np.zeros((1, 1000, 1000, 3), np.uint8)
        with pytest.raises(A.UserError, match=r"pass --resolution (\d+)") as e:
            A.check_resolution(A.Config(preset=preset), big)
        named = A.Config(
            preset=preset, resolution=int(e.value.args[0].split("--resolution ")[1].split()[0])
        )
        A.check_resolution(named, big)  # the fix it names works


def no_decoding(monkeypatch):
    """Reading any image's or .npz's pixels fails the test: PIL decodes in load()."""
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda *a: pytest.fail("decoded"))
    monkeypatch.setattr(np.lib.npyio.NpzFile, "__getitem__", lambda *a: pytest.fail("read"))


def test_a_decompression_bomb_is_one_error_before_any_pixel_is_decoded(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "a.png")
    monkeypatch.setattr(
        Image, "MAX_IMAGE_PIXELS", 200
    )  # 256 pixels: PIL warns (past 200), errs only past 400
    no_decoding(monkeypatch)
    with pytest.raises(A.UserError, match="decompression-bomb"):
        A.load_images(str(tmp_path))


def test_images_that_would_not_fit_in_memory_are_refused_from_their_headers(tmp_path, monkeypatch):
    for i in range(2):
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / f"{i}.png")
    np.savez(tmp_path / "d.npz", images=np.zeros((2, 16, 16, 3), np.uint8))
    need = A.memory_needed((2, 16, 16, 3))
    monkeypatch.setattr(A, "available_memory", lambda: need - 1)  # one byte short
    no_decoding(monkeypatch)
    for spec in (tmp_path, tmp_path / "d.npz"):
        with pytest.raises(A.UserError, match="GB of pixels"):
            A.load_images(str(spec))
    monkeypatch.undo()
    monkeypatch.setattr(A, "available_memory", lambda: need)
    assert A.load_images(str(tmp_path))[0].shape == (2, 16, 16, 3)


def test_the_memory_estimate_bounds_the_measured_peak_of_reading_and_preparing_images(tmp_path):
    """Issue 26 row 3 in small: two 3000x3000 images trained at 16x16 (it was 10x the pixels while
    5x was allowed). The peak resident memory of reading and preparing them, in a fresh process,
    lies between the estimate's allocations and the estimate (they plus MEMORY_SLACK)."""
    shape = (2, 3000, 3000, 3)
    np.savez(tmp_path / "d.npz", images=np.zeros(shape, np.uint8))
    script = (  # VmHWM: this process's peak (ru_maxrss would start from pytest's at the fork)
        "import sys; sys.path.insert(0, sys.argv[1]); import ambient as A\n"
        "def kb(key): return next(int(l.split()[1]) for l in open('/proc/self/status') "
        "if l.startswith(key))\n"
        "rss = kb('VmRSS')\n"
        "cfg = A.Config(data=sys.argv[2], preset='tiny', resolution=16)\n"
        "images, rows = A.Algorithm1(cfg).training_set()\n"
        "A.prepare(images, cfg.resolution, rows)\n"
        "print((kb('VmHWM') - rss) * 1024)\n"
    )
    here = str(Path(__file__).parent)
    run = subprocess.run(
        [sys.executable, "-c", script, here, str(tmp_path / "d.npz")],
        capture_output=True,
        text=True,
        check=True,
    )
    peak = int(run.stdout)
    estimate = A.memory_needed(shape, 16)
    assert estimate - A.MEMORY_SLACK <= peak <= estimate, (peak, estimate)


def test_images_over_64_px_without_resolution_are_refused_from_their_headers(
    tmp_path, capsys, monkeypatch
):
    """Issue 26 row 4: the refusal came after decoding every image."""
    (tmp_path / "folder").mkdir()
    for i in range(2):
        Image.fromarray(np.zeros((80, 80, 3), np.uint8)).save(tmp_path / "folder" / f"{i}.png")
    np.savez(tmp_path / "d.npz", images=np.zeros((2, 80, 80, 3), np.uint8))
    no_decoding(monkeypatch)
    for data in (tmp_path / "folder", tmp_path / "d.npz"):
        argv = ["--data", str(data), "--preset", "tiny", "--device", "cpu"]
        err = one_line(A.main, argv + ["--out", str(tmp_path / "r")], capsys, tmp_path)
        assert "the images are 80x80, larger than the 64x64" in err and "--resolution 64" in err


def test_images_smaller_than_the_preset_needs_are_refused_with_a_fix_that_exists(tmp_path, capsys):
    """Issue 26 row 15: a 1-pixel image was offered "--resolution 0"."""
    for side in (1, 2):
        np.savez(tmp_path / "d.npz", images=np.zeros((4, side, side, 3), np.uint8))
        for resolution in ([], ["--resolution", str(side)]):
            argv = ["--data", str(tmp_path / "d.npz"), "--preset", "tiny", *resolution]
            err = one_line(A.main, argv + ["--out", str(tmp_path / "r")], capsys, tmp_path)
            assert f"are {side}x{side}; preset tiny needs 4x4 or larger images" in err
            assert "--resolution 0" not in err


@pytest.mark.parametrize("resolution", [None, 8, 16])
def test_prepare_a_chunk_at_a_time_equals_the_whole_batch_bit_for_bit(resolution, monkeypatch):
    """prepare's chunks give the numbers and memory layout of converting and area-downsampling
    the whole batch at once (the form it had before): both steps act on each image alone."""
    images = np.load(A.DEMO_FILE)["images"][:7, :16, :16]
    rows = np.array([6, 0, 3, 3, 1])
    whole = torch.from_numpy(images[rows]).permute(0, 3, 1, 2).float() / 127.5 - 1
    if resolution and resolution != 16:
        whole = F.interpolate(whole, size=(resolution, resolution), mode="area")
    monkeypatch.setattr(A, "PREPARE_CHUNK", 2 * images[0].nbytes)  # chunks of 2, 2 and 1 images
    chunked = A.prepare(images, resolution, rows)
    assert torch.equal(chunked, whole) and chunked.stride() == whole.stride()


# ---------------------------------------------------------------------------------------------
# Generated damaged inputs at every entry point
# ---------------------------------------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
float_arrays = arrays(
    st.sampled_from([np.float32, np.float64]),
    array_shapes(min_dims=0, max_dims=5, max_side=4),
    elements=st.floats(allow_nan=True, allow_infinity=True, width=32),
)
other_arrays = arrays(
    st.sampled_from([np.uint8, np.int16, np.bool_, np.complex64]),
    array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=4),
)
bad_images = (float_arrays | other_arrays).filter(  # not uint8 N x H x W x 3 with sides of 1 to 4
    lambda a: not (a.dtype == np.uint8 and a.ndim == 4 and a.shape[-1] == 3 and 0 not in a.shape)
)
bad_labels = (float_arrays | other_arrays).filter(
    lambda a: not (a.dtype.kind in "iu" and a.shape == (4,) and a.min() >= 0)
)


@st.composite
def damaged_file(draw, intact):
    """(bytes, or None for a symlink to nowhere) made from a file's intact bytes."""
    how = draw(st.sampled_from(["truncated", "random", "empty", "dangling"]))
    if how == "truncated":
        return intact[: draw(st.integers(0, len(intact) - 1))]
    return (
        draw(st.binary(min_size=1, max_size=300))
        if how == "random"
        else b""
        if how == "empty"
        else None
    )


def write(path, content):
    path.unlink(missing_ok=True)
    if content is None:
        path.symlink_to(path.with_name("nowhere"))
    else:
        path.write_bytes(content)


def npz_bytes(**arrays_):
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(Path(tmp) / "a.npz", **arrays_)
        return (Path(tmp) / "a.npz").read_bytes()


GOOD_NPZ = npz_bytes(images=np.zeros((4, 8, 8, 3), np.uint8), labels=np.arange(4))
datasets = st.one_of(
    damaged_file(GOOD_NPZ),
    st.builds(
        lambda a: npz_bytes(images=a), bad_images
    ),  # wrong dtype or shape, NaN, inf, no image
    st.builds(lambda a: npz_bytes(images=np.zeros((4, 8, 8, 3), np.uint8), labels=a), bad_labels),
    st.builds(lambda a: npz_bytes(pictures=a), other_arrays),
)
GOOD_PNG = tempfile.SpooledTemporaryFile()
Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), np.uint8)).save(
    GOOD_PNG, "png"
)
GOOD_PNG.seek(0)
PNG_PIXELS_CUT = GOOD_PNG.read()[:-30]  # without the tail (IEND, checksums) that PIL can do without


@FUZZ
@given(kind=st.sampled_from(["npz", "png"]), data=st.data())
@example(kind="empty folder", data=None)
def test_damaged_training_data_gives_one_line_at_every_entry_point(kind, data, capsys):
    """--data: a damaged .npz, or a folder whose one .png is damaged; eval: the same, as samples or
    as --train."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "data").mkdir()
        if kind != "empty folder":
            file = tmp / "data" / "x.png" if kind == "png" else tmp / "d.npz"
            write(
                file,
                data.draw(damaged_file(PNG_PIXELS_CUT) | datasets if kind == "png" else datasets),
            )
        spec = str(tmp / "d.npz" if kind == "npz" else tmp / "data")
        np.savez(tmp / "good.npz", images=np.zeros((4, 8, 8, 3), np.uint8))
        for main in TRAINERS.values():
            one_line(main, TINY[2:] + ["--data", spec, "--out", str(tmp / "r")], capsys, tmp)
        common = eval_outputs(tmp)
        one_line(E.main, [spec, "--train", "demo"] + common, capsys, tmp)
        one_line(E.main, [str(tmp / "good.npz"), "--train", spec] + common, capsys, tmp)


def torch_bytes(obj):
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(obj, Path(tmp) / "c.pt")
        return (Path(tmp) / "c.pt").read_bytes()


BASE = config_of(TINY).saved()
json_bytes = st.builds(
    lambda v: json.dumps(v).encode(), json_values
)  # any JSON at all, NaN included
RUN_DAMAGE = {  # what each file of a run folder may become
    "config.json": st.one_of(
        damaged_file(json.dumps(BASE).encode()),
        json_bytes,
        st.builds(  # one key changed or added
            lambda k, v: json.dumps({**BASE, k: v}).encode(),
            st.sampled_from(sorted(BASE)) | st.text(max_size=6),
            json_values,
        ),
    ),
    "indices.json": damaged_file(json.dumps(list(range(16))).encode()) | json_bytes,
    "samples.npz": datasets,
    "checkpoint.pt": damaged_file(torch_bytes({"step": 0}))
    | st.builds(lambda a: torch_bytes(dict(ema=dict(w=torch.from_numpy(a)))), float_arrays),
}


@FUZZ
@given(name=st.sampled_from(sorted(RUN_DAMAGE)), data=st.data())
@example(name="config.json", data=b"[" * 100_000).via("JSON nested beyond Python's recursion limit")
def test_a_damaged_run_folder_gives_one_line_when_resumed_or_scored(name, data, capsys):
    """One of a run folder's files damaged; its checkpoint holds no weights, so that whatever else
    passes, --resume and eval stop at it rather than train or score."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run = run_folder(tmp / "r", config_of(TINY), {"step": 0})
        write(run / name, data if isinstance(data, bytes) else data.draw(RUN_DAMAGE[name]))
        for main in TRAINERS.values():
            one_line(main, TINY + ["--out", str(run), "--resume"], capsys, tmp)
        one_line(E.main, eval_argv(run, tmp), capsys, tmp)


# ---------------------------------------------------------------------------------------------
# repro_cpu.py onset's stage folders: each damaged file is one line and exit 2
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_ema():
    return A.Denoiser(8, "tiny").state_dict()


SCORE = {"copy": 0.5, "c95": 0.25, "rough": 1.0, "loss": {f"{s:g}": 1.0 for s in repro_cpu.SIGMAS}}


@pytest.mark.parametrize(
    "files, named",
    [
        (dict(truncated=True), "checkpoint.pt is damaged"),
        (dict(wrong_shape=True), "checkpoint.pt: its EMA weights do not fit the network"),
        ({"score.json": b'{"copy": 0.5, '}, "cannot read"),
        ({"score.json": json.dumps({**SCORE, "c95": "x"}).encode()}, "no finite number c95"),
        ({"score.json": json.dumps({**SCORE, "loss": {}}).encode()}, "loss has no finite number"),
        ({"metrics.json": b"{}"}, "metrics.json has no finite number copy_rate"),
        ({"config.json": b"[]"}, "config.json holds [], not a JSON object of settings"),
    ],
)
def test_a_damaged_onset_stage_is_one_line_naming_the_file(
    files, named, tiny_ema, tmp_path, capsys, monkeypatch
):
    ema = dict(tiny_ema)
    if files.pop("wrong_shape", False):
        ema["net.conv_in.weight"] = torch.zeros(1)
    checkpoint = torch_bytes(dict(ema=ema))
    if files.pop("truncated", False):
        files["checkpoint.pt"] = checkpoint[: len(checkpoint) // 2]
    stage = onset_stage(tmp_path / "runs", dict(ema=ema), **files)
    err = onset_no_train(tmp_path / "runs", capsys, monkeypatch)
    assert str(stage) in err and named in err


def test_an_onset_judge_without_features_is_one_line_before_anything_is_scored(
    tmp_path, capsys, monkeypatch
):
    (tmp_path / "judge").mkdir()
    (tmp_path / "judge" / "judge.py").write_text(
        "def load_judge(path):\n    return None\n\n\nfrechet = nn_cosine = load_judge\n"
    )
    (tmp_path / "data").mkdir()
    np.savez(tmp_path / "data" / repro_cpu.JUDGE_REF, images=np.zeros((4, 8, 8, 3), np.uint8))
    (tmp_path / "runs").mkdir()
    argv = ["--judge", str(tmp_path / "judge")]
    err = onset_no_train(tmp_path / "runs", capsys, monkeypatch, argv)
    assert "judge.py has no function features" in err


def test_a_failed_onset_stage_is_one_line_naming_its_log_and_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(repro_cpu, "RUNS", tmp_path)
    fails = [sys.executable, "-c", "raise SystemExit(3)"]
    monkeypatch.setattr(repro_cpu, "onset_command", lambda *args: fails)
    monkeypatch.setattr(repro_cpu.time, "sleep", lambda seconds: None)
    with pytest.raises(SystemExit) as e:
        repro_cpu.main(["onset", "--parallel", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert "failed (exit code 3)" in err and "0008k/stdout.txt" in err


METRICS = {"copy_rate": 0.5, "cosine_above_0.95": 0.25, "roughness_vs_train": 1.0}
ONSET_DAMAGE = {  # a stage's files that onset reads, and what each may become
    "config.json": RUN_DAMAGE["config.json"],
    "checkpoint.pt": RUN_DAMAGE["checkpoint.pt"],
    # a dangling metrics.json is a stage not run, a correct result
    "metrics.json": st.one_of(
        damaged_file(json.dumps(METRICS).encode()).filter(lambda b: b is not None),
        json_bytes,
        st.builds(
            lambda k, v: json.dumps({**METRICS, k: v}).encode(),
            st.sampled_from(sorted(METRICS)),
            json_values,
        ),
    ),
    "score.json": damaged_file(json.dumps(SCORE).encode()) | json_bytes,
}


@FUZZ
@given(name=st.sampled_from(sorted(ONSET_DAMAGE)), data=st.data())
def test_a_damaged_onset_stage_folder_gives_one_line(name, data, capsys):
    """One file of an onset stage damaged; its checkpoint holds no weights, so that whatever else
    passes, onset stops at it rather than score."""
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as monkeypatch:
        stage = onset_stage(Path(tmp), {"step": 0})
        write(stage / name, data.draw(ONSET_DAMAGE[name]))
        onset_no_train(Path(tmp), capsys, monkeypatch)
