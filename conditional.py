"""Class-conditional Algorithm 1 for Table 1's ImageNet rows, built on ambient.py's pieces.

    python conditional.py --data images.npz --n-per-class 5 --sigma-tn 0.4 [ambient.py's flags]
    python conditional.py --data demo --n-per-class 2 --guidance 2 --preset tiny --device cpu

A learned vector per class joins the network's noise embedding; one more index means "no class".
Training replaces a share --label-dropout of the labels by it, so that one network is both the
conditional and the unconditional model, and sampling can mix them with classifier-free guidance
(Ho & Salimans 2022), h_u + w (h_c - h_u). Samples cycle through the classes. --n-per-class draws
k images of every class, as Table 1's ImageNet rows do (5 or 15). The data needs labels: cifar,
demo, or an .npz with an int array 'labels'.
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

import ambient as A
from ambient import UserError, option


@dataclass
class Config(A.Config):
    n_per_class: int = option(
        None,
        "train on a seeded random k images of every class instead of --n (Table 1's "
        "ImageNet rows: 5 or 15)",
        type=int,
        same_run=True,
    )
    label_dropout: float = option(
        0.1,
        "share of training labels replaced by 'no class', the unconditional model "
        "that guidance needs",
        same_run=True,
    )
    guidance: float = option(
        1.0,
        "classifier-free guidance weight w in h_u + w (h_c - h_u); 1 = plain "
        "conditional, 0 = unconditional",
    )
    num_classes: int = 0  # not a flag: the run fills in the dataset's class count

    def check(self):
        if self.n is not None and self.n_per_class is not None:
            raise UserError("pass --n or --n-per-class, not both")
        if self.n_per_class is not None and self.n_per_class < 1:
            raise UserError(f"--n-per-class {self.n_per_class} must be at least 1")
        if not 0 <= self.label_dropout < 1:
            raise UserError(f"--label-dropout {self.label_dropout} must be in [0, 1)")
        super().check()


def choose_per_class(labels, per_class, seed):
    """A seeded random `per_class` images of every class, as indices into the dataset."""
    classes, counts = np.unique(labels, return_counts=True)
    if counts.min() < per_class:
        raise UserError(
            f"--n-per-class {per_class}: class {classes[counts.argmin()]} has only {counts.min()} "
            f"images; pass --n-per-class {counts.min()} or less"
        )
    rng = np.random.default_rng(seed)
    return np.sort(
        np.concatenate(
            [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in classes]
        )
    )


class ClassDenoiser(A.Denoiser):
    """h_theta(x_t, sigma_t, labels): the class's learned vector joins the noise embedding; index
    num_classes means "no class", the unconditional model that guidance needs."""

    def __init__(self, resolution=32, preset="tiny", num_classes=10, **overrides):
        super().__init__(resolution, preset, **overrides)
        self.num_classes = num_classes
        self.net.label_embed = nn.Embedding(num_classes + 1, 4 * self.net.channels)

    def forward(self, x_t, sigma_t, labels=None):
        labels = (
            torch.full((len(x_t),), self.num_classes, device=x_t.device)
            if labels is None
            else labels
        )
        return super().forward(x_t, sigma_t, self.net.label_embed(labels))


def with_labels(b, labels, null_label, label_dropout, gen):
    """Each sample's class, or "no class" with probability label_dropout."""
    drop = torch.rand(len(b["idx"]), generator=gen, device=labels.device) < label_dropout
    b["labels"] = torch.where(drop, null_label, labels[b["idx"]])
    return b


def conditioned(h_theta, labels, guidance=1.0):
    """h_theta(x_t, sigma_t) for these classes: the conditional and unconditional predictions mixed
    as h_u + w (h_c - h_u); w = 1 is plain conditional."""
    null = torch.full_like(labels, h_theta.num_classes)

    def h(x_t, sigma_t):
        cond = h_theta(x_t, sigma_t, labels)
        if guidance == 1:
            return cond
        uncond = h_theta(x_t, sigma_t, null)
        return uncond + guidance * (cond - uncond)

    return h


class ClassConditional(A.Algorithm1):
    name, denoiser = "class-conditional algorithm1", ClassDenoiser

    def training_set(self):
        cfg = self.cfg
        images, self.all_labels = A.load_images(cfg.data, cfg.data_dir, cfg)
        if self.all_labels is None or len(self.all_labels) != len(images):
            raise UserError(
                f"conditional.py needs one class label per image and --data {cfg.data} has "
                f"{'none' if self.all_labels is None else len(self.all_labels)} for {len(images)} "
                "images; use cifar, demo or an .npz with an int array 'labels'"
            )
        cfg.num_classes = int(self.all_labels.max()) + 1
        self.indices = (
            choose_per_class(self.all_labels, cfg.n_per_class, cfg.seed)
            if cfg.n_per_class
            else A.choose_subset(len(images), cfg.n, cfg.seed)
        )
        return images, self.indices

    def network(self):
        return super().network(num_classes=self.cfg.num_classes)

    def use_data(self, S, saved=None):
        super().use_data(S, saved)
        self.labels = torch.from_numpy(self.all_labels[self.indices]).to(S.device)

    def batch(self, gen):
        return with_labels(
            super().batch(gen), self.labels, self.cfg.num_classes, self.cfg.label_dropout, gen
        )

    def loss(self, h_theta, b):
        return A.algorithm1_loss(
            lambda x_t, sigma_t: h_theta(x_t, sigma_t, b["labels"]), b, self.cfg.ambient_weight
        )

    def sample_batch(self, h_theta, k, rows):
        """Batch k of Eq. 5's samples; sample number i has class i mod num_classes."""
        cfg, device = self.cfg, next(h_theta.parameters()).device
        labels = (torch.arange(rows.start, rows.stop) % cfg.num_classes).to(device)
        return A.sample(
            conditioned(h_theta, labels, cfg.guidance),
            self.noise(h_theta, k, rows),
            cfg.steps,
            cfg.sampler,
        )


def main(argv=None):
    return A.main(argv, Config, lambda cfg: A.run(cfg, ClassConditional(cfg)))


if __name__ == "__main__":
    main()
