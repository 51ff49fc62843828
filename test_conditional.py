"""Facts about conditional.py, class-conditional Algorithm 1 (Table 1's ImageNet rows): labels reach
the network, guidance mixes predictions as written, label dropout and per-class subsets have their
rates."""

import json

import numpy as np
import torch

import ambient as A
import conditional as C
import eval_memorization as E
from test_ambient import TINY, error_of, gen, plumbing_data


def test_class_labels_reach_the_network_and_guidance_mixes_predictions():
    h = C.ClassDenoiser(8, "tiny", num_classes=3)
    # the zero-initialised layers (residual branches, output) made non-trivial
    with torch.no_grad():
        for p in h.parameters():
            if not p.any():
                p.normal_(std=0.1, generator=gen(23))
    x_t, s = torch.randn(4, 3, 8, 8, generator=gen(21)), torch.full((4,), 0.7)
    labels, null = torch.tensor([0, 1, 2, 0]), torch.full((4,), 3)
    assert not torch.allclose(h(x_t, s, torch.zeros(4).long()), h(x_t, s, torch.ones(4).long()))
    cond, uncond = h(x_t, s, labels), h(x_t, s, null)
    assert torch.equal(C.conditioned(h, labels, 1.0)(x_t, s), cond)
    assert torch.equal(C.conditioned(h, labels, 0.0)(x_t, s), uncond)
    assert torch.allclose(C.conditioned(h, labels, 2.0)(x_t, s), 2 * cond - uncond, atol=1e-6)
    assert torch.equal(h(x_t, s), uncond)  # no labels = the "no class" label
    one, two = (
        A.sample(C.conditioned(h, torch.full((4,), c)), A.initial_noise((4, 3, 8, 8), 0), steps=4)
        for c in (0, 2)
    )
    assert not torch.allclose(one, two)  # the label changes the samples drawn from the same noise


def test_label_dropout_replaces_labels_at_its_rate():
    S, S_tn = plumbing_data()
    labels = torch.arange(16) % 10
    b = C.with_labels(A.algorithm1_batch(S, S_tn, 0.4, 20_000, gen(22)), labels, 10, 0.1, gen(23))
    dropped = b["labels"] == 10
    assert abs(dropped.float().mean().item() - 0.1) < 4 * (0.1 * 0.9 / 20_000) ** 0.5
    assert torch.equal(b["labels"][~dropped], labels[b["idx"]][~dropped])


def test_class_conditional_run_from_the_command_line(tmp_path, capsys):
    C.main(TINY + ["--iters", "2", "--guidance", "2", "--out", str(tmp_path / "r")])
    assert json.loads((tmp_path / "r" / "config.json").read_text())["num_classes"] == 10
    assert type(E.method_of_run(tmp_path / "r")) is C.ClassConditional
    # ambient.py's network has no class input
    resume = TINY + ["--iters", "3", "--resume", "--out", str(tmp_path / "r")]
    assert "holds another network" in error_of(resume, capsys)
    from PIL import Image

    for i in range(2):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / f"{i}.png")
    assert "needs one class label per image" in error_of(
        ["--data", str(tmp_path), "--preset", "tiny"], capsys, C.main
    )


def test_n_per_class_takes_k_images_of_every_class(capsys):
    labels = np.random.default_rng(0).integers(0, 5, 200)
    idx = C.choose_per_class(labels, 3, 7)
    assert (np.bincount(labels[idx], minlength=5) == 3).all() and (np.diff(idx) > 0).all()
    assert np.array_equal(idx, C.choose_per_class(labels, 3, 7))
    assert not np.array_equal(idx, C.choose_per_class(labels, 3, 8))
    assert "has only" in error_of(
        TINY[:2] + ["--n-per-class", "500", "--preset", "tiny", "--device", "cpu"], capsys, C.main
    )
    assert "not both" in error_of(TINY + ["--n-per-class", "2"], capsys, C.main)
