"""Facts about eval_memorization.py: identities, closed forms, and behaviour users rely on.

Run with `make test`. Random-init networks of the real architectures and small generated data:
nothing is downloaded.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import ambient as A
import eval_memorization as E
import feature_networks as N


# =============================================================================================
# eval_memorization.py: Frechet distance, nearest neighbours, feature pipelines, caches, weights
# =============================================================================================


def test_frechet_distance_matches_gaussian_closed_forms():
    g = np.random.default_rng(20)
    mu1, mu2 = g.normal(size=5), g.normal(size=5)
    a, b = g.uniform(0.1, 2, 5), g.uniform(0.1, 2, 5)  # commuting (diagonal) covariances
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert E.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(
        expected, rel=1e-12
    )
    # non-commuting 2x2: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)) for M = C1 C2 with positive
    # eigenvalues
    C1, C2 = np.array([[2.0, 0.7], [0.7, 0.5]]), np.array([[0.3, -0.2], [-0.2, 1.4]])
    tr_root = np.sqrt(np.trace(C1 @ C2) + 2 * np.sqrt(np.linalg.det(C1) * np.linalg.det(C2)))
    expected = ((mu1[:2] - mu2[:2]) ** 2).sum() + np.trace(C1) + np.trace(C2) - 2 * tr_root
    assert E.frechet_distance(mu1[:2], C1, mu2[:2], C2) == pytest.approx(expected, rel=1e-12)
    # symmetric
    assert E.frechet_distance(mu2[:2], C2, mu1[:2], C1) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_of_a_set_with_itself_is_zero_even_when_rank_deficient():
    # 10 samples in 64 dims: singular covariance
    feats = np.random.default_rng(21).normal(size=(10, 64)) * 3 + 1
    mu, cov = E.statistics(feats)
    assert np.linalg.matrix_rank(cov) == 9
    assert abs(E.frechet_distance(mu, cov, mu, cov)) < 1e-9 * np.trace(cov)
    other = E.statistics(feats + 0.5)  # a pure shift: the distance is exactly |shift|^2
    assert E.frechet_distance(mu, cov, *other) == pytest.approx(64 * 0.25, rel=1e-9)
    # the n x n route for n < d
    assert abs(E.frechet_distance_to(feats, mu, cov)) < 1e-9 * np.trace(cov)
    ref = E.statistics(np.random.default_rng(26).normal(size=(100, 64)))
    assert E.frechet_distance_to(feats, *ref) == pytest.approx(
        E.frechet_distance(mu, cov, *ref), rel=1e-9
    )


def test_top1_similarity_finds_planted_copies_and_thresholds_count_them():
    g = np.random.default_rng(22)
    train = g.normal(size=(200, 64))
    planted = [3, 99, 150]
    # cosine ignores the scale of an embedding
    copies = train[planted] * np.array([[0.5], [2.0], [7.0]])
    samples = np.concatenate([copies, g.normal(size=(20, 64))])
    sims, idx = E.top1_cosine(samples, train, chunk=7)
    assert idx[:3].tolist() == planted and np.allclose(sims[:3], 1, atol=1e-12)
    assert (sims[3:] < 0.85).all()  # independent directions in 64 dims have cosine ~ N(0, 1/64)
    summary = E.similarity_summary(sims, E.DEFAULT_THRESHOLDS)
    assert all(summary[f"similarity_above_{th:g}"] == 3 / 23 for th in (0.9, 0.925, 0.95))
    assert summary["similarity_median"] == np.median(sims) and summary[
        "similarity_mean"
    ] == pytest.approx(sims.mean())
    assert E.thresholds_for("data/ffhq-64x64.npz") == (0.85, 0.875, 0.9) and E.thresholds_for(
        "cifar"
    ) == (0.9, 0.925, 0.95)


def test_dinov2_recipe_pads_by_reflection_and_pipeline_batches_consistently():
    x = torch.rand(7, 3, 32, 32) * 2 - 1
    padded = N.dinov2_input(x)
    assert padded.shape == (7, 3, 42, 42)  # 32 -> the next multiple of 14, centred: 5 + 32 + 5
    assert torch.equal(padded[..., 5:37, 5:37], (x + 1) / 2)  # [0, 1], no ImageNet normalisation
    assert torch.equal(padded[..., 5:37, 4], padded[..., 5:37, 6]) and torch.equal(
        padded[..., 35, :], padded[..., 37, :]
    )
    net = N.dinov2_network("vits14")
    forward = N.dinov2_forward(net)
    feats = E.features(forward, x, batch=3, device="cpu")
    assert feats.shape == (7, 384) and feats.dtype == np.float64
    # batching changes nothing
    assert np.allclose(feats, E.features(forward, x, batch=7, device="cpu"), atol=1e-5)
    sims, idx = E.top1_cosine(feats[[4, 1]], feats)  # an image is its own nearest neighbour
    assert idx.tolist() == [4, 1] and np.allclose(sims, 1, atol=1e-6)
    inception = E.features(
        N.inception_forward(N.inception_network(None)), x[:2], batch=2, device="cpu"
    )
    # pool3 features of pytorch-fid's FID Inception-v3 at any input size
    assert inception.shape == (2, 2048)


def test_cache_files_round_trip_and_a_changed_key_misses(tmp_path):
    key = ["cifar", 32, "dinov2", "vits14", [1, 5, 9]]
    arrays = {"mu": np.random.default_rng(23).normal(size=4), "cov": np.eye(4) * 0.3}
    path = E.cache_path(tmp_path, "ref", key)
    E.save_cache(path, key, **arrays)
    loaded = E.load_cache(path, key)
    assert set(loaded) == {"mu", "cov"} and all(
        np.array_equal(loaded[k], arrays[k]) for k in arrays
    )
    # another training subset is another file's business
    assert E.load_cache(path, key[:-1] + [[1, 5]]) is None
    assert E.cache_path(tmp_path, "ref", key[:-1] + [[1, 5]]) != path
    calls = []

    def compute():
        calls.append(1)
        return arrays

    E.cached(tmp_path, "ref", key, compute, log=lambda m: None)
    # served from the file, no temp left
    assert calls == [] and not list(tmp_path.glob("*.tmp.npz"))


def eval_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        E.main(argv)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and err.startswith("error: ")
    return err


def fake_run(folder, data_file, indices, samples, sigma_tn=0.0, resolution=16):
    """A run folder as ambient.py writes it, with a tiny untrained checkpoint to generate from."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(
        json.dumps(
            dict(
                data=str(data_file),
                data_dir="data",
                n=len(indices),
                seed=0,
                sigma_tn=sigma_tn,
                preset="tiny",
                resolution=resolution,
                steps=2,
            )
        )
    )
    (folder / "indices.json").write_text(json.dumps(indices))
    np.savez(folder / "samples.npz", images=samples)
    torch.save({"ema": A.Denoiser(resolution, "tiny").state_dict()}, folder / "checkpoint.pt")
    return folder


def test_missing_weights_fall_back_to_pixel_metrics_or_give_one_clear_line(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv(N.WEIGHTS_ENV, str(tmp_path / "weights"))
    data = (np.random.default_rng(24).random((10, 16, 16, 3)) * 255).astype(np.uint8)
    np.savez(tmp_path / "data.npz", images=data)
    run = fake_run(
        tmp_path / "ddpm",
        tmp_path / "data.npz",
        [0, 2, 4, 6],
        np.concatenate([data[[2, 6]], data[[1, 3]]]),
    )
    out = tmp_path / "out"
    common = [
        str(run),
        "--no-download",
        "--out",
        str(out),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--device",
        "cpu",
    ]
    # 6 > the 4 in samples.npz: 6 are generated from the checkpoint
    E.main(common + ["--samples", "6"])
    report = json.loads((out / "report.json").read_text())["runs"]["ddpm"]
    assert report["fid"] is None and report["fd_dinov2"] is None and report["samples"] == 6
    assert (
        N.INCEPTION_FILE in report["fid_unavailable"]
        and N.INCEPTION_URL in report["fid_unavailable"]
    )
    # dgm-eval's
    assert (
        str(tmp_path / "weights" / "dinov2_vitl14_pretrain.pth") in report["fd_dinov2_unavailable"]
    )
    # the paper's
    assert (
        str(tmp_path / "weights" / "dinov2_vitg14_pretrain.pth") in report["similarity_unavailable"]
    )
    assert report["similarity_space"].startswith("pixels")
    printed = capsys.readouterr().out
    assert "pixel fallback, not DINOv2" in printed and "| FID (Inception-v3) | n/a |" in printed
    generated = A.prepare(np.load(run / "eval-samples-6.npz")["images"])
    pixel, _ = A.memorization_report(generated, A.prepare(data[[0, 2, 4, 6]]))
    assert report["pixel_copy_rate"] == pixel["copy_rate"] and report[
        "similarity_mean"
    ] == pytest.approx(pixel["cosine_mean"])
    for png in ("similarity_histogram.png", "pareto.png", "memorized_ddpm.png"):
        assert (out / png).stat().st_size > 0
    err = eval_error(common + ["--require-weights"], capsys)
    assert (
        N.INCEPTION_FILE in err
        and str(tmp_path / "torch" / "hub" / "checkpoints") in err
        and N.INCEPTION_URL in err
    )
    assert "does not exist" in eval_error(
        common + ["--dinov2-weights", str(tmp_path / "nope.pth")], capsys
    )
    torch.save({"not": torch.zeros(1)}, tmp_path / "bad.pth")
    assert "not a DINOv2 vitb14 state dict" in eval_error(
        common + ["--dinov2", "vitb14", "--dinov2-weights", str(tmp_path / "bad.pth")], capsys
    )
    assert "--train" in eval_error([str(tmp_path / "data.npz"), "--no-download"], capsys)


def test_weights_in_the_env_folder_give_fid_fd_dinov2_and_dinov2_copies(
    tmp_path, capsys, monkeypatch
):
    """The whole offline path with random weights of the real architectures under their real file
    names."""
    from unittest import mock
    import torchvision
    from pytorch_fid import inception as pf

    weights = tmp_path / "weights"
    weights.mkdir()
    # pytorch-fid's raw Inception3 (the layout of the released file), random weights kept
    built = []
    with (
        mock.patch.object(pf, "load_state_dict_from_url", lambda *a, **k: None),
        mock.patch.object(
            torchvision.models.Inception3,
            "load_state_dict",
            lambda self, *a, **k: built.append(self),
        ),
    ):
        pf.fid_inception_v3()
    torch.save(built[0].state_dict(), weights / N.INCEPTION_FILE)
    torch.save(N.DINOv2("vits14").state_dict(), weights / N.dinov2_file("vits14"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv(N.WEIGHTS_ENV, str(weights))
    data = (np.random.default_rng(25).random((6, 16, 16, 3)) * 255).astype(np.uint8)
    np.savez(tmp_path / "data.npz", images=data)
    run = fake_run(
        tmp_path / "ambient-0.4",
        tmp_path / "data.npz",
        [1, 3, 5],
        np.concatenate([data[[5, 1]], data[[0, 2]]]),
        0.4,
    )
    out = tmp_path / "out"
    E.main(
        [
            str(run),
            "--dinov2",
            "vits14",
            "--fd-dinov2",
            "vits14",
            "--no-download",
            "--out",
            str(out),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--device",
            "cpu",
            "--batch",
            "4",
        ]
    )
    saved = json.loads((out / "report.json").read_text())
    report = saved["runs"]["ambient-0.4"]
    assert saved["inception_weights"] == str(weights / N.INCEPTION_FILE)
    assert saved["dinov2_weights"] == str(weights / "dinov2_vits14_pretrain.pth")
    assert (
        np.isfinite(report["fid"]) and report["fid"] >= -1e-6 and np.isfinite(report["fd_dinov2"])
    )
    # 2 copies of 4
    assert (
        report["similarity_space"] == "DINOv2 vits14 CLS" and report["similarity_above_0.95"] >= 0.5
    )
    assert report["pixel_copy_rate"] == 0.5
    assert {p.name.split("-")[0] for p in (tmp_path / "cache").glob("*.npz")} == {
        "inception",
        "dinov2",
    }
    # two reference statistics, one set of training features
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 3
    assert "| FD_DINOv2 |" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Which recipe reaches which network, through the command line
# ---------------------------------------------------------------------------------------------
class Recorder(torch.nn.Module):
    """Stands in for a network: keeps every input and returns 12 features that depend on it."""

    def __init__(self):
        super().__init__()
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.clone())
        return self.features(x)

    @staticmethod
    def features(x):
        return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)


def test_fid_gets_the_tf1_input_fd_dinov2_the_dgm_eval_input_and_similarity_the_papers(
    tmp_path, monkeypatch
):
    weights = tmp_path / "weights"
    weights.mkdir()
    for name in (N.INCEPTION_FILE, N.dinov2_file("vitl14"), N.dinov2_file("vitg14")):
        (weights / name).touch()  # found by name; the recorders below stand in for their networks
    nets = {"inception": Recorder(), "vitl14": Recorder(), "vitg14": Recorder()}
    monkeypatch.setattr(E, "inception_network", lambda path: nets["inception"])
    monkeypatch.setattr(E, "dinov2_network", lambda size, path: nets[size])
    monkeypatch.setenv(N.WEIGHTS_ENV, str(weights))
    data = (np.random.default_rng(27).random((6, 16, 16, 3)) * 255).astype(np.uint8)
    data[0] = [10, 128, 250]  # one flat colour: every resize keeps it
    # noise in 64..191: bicubic's negative lobes overshoot that range, bilinear cannot
    data[1] = 64 + data[1] // 2
    np.savez(tmp_path / "data.npz", images=data)
    run = fake_run(tmp_path / "run", tmp_path / "data.npz", [0, 2, 4], data[[0, 1, 2, 3]])
    E.main(
        [
            str(run),
            "--no-download",
            "--out",
            str(tmp_path / "out"),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--device",
            "cpu",
        ]
    )
    report = json.loads((tmp_path / "out" / "report.json").read_text())["runs"]["run"]
    reference, samples = (torch.from_numpy(d).permute(0, 3, 1, 2).float() for d in (data, data[:4]))

    fid_ref, fid_gen = nets[
        "inception"
    ].inputs  # EDM: uint8 values, TF1 resize to 299, (v - 128) / 128
    assert torch.allclose(
        fid_gen, (N.resize_bilinear_tf1(samples, (299, 299)) - 128) / 128, atol=1e-6
    )
    assert torch.allclose(
        fid_ref, (N.resize_bilinear_tf1(reference, (299, 299)) - 128) / 128, atol=1e-6
    )

    fd_ref, fd_gen = nets["vitl14"].inputs  # dgm-eval: 224 x 224, ImageNet mean and std
    mean, std = (
        torch.tensor(N.IMAGENET_MEAN).view(3, 1, 1),
        torch.tensor(N.IMAGENET_STD).view(3, 1, 1),
    )
    assert fd_gen.shape == (4, 3, 224, 224) and fd_ref.shape == (6, 3, 224, 224)
    assert torch.allclose(
        fd_gen[0], ((torch.tensor([10.0, 128, 250]) / 255).view(3, 1, 1) - mean) / std, atol=1e-6
    )
    pixels = (fd_gen * std + mean) * 255
    # PIL's bicubic hands back uint8 images
    assert torch.allclose(pixels, pixels.round(), atol=1e-3)
    assert pixels[1].min() < 63.5 or pixels[1].max() > 191.5
    expected = E.frechet_distance_to(
        Recorder.features(fd_gen).double().numpy(),
        *E.statistics(Recorder.features(fd_ref).double().numpy()),
    )
    # the CLS as returned, not L2-normalised
    assert report["fd_dinov2"] == pytest.approx(expected, rel=1e-9)

    sim_train, sim_gen = nets[
        "vitg14"
    ].inputs  # the paper: [0, 1], reflect-padded 16 -> 28, nothing else
    assert sim_gen.shape == (4, 3, 28, 28) and sim_train.shape == (3, 3, 28, 28)
    assert torch.allclose(sim_gen[..., 6:22, 6:22], samples / 255, atol=1e-6)
    assert torch.allclose(sim_train[..., 6:22, 6:22], reference[[0, 2, 4]] / 255, atol=1e-6)
    sims, _ = E.top1_cosine(
        Recorder.features(sim_gen).double().numpy(), Recorder.features(sim_train).double().numpy()
    )
    assert report["similarity_mean"] == pytest.approx(sims.mean(), rel=1e-9)
    assert np.allclose(
        np.load(tmp_path / "out" / "per_sample_run.npz")["similarity"], sims, rtol=1e-12
    )
    assert "ViT-L/14" in report["fd_dinov2_recipe"] and "ViT-g/14" in report["similarity_recipe"]
    assert "TF1" in report["fid_recipe"]
    gen_feats, ref_feats = (Recorder.features(x).double().numpy() for x in (fid_gen, fid_ref))
    kid = E.kid(gen_feats, ref_feats)
    assert report["kid"] == pytest.approx(kid["kid"], rel=1e-9) and report["kid_subset_size"] == 4
    pr = E.precision_recall(gen_feats, ref_feats)
    assert (report["precision"], report["recall"]) == (pr["precision"], pr["recall"])


# ---------------------------------------------------------------------------------------------
# KID: polynomial kernel (x.y / d + 1)^3, unbiased MMD^2, mean and std over subsets
# ---------------------------------------------------------------------------------------------
def test_kid_of_two_points_each_is_the_hand_computed_unbiased_mmd():
    """d = 2, X = {(0,0), (2,0)}, Y = {(0,2), (2,2)}: k = (x.y / 2 + 1)^3 is 1 for x.y = 0 and 27
    for x.y = 4. Within X (off the diagonal) 1, within Y 27, across 1, 1, 1, 27:
    MMD_u^2 = (2 + 54) / 2 - 2 * 30 / 4 = 13. (The biased estimate, diagonals k = 1, 27 and 27, 125
    included, would be 30/4 + 206/4 - 15 = 44.)"""
    X, Y = np.array([[0.0, 0.0], [2.0, 0.0]]), np.array([[0.0, 2.0], [2.0, 2.0]])
    result = E.kid(X, Y)  # 2 samples < 1000: subsets of 2, every one the whole set
    assert result["kid"] == pytest.approx(13, rel=1e-12) and result["kid_std"] == pytest.approx(
        0, abs=1e-12
    )
    assert result["kid_subset_size"] == 2 and result["kid_subsets"] == 100
    # one set against itself: 2 (S - m tr K) / (m^2 (m - 1)) with S = 30, tr K = 28, m = 2,
    # so -13, not 0
    assert E.kid(X, X)["kid"] == pytest.approx(-13, rel=1e-12)


def test_kid_of_two_point_masses_is_their_kernel_distance_at_any_subset_size():
    """All x = a and all y = b: every subset gives k(a, a) + k(b, b) - 2 k(a, b) = 8 + 8 - 0 for
    a = -b = (1, 1, 1, 1)."""
    a = np.ones((7, 4))
    result = E.kid(a, -a[:5], subsets=10, subset_size=3)
    assert result["kid"] == pytest.approx(16, rel=1e-12) and result["kid_subset_size"] == 3
    # fewer samples than 1000: the smaller set's size
    assert E.kid(a, -a[:5])["kid_subset_size"] == 5
    assert E.kid(a[:1], a)["kid"] is None  # one sample has no pair to leave out


# ---------------------------------------------------------------------------------------------
# Run folders are self-contained: their training set is found from any working folder
# ---------------------------------------------------------------------------------------------
def test_a_run_is_scored_from_another_folder_and_a_lost_training_set_gives_one_line(
    tmp_path, capsys, monkeypatch
):
    """ambient.py ran in project/main with --data ../shared/d.npz (older runs keep it as typed)."""
    data = (np.random.default_rng(28).random((8, 16, 16, 3)) * 255).astype(np.uint8)
    (tmp_path / "project" / "shared").mkdir(parents=True)
    np.savez(tmp_path / "project" / "shared" / "d.npz", images=data)
    run = fake_run(
        tmp_path / "project" / "main" / "runs" / "r",
        "../shared/d.npz",
        [0, 2, 4],
        data[[0, 2, 5, 7]],
    )
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    common = [str(run), "--pixels-only", "--out", "out", "--cache-dir", "cache", "--device", "cpu"]

    def copy_rate(*extra):
        E.main(common + list(extra))
        return json.loads(Path("out/report.json").read_text())["runs"]["r"]["pixel_copy_rate"]

    # samples 0 and 2 are its training images 0 and 2 of d.npz, 5 and 7 are not
    assert copy_rate() == 0.5
    # its images 0, 2, 4 are d.npz's 5, 7, 0: three of the four samples
    other = tmp_path / "other.npz"
    np.savez(other, images=data[[5, 1, 7, 3, 0, 6, 2, 4]])
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "data_path": str(other)}))
    assert copy_rate() == 0.75  # data_path, the absolute path newer runs record, comes first
    (run / "config.json").write_text(
        json.dumps(
            {**config, "data": "../shared/lost.npz", "data_path": str(tmp_path / "lost.npz")}
        )
    )
    err = eval_error(common, capsys)
    assert "../shared/lost.npz" in err and "--train PATH" in err
    # --train stands in for the training set the run names
    assert copy_rate("--train", str(other)) == 0.75


def test_per_sample_file_gives_each_samples_neighbour_in_the_subset_and_in_the_dataset(tmp_path):
    data = (np.random.default_rng(29).random((8, 16, 16, 3)) * 255).astype(np.uint8)
    np.savez(tmp_path / "d.npz", images=data)
    # copies of dataset images 6 and 1
    run = fake_run(tmp_path / "r", tmp_path / "d.npz", [1, 4, 6], data[[6, 1, 3]])
    E.main(
        [
            str(run),
            "--pixels-only",
            "--out",
            str(tmp_path / "out"),
            "--cache-dir",
            str(tmp_path / "c"),
            "--device",
            "cpu",
        ]
    )
    f = np.load(tmp_path / "out" / "per_sample_r.npz")
    assert f["nearest_train"][:2].tolist() == [2, 0] and f["nearest_dataset"][:2].tolist() == [6, 1]
    assert f["pixel_nearest_train"][:2].tolist() == [2, 0] and f["pixel_nearest_dataset"][
        :2
    ].tolist() == [6, 1]
    assert np.allclose(f["similarity"][:2], 1, atol=1e-6) and f["pixel_d1_d2"][:2].tolist() == [
        0,
        0,
    ]
    # the third sample is no training image
    assert f["pixel_d1_d2"][2] > 1 / 3 and f["similarity"].shape == (3,)
    assert str(f["similarity_space"]).startswith("pixels")
    assert f["nearest_dataset"][2] == [1, 4, 6][f["nearest_train"][2]]


# ---------------------------------------------------------------------------------------------
# Bad inputs: one line, exit code 2, before (and without) any note about weights
# ---------------------------------------------------------------------------------------------
def test_bad_inputs_give_one_line_and_no_weight_notes_while_good_ones_get_one_line_notes(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv(N.WEIGHTS_ENV, str(tmp_path / "weights"))  # no weights anywhere
    data = (np.random.default_rng(30).random((6, 16, 16, 3)) * 255).astype(np.uint8)
    np.savez(tmp_path / "data.npz", images=data)
    run = fake_run(tmp_path / "run", tmp_path / "data.npz", [0, 1, 2], data[[3, 4]])
    common = [
        "--no-download",
        "--out",
        str(tmp_path / "out"),
        "--cache-dir",
        str(tmp_path / "c"),
        "--device",
        "cpu",
    ]

    def only_error(*argv):
        with pytest.raises(SystemExit) as e:
            E.main(list(argv) + common)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
        return err

    checkpoint, intact = run / "checkpoint.pt", (run / "checkpoint.pt").read_bytes()
    # truncated, then empty: 5 samples need it, samples.npz has 2
    for damaged in (intact[: len(intact) // 2], b""):
        checkpoint.write_bytes(damaged)
        err = only_error(str(run), "--samples", "5")
        assert str(checkpoint) in err and "damaged" in err and "--samples 2" in err
    checkpoint.write_bytes(intact)
    (tmp_path / "empty").mkdir()
    assert "is empty" in only_error(str(tmp_path / "empty"))
    (run / "config.json").rename(tmp_path / "config.json")
    err = only_error(str(run))
    assert "checkpoint.pt" in err and "no config.json" in err
    (tmp_path / "config.json").rename(run / "config.json")
    (run / "samples.npz").rename(tmp_path / "samples.npz")
    (run / "samples.npz").write_bytes(b"not an archive")
    assert "cannot read" in only_error(str(run)) and "samples.npz" in only_error(str(run))
    (tmp_path / "samples.npz").replace(run / "samples.npz")
    E.main([str(run)] + common)
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    # Inception, two DINOv2 files: one short line each
    assert len(notes) == 3 and all(len(n) < 200 for n in notes)


def test_samples_drawn_afresh_use_the_runs_sampler_and_steps_or_heun_with_40(tmp_path, monkeypatch):
    calls = []

    # records the call; sampling is ambient.py's business
    def sample(h_theta, x, steps, sampler, sigma_stop=0.0):
        calls.append(dict(steps=steps, sampler=sampler))
        return torch.zeros_like(x)

    monkeypatch.setattr(A, "sample", sample)
    data = (np.random.default_rng(31).random((4, 16, 16, 3)) * 255).astype(np.uint8)
    np.savez(tmp_path / "d.npz", images=data)
    # config: steps 2, no sampler
    run = fake_run(tmp_path / "r", tmp_path / "d.npz", [0, 1], data[:1])
    common = [
        "--pixels-only",
        "--out",
        str(tmp_path / "out"),
        "--cache-dir",
        str(tmp_path / "c"),
        "--device",
        "cpu",
    ]
    E.main([str(run), "--samples", "3"] + common)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "sampler": "euler", "steps": 18}))
    E.main([str(run), "--samples", "4"] + common)
    del config["steps"]
    (run / "config.json").write_text(json.dumps(config))
    E.main([str(run), "--samples", "5"] + common)
    assert [(c["sampler"], c["steps"]) for c in calls] == [("heun", 2), ("euler", 18), ("heun", 40)]
    assert np.load(run / "eval-samples-5.npz")["images"].shape == (5, 16, 16, 3)


# ---------------------------------------------------------------------------------------------
# Precision and recall (Kynkaanniemi et al. 2019): k-NN manifolds of the two feature sets
# ---------------------------------------------------------------------------------------------
def test_precision_and_recall_count_points_inside_the_other_sets_knn_balls():
    """1-D, k = 3. Reference {0, 1, 2, 3, 10}: distances to the 3rd nearest other point 3, 2, 2, 3,
    9. Generated {0.5, -2.5, 20, 30}: 0.5 (0.5 from 0) and -2.5 (2.5 from 0) are inside, 20 and 30
    (10 and 20 from 10) are not: precision 1/2 (with k = 2, radius 2 at 0, -2.5 would fall out).
    Generated radii: 29.5, 32.5, 22.5, 32.5; every reference point lies within 29.5 of 0.5:
    recall 1."""
    ref, gen = np.array([[0.0], [1], [2], [3], [10]]), np.array([[0.5], [-2.5], [20], [30]])
    result = E.precision_recall(gen, ref)
    assert result["precision"] == 0.5 and result["recall"] == 1.0
    swapped = E.precision_recall(ref, gen)  # the roles swap: precision and recall swap
    assert swapped["precision"] == 1.0 and swapped["recall"] == 0.5
    # radii 0.3, 0.2, 0.2, 0.3
    far = E.precision_recall(np.array([[100.0], [100.1], [100.2], [100.3]]), ref)
    assert far["precision"] == 0 and far["recall"] == 0
    # 3 points have no 3rd neighbour besides themselves
    assert E.precision_recall(gen[:3], ref)["precision"] is None


def test_the_report_has_a_legend_and_flags_samples_as_rough_as_noise(tmp_path, capsys):
    """A copy rate of 0 from a model that learned nothing must not read as success: the table says
    which direction is better, carries the roughness of the samples, and names the run whose samples
    are noise."""
    smooth = np.repeat(
        np.repeat((np.random.default_rng(40).random((6, 4, 4, 3)) * 255).astype(np.uint8), 4, 1),
        4,
        2,
    )
    # 16x16 images made of 4x4 blocks: little pixel-to-pixel change
    np.savez(tmp_path / "d.npz", images=smooth)
    noise = (np.random.default_rng(41).random((4, 16, 16, 3)) * 255).astype(np.uint8)
    runs = [
        fake_run(tmp_path / "copies", tmp_path / "d.npz", [0, 1, 2], smooth[[0, 1, 2, 0]]),
        fake_run(tmp_path / "noise", tmp_path / "d.npz", [0, 1, 2], noise),
    ]
    E.main(
        [str(r) for r in runs]
        + ["--pixels-only", "--out", str(tmp_path / "out"), "--device", "cpu"]
    )
    table = capsys.readouterr().out
    rows = json.loads((tmp_path / "out" / "report.json").read_text())["runs"]
    assert (
        rows["copies"]["roughness_vs_train"] == pytest.approx(1.0, abs=0.3)
        and rows["noise"]["roughness_vs_train"] > 1.5
    )
    assert "| roughness vs training images |" in table and "lower = fewer copies" in table
    assert "noise: the samples are" in table and "copies: the samples are" not in table


# =============================================================================================
# The held-out denoising loss: an offline quality row beside the copy rates
# =============================================================================================
def test_heldout_loss_of_an_untrained_network_is_its_hand_computed_value_beside_measured_rows(
    tmp_path, capsys, monkeypatch
):
    """A fresh network outputs c_skip x exactly (its last layer is zero), x = x_0 + sigma z in EDM
    units, so its held-out loss at sigma is lambda mean |c_skip (x_0 + sigma z) - x_0|^2 over the
    test images and the 4 fixed draws z (seed 0). --pixels-only shows only measured rows and names
    the rest in one note line."""
    real = E.heldout_images  # the demo's 200 test images; the first 8 keep the test fast
    monkeypatch.setattr(E, "heldout_images", lambda *args: (real(*args)[0][:8], None))
    samples = np.load(A.DEMO_FILE)["images"][:4, ::4, ::4]
    run = fake_run(tmp_path / "fresh", "demo", [0, 1, 2, 3], samples, resolution=8)
    E.main([str(run), "--pixels-only", "--out", str(tmp_path / "out"), "--device", "cpu"])
    table = capsys.readouterr().out
    row = json.loads((tmp_path / "out" / "report.json").read_text())["runs"]["fresh"]
    x0 = A.prepare(np.load(A.DEMO_FILE)["test_images"][:8], 8).double().repeat(4, 1, 1, 1)
    z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)).double()
    s_d = A.SIGMA_DATA
    for sigma in E.HELDOUT_SIGMAS:
        c_skip, weight = s_d**2 / (sigma**2 + s_d**2), (sigma**2 + s_d**2) / (sigma * s_d) ** 2
        by_hand = weight * (c_skip * (x0 + sigma * z) - x0).square().mean().item()
        assert row["heldout_loss_per_sigma"][f"{sigma:g}"] == pytest.approx(by_hand, rel=1e-4)
    assert row["heldout_loss"] == pytest.approx(
        np.mean(list(row["heldout_loss_per_sigma"].values()))
    )
    assert "| held-out denoising loss, 10 levels |" in table and "n/a" not in table
    notes = [line for line in table.splitlines() if "not measured" in line]
    assert notes == [
        "- not measured: FID, KID, precision and recall, FD_DINOv2, DINOv2 similarity "
        "(--pixels-only)"
    ]


def test_the_empirical_denoiser_has_no_loss_on_its_own_images_at_low_noise_and_some_on_others():
    """Eq. 3's exact minimiser on the training set S returns the nearest image of S at low noise:
    zero loss on S, and a loss on held-out images, which it cannot return."""
    f = np.load(A.DEMO_FILE)
    S, test = A.prepare(f["images"][:16], 8).double(), A.prepare(f["test_images"][:16], 8).double()
    h = E.empirical_denoiser(S)
    assert E.weighted_loss(h, S, 0.05, 4) < 1e-6 < 0.1 < E.weighted_loss(h, test, 0.05, 4)


def test_a_run_without_held_out_images_says_why_the_loss_is_not_measured(tmp_path, capsys):
    data = (np.random.default_rng(26).random((4, 8, 8, 3)) * 255).astype(np.uint8)
    np.savez(tmp_path / "d.npz", images=data)
    run = fake_run(tmp_path / "r", tmp_path / "d.npz", [0, 1], data[:2], resolution=8)
    E.main([str(run), "--pixels-only", "--out", str(tmp_path / "out"), "--device", "cpu"])
    table = capsys.readouterr().out
    assert "held-out denoising loss" not in table
    assert f"held-out loss (no held-out images for --data {tmp_path / 'd.npz'}" in table
