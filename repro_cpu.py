"""Produce the CPU tables and figures of NOTES.md ("Results"): the paper's phenomena at laptop
scale.

    python repro_cpu.py demo    # DDPM vs Algorithm 1 (sigma_tn = 1) under both loss weights,
                                # <= 10 min on 2 cores
    python repro_cpu.py sweep   # sigma_tn sweep, both weights: table + Pareto plot
                                # (the shape of the paper's Figure 2)
    python repro_cpu.py fig3    # Figure 3: denoised estimates at high noise
                                # + train/held-out loss gap
    python repro_cpu.py table2  # Table 2: Algorithm 1 against the noisy-only and masking
                                # baselines, 2 seeds
    python repro_cpu.py weights # per-sample gradient size just above sigma_tn under the two
                                # loss weights
    python repro_cpu.py onset [--judge ../shared/judge]  # copy rate and quality against images seen

Each command trains the runs it lacks with ambient.py, or baselines.py for Table 2's baselines
(the exact command lines are printed and logged), reuses finished ones, and writes a Markdown
table to runs/cpu/<command>.md and PNGs to figures/.
The protocol below was fixed on a pilot of the DDPM baseline only, before any Algorithm 1 run
(the pilot, the results and their reading: NOTES.md, Results). `sweep` needs matplotlib
(pip install matplotlib).
fig3 also prints closed-form optima and a "snapping" table, added after the first Algorithm 1
results to explain them; they change no protocol or metric.

Protocol. n = 16 images of the bundled CIFAR-10 subset (seeded choice), area-downsampled to 8x8, the
tiny preset (0.65M parameters), batch 64, lr 1e-3, ITERS iterations, EMA weights, 256 samples; all
else is ambient.py's default, the released method: the log-normal noise split, the released loss
weight (or --ambient-weight x0 where a run name ends in -x0), Adam, Heun-40 sampling. Until commit
828d68e the protocol sampled with 32 Euler steps and trained with AdamW and the x0 weight, then the
defaults.
Two runs train side by side with one thread each.

Measures (none needs downloaded weights):
  memorization  ambient.py's pixel report against the n training images: copy rate (share of samples
                with d1/d2 < 1/3) and the shares with centred cosine > 0.9 / 0.925 / 0.95.
  held-out loss EDM-weighted denoising error lambda(sigma) |h(x_t) - x_0|^2 on the 200 bundled test
                images at each sigma in SIGMAS (4 fixed noise draws per image), averaged over
                SIGMAS. It is the training objective evaluated on unseen images (with the ELBO's
                weighting its integral would bound the held-out negative log-likelihood), so it
                scores the fit to the data distribution rather than to the training set.
  FD 4x4        Frechet distance between 256 samples and the 200 test images on 4x4 area-downsampled
                pixels (48 numbers: layout and colour). Coarse, but estimable from 256 samples;
                two references bracket it: 256 random bundled training images (a perfect generator)
                and 256 draws from the n training images (a perfect copier).
"""

import argparse
import importlib.util
import json
import math
import os
import reprlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import ambient
from ambient import UserError
from eval_memorization import (
    HELDOUT_BANDS,
    HELDOUT_SIGMAS,
    ambient_optimal_denoiser,
    denoiser_of,
    ema_network,
    empirical_denoiser,
    heldout_band,
    first_line,
    heldout_losses,
    read_json,
    weighted_loss,
)

ROOT = Path(__file__).resolve().parent
RUNS, FIGS = ROOT / "runs" / "cpu", ROOT / "figures"
N, RES, ITERS, BATCH, SCHEDULE = 16, 8, 1000, 64, "edm"
COMMON = (
    f"--data demo --n {N} --preset tiny --resolution {RES} --iters {ITERS} --batch {BATCH} "
    f"--lr 1e-3 --schedule {SCHEDULE} --samples 256 --device cpu --seed 0 --log-every 250"
).split()
WEIGHTS = ("released", "x0")
DEMO_SIGMA_TN = 1.0
SWEEP = (0, 0.1, 0.2, 0.4, 1, 2, 4, 20)  # 20: above the paper's range, expected to be too high
SIGMAS = HELDOUT_SIGMAS  # EDM units, for the held-out loss (eval_memorization.py computes it)
FIG3_SIGMAS = (1, 2, 5, 10, 20)
# Table 2 at demo scale, fixed before its runs: the noisy-only baseline at Algorithm 1's sigma_tn,
# and masking with the defaults of Ambient Diffusion's released eval.py (p = 0.4, delta = 0.1).
MASK_P = 0.4
TABLE2 = (
    (0, "algorithm1", "released"),
    (DEMO_SIGMA_TN, "algorithm1", "released"),
    (DEMO_SIGMA_TN, "algorithm1", "x0"),
    (DEMO_SIGMA_TN, "noisy-only", "released"),
    (MASK_P, "masking", "released"),
)


def run_name(level, n=N, method="algorithm1", seed=0, weight="released"):
    """level: sigma_tn, or the mask probability p for --method masking."""
    kind = "ddpm" if level == 0 else f"{'ambient' if method == 'algorithm1' else method}-{level:g}"
    kind += "-x0" if weight == "x0" and level and method != "masking" else ""
    return (f"seed{seed}-" if seed else "") + (f"n{n}-" if n != N else "") + kind


def command(level, n=N, method="algorithm1", seed=0, weight="released"):
    args = list(COMMON)
    args[args.index("--n") + 1], args[args.index("--seed") + 1] = str(n), str(seed)
    args += (
        ["--mask-p", f"{level:g}"]
        if method == "masking"
        else ["--sigma-tn", f"{level:g}", "--ambient-weight", weight]
    )
    script = "ambient.py" if method == "algorithm1" else "baselines.py"
    args += [] if method == "algorithm1" else ["--method", method]
    out = (RUNS / run_name(level, n, method, seed, weight)).relative_to(ROOT)
    return [sys.executable, script, *args, "--out", str(out)]


def train_missing(jobs, parallel=2):
    """jobs: list of (level, n[, method, seed, weight]). Trains those without metrics.json,
    `parallel` at a time, one thread each."""
    todo = [j for j in jobs if not (RUNS / run_name(*j) / "metrics.json").exists()]
    env = {**os.environ, "OMP_NUM_THREADS": "1" if min(parallel, len(todo)) > 1 else "2"}
    (
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "33554432"),
        env.setdefault("MALLOC_TRIM_THRESHOLD_", "1073741824"),
    )
    RUNS.mkdir(parents=True, exist_ok=True)
    running = []
    while todo or running:
        while todo and len(running) < parallel:
            job = todo.pop(0)
            out = RUNS / run_name(*job)
            if (out / "checkpoint.pt").exists():  # an interrupted run: start it again from scratch
                for f in out.iterdir():
                    f.unlink()
            cmd = command(*job)
            print(
                "$ " + " ".join(Path(c).name if c == sys.executable else c for c in cmd), flush=True
            )
            out.mkdir(parents=True, exist_ok=True)
            running.append(
                (
                    subprocess.Popen(
                        cmd,
                        cwd=ROOT,
                        env=env,
                        stdout=open(out / "stdout.txt", "w"),
                        stderr=subprocess.STDOUT,
                    ),
                    time.time(),
                    out,
                )
            )
        time.sleep(2)
        for p in [r for r in running if r[0].poll() is not None]:
            running.remove(p)
            if p[0].returncode:
                raise UserError(failed(p[2], p[0].returncode))
            (p[2] / "wall_s.txt").write_text(f"{time.time() - p[1]:.0f}")
            print(f"done {p[2].name} in {time.time() - p[1]:.0f} s", flush=True)


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------
def failed(out, code):
    return f"{out} failed (exit code {code}): see {out / 'stdout.txt'}, then run this again"


def stage_network(folder):
    """A run's EMA network, built as its checked config.json says, weights loaded weights-only."""
    fix = f"delete {folder} to train it again"
    method, model = ema_network(
        folder, lambda: ambient.load_checkpoint(folder / "checkpoint.pt", fix=fix), fix
    )
    return model, method.cfg


def numbers(values, keys, file, fix):
    """values[key] for each key is a finite number (a JSON file's), or one line naming it."""
    for key in keys:
        v = values.get(key) if isinstance(values, dict) else None
        if type(v) not in (int, float) or not math.isfinite(v):
            raise UserError(
                f"{file} has no finite number {key} (it holds {reprlib.repr(v)}); {fix}"
            )
    return values


RUN_METRICS = ("copy_rate", "cosine_median", "ratio_median") + tuple(
    f"cosine_above_{t}" for t in ambient.COSINE_THRESHOLDS
)


def load_run(name, metrics=RUN_METRICS):
    """A run folder's EMA network, typed config and metrics.json, checked."""
    d = RUNS / name
    model, cfg = stage_network(d)
    fix = f"delete {d} to train it again"
    return model, cfg, numbers(read_json(d / "metrics.json", fix), metrics, d / "metrics.json", fix)


def data():
    """The bundled images at RES: all 800 training images, the n-image subset, the 200 test
    images."""
    f = np.load(ambient.DEMO_FILE)
    train_all = ambient.prepare(f["images"], RES)
    # the same seeded subset as ambient.py --n N --seed 0
    subset = ambient.choose_subset(len(train_all), N, 0)
    return train_all, train_all[subset], ambient.prepare(f["test_images"], RES)


def fd44(a, b):
    """Frechet distance of 4x4 area-downsampled pixels (48 features) between image sets in
    [-1, 1]."""
    from scipy import linalg

    fa, fb = (
        F.interpolate(x.float(), size=(4, 4), mode="area").flatten(1).double().numpy()
        for x in (a, b)
    )
    mu_a, mu_b, ca, cb = fa.mean(0), fb.mean(0), np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    covmean = linalg.sqrtm(ca @ cb).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca + cb - 2 * covmean))


def load_samples(folder):
    """A run's samples.npz, read by ambient's checked loader, in [-1, 1]."""
    return ambient.prepare(ambient.load_images(str(Path(folder) / "samples.npz"))[0])


def row(name, test):
    model, cfg, m = load_run(name)
    heldout = np.mean([weighted_loss(model, test, s, 4) for s in SIGMAS])
    wall = (
        (RUNS / name / "wall_s.txt").read_text() if (RUNS / name / "wall_s.txt").exists() else "?"
    )
    return dict(
        sigma_tn=cfg.sigma_tn,
        weight=cfg.ambient_weight,
        copy=m["copy_rate"],
        c90=m["cosine_above_0.9"],
        c925=m["cosine_above_0.925"],
        c95=m["cosine_above_0.95"],
        cmed=m["cosine_median"],
        rmed=m["ratio_median"],
        heldout=heldout,
        fd=fd44(load_samples(RUNS / name), test),
        wall=wall,
    )


def table(rows, train_all, subset, test):
    g = torch.Generator().manual_seed(0)
    ref_gen = fd44(train_all[torch.randperm(len(train_all), generator=g)[:256]], test)
    ref_copy = fd44(subset[torch.randint(len(subset), (256,), generator=g)], test)
    lines = [
        "| sigma_tn | weight | copy rate (d1/d2 < 1/3) | cos > 0.9 | cos > 0.925 | cos > 0.95 | "
        "cos median | d1/d2 median | held-out loss (lower better) | FD 4x4 (lower better) | "
        "wall s |",
        "|---" * 11 + "|",
    ]
    for r in rows:
        weight = "-" if r["sigma_tn"] == 0 else r["weight"]
        lines.append(
            f"| {r['sigma_tn']:g}{' (DDPM)' if r['sigma_tn'] == 0 else ''} | {weight} | "
            f"{r['copy']:.3f} | {r['c90']:.3f} | {r['c925']:.3f} | {r['c95']:.3f} | "
            f"{r['cmed']:.3f} | {r['rmed']:.3f} | {r['heldout']:.4f} | {r['fd']:.3f} | "
            f"{r['wall']} |"
        )
    lines.append(
        f"\nFD 4x4 references: 256 random bundled training images {ref_gen:.3f} "
        f"(a perfect generator); 256 draws from the {N} training images {ref_copy:.3f} "
        "(a perfect copier)."
    )
    return "\n".join(lines)


def write(name, text):
    RUNS.mkdir(parents=True, exist_ok=True)
    (RUNS / f"{name}.md").write_text(text + "\n")
    print(text)


# ------------------------------------------------------------------------------------------------
# Commands
# ------------------------------------------------------------------------------------------------
DEMO_JOBS = (
    (0, N),
    (DEMO_SIGMA_TN, N, "algorithm1", 0, "released"),
    (DEMO_SIGMA_TN, N, "algorithm1", 0, "x0"),
)


def demo(args):
    train_missing(DEMO_JOBS, args.parallel)
    train_all, subset, test = data()
    FIGS.mkdir(exist_ok=True)
    grids = []
    for job in DEMO_JOBS:
        grids.append(FIGS / f"cpu_neighbours_{run_name(*job)}.png")
        shutil.copy(RUNS / run_name(*job) / "neighbours.png", grids[-1])
    write(
        "demo",
        table([row(run_name(*job), test) for job in DEMO_JOBS], train_all, subset, test)
        + "\n\nNeighbour grids (each pair: sample left, nearest training image right): "
        + ", ".join(str(g.relative_to(ROOT)) for g in grids),
    )


def sweep(args):
    values = [float(v) for v in args.values.split(",")] if args.values else SWEEP
    jobs = [(v, N, "algorithm1", 0, w) for v in values for w in (WEIGHTS if v else WEIGHTS[:1])]
    train_missing(jobs, args.parallel)
    train_all, subset, test = data()
    rows = [row(run_name(*job), test) for job in jobs]
    per_level = [
        "| sigma_tn | weight | " + " | ".join(f"sigma={s:g}" for s in SIGMAS) + " |",
        "|---" * (len(SIGMAS) + 2) + "|",
    ]
    for job in jobs:
        model = load_run(run_name(*job))[0]
        per_level.append(
            f"| {job[0]:g} | {job[4] if job[0] else '-'} | "
            + " | ".join(f"{weighted_loss(model, test, s, 4):.3f}" for s in SIGMAS)
            + " |"
        )
    write(
        "sweep",
        table(rows, train_all, subset, test) + "\n\nHeld-out denoising loss per noise level "
        "(EDM sigma; the table's held-out loss is the mean of each row):\n\n"
        + "\n".join(per_level),
    )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    colour = {"released": "C0", "x0": "C2"}
    for ax, key, label in (
        (axes[0], "heldout", "held-out denoising loss"),
        (axes[1], "fd", "FD 4x4 vs test images"),
    ):
        for r in rows:
            ddpm = r["sigma_tn"] == 0
            ax.scatter(
                r["copy"],
                r[key],
                color="C3" if ddpm else colour[r["weight"]],
                label="DDPM" if ddpm else f"{r['weight']} weight",
            )
            ax.annotate(
                "DDPM" if ddpm else f"{r['sigma_tn']:g}",
                (r["copy"], r[key]),
                textcoords="offset points",
                xytext=(4, 3),
                fontsize=8,
            )
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=True))
        ax.legend(unique.values(), unique.keys(), fontsize=7)
        ax.set(
            xlabel="copy rate (share of samples with d1/d2 < 1/3)", ylabel=label + " (lower better)"
        )
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"sigma_tn sweep: {N} CIFAR-10 images at {RES}x{RES}, {ITERS} x {BATCH} images seen, "
        "tiny preset",
        fontsize=9,
    )
    fig.tight_layout()
    FIGS.mkdir(exist_ok=True)
    fig.savefig(FIGS / "cpu_sweep_pareto.png", dpi=90)
    print(f"wrote {FIGS / 'cpu_sweep_pareto.png'}")


def fig3(args):
    a1 = f"Algorithm 1 (sigma_tn={DEMO_SIGMA_TN:g}"
    models = [
        ((0, N), f"DDPM, {N} images"),
        ((DEMO_SIGMA_TN, N, "algorithm1", 0, "released"), f"{a1}, released weight)"),
        ((DEMO_SIGMA_TN, N, "algorithm1", 0, "x0"), f"{a1}, x0 weight)"),
        ((0, 800), "DDPM, 800 images"),
    ]
    train_missing([job for job, _ in models], args.parallel)
    train_all, subset, test = data()
    nets = [load_run(run_name(*job))[0] for job, _ in models]
    # Loss gap: the same n images are in every model's training set (the 800 contain the 16).
    lines = [
        "| sigma (EDM) | "
        + " | ".join(f"{lab}: train / held-out / gap" for _, lab in models)
        + " |",
        "|---" * (len(models) + 1) + "|",
    ]
    for s in SIGMAS:
        cells = []
        for net in nets:
            tr, te = weighted_loss(net, subset, s, 16), weighted_loss(net, test, s, 4)
            cells.append(f"{tr:.3f} / {te:.3f} / {te - tr:+.3f}")
        lines.append(f"| {s:g} | " + " | ".join(cells) + " |")
    # Closed-form optima for comparison: the empirical denoisers (DDPM's optimum) on 16 and on 800
    # images, and Lemma 4.1's optimum of Eq. 6 on the 16 fixed noisy copies of the Algorithm 1 run
    # (above sigma_tn).
    S_tn = ambient.load_checkpoint(
        RUNS / run_name(DEMO_SIGMA_TN) / "checkpoint.pt", need=dict(S_tn=torch.Tensor)
    )["S_tn"]
    optima = [
        (f"empirical, {N} images", empirical_denoiser(subset)),
        (
            f"Lemma 4.1 ambient optimum, {N} noisy copies",
            ambient_optimal_denoiser(S_tn, torch.tensor(ambient.vp_from_edm(DEMO_SIGMA_TN))),
        ),
        ("empirical, 800 images", empirical_denoiser(train_all)),
    ]
    lines += [
        "",
        "Closed-form optima (no training), same losses:",
        "",
        "| sigma (EDM) | "
        + " | ".join(f"{lab}: train / held-out / gap" for lab, _ in optima)
        + " |",
        "|---" * (len(optima) + 1) + "|",
    ]
    for s in SIGMAS:
        cells = []
        for lab, f in optima:
            if "ambient" in lab and s <= DEMO_SIGMA_TN:
                cells.append("n/a (below sigma_tn)")
                continue
            tr, te = weighted_loss(f, subset, s, 16), weighted_loss(f, test, s, 4)
            cells.append(f"{tr:.3f} / {te:.3f} / {te - tr:+.3f}")
        lines.append(f"| {s:g} | " + " | ".join(cells) + " |")
    # Snapping: how often a model's estimate for a HELD-OUT x_t is a copy of one of the 16 training
    # images.
    lines += [
        "",
        "Held-out estimates that snap to a training image: share of the 200 test images whose "
        f"E[x_0 | x_t] (one noise draw) has d1/d2 < 1/3 / centred cosine > 0.95 against the {N} "
        "training images:",
        "",
        "| sigma (EDM) | " + " | ".join(lab for _, lab in models) + " |",
        "|---" * (len(models) + 1) + "|",
    ]
    z = torch.randn(test.shape, generator=torch.Generator().manual_seed(5))
    for s in (0.5, 1, 2, 5):
        s_t, cells = torch.tensor(ambient.vp_from_edm(float(s))), []
        for net in nets:
            with torch.no_grad():
                nn_ = ambient.nearest_neighbours(net(ambient.add_noise(test, s_t, z), s_t), subset)
            cells.append(
                f"{(nn_['ratio'] < 1 / 3).float().mean():.3f} / "
                f"{(nn_['cosine'] > 0.95).float().mean():.3f}"
            )
        lines.append(f"| {s:g} | " + " | ".join(cells) + " |")
    write("fig3", "\n".join(lines))
    # The picture: per image, a row of noisy inputs x_t (shown as x_t / alpha) then one row per
    # model.
    images = torch.cat([subset[:3], test[:3]])
    kinds = ["train"] * 3 + ["held-out"] * 3
    z = torch.randn(images.shape, generator=torch.Generator().manual_seed(1))
    rows = []
    with torch.no_grad():
        for i, x0 in enumerate(images):
            noisy = [(x0 + s * z[i]) / (1 + s**2) ** 0.5 for s in FIG3_SIGMAS]  # the VP x_t
            rows.append([x0] + noisy)
            for net in nets:
                ests = [
                    net(
                        ambient.add_noise(
                            x0[None], torch.tensor(ambient.vp_from_edm(float(s))), z[i : i + 1]
                        ),
                        torch.tensor(ambient.vp_from_edm(float(s))),
                    )[0]
                    for s in FIG3_SIGMAS
                ]
                rows.append([torch.ones_like(x0)] + ests)
    labels = []
    for k in kinds:
        labels += [f"{k} image x_0, then VP x_t"] + [lab for _, lab in models]
    header = ["x_0"] + [f"sigma={s:g}" for s in FIG3_SIGMAS]
    grid_png(rows, labels, header, FIGS / "cpu_fig3.png")


def table2(args):
    """Each method at demo scale, seeds 0 and 1 (another subset, noise, masks, initialisation and
    batches). Held-out loss here: the mean over the SIGMAS at or above 2, above every method's t_n,
    because the noisy-only model never trains below t_n; masking is scored with its fixed-mask
    denoiser."""
    jobs = [(level, N, method, seed, weight) for seed in (0, 1) for level, method, weight in TABLE2]
    train_missing(jobs, args.parallel)
    train_all, subset, test = data()
    label = {
        "algorithm1": "Algorithm 1, sigma_tn = {:g}, {} weight",
        "noisy-only": "noisy only (Ambient Tweedie), sigma_tn = {:g}, {} weight",
        "masking": "masking (Ambient Diffusion), p = {:g}, delta = 0.1",
    }
    lines = [
        "| seed | method | copy rate (d1/d2 < 1/3) | cos > 0.95 | cos median | d1/d2 median | "
        "held-out loss, sigma >= 2 | FD 4x4 | wall s |",
        "|---" * 9 + "|",
    ]
    for level, n, method, seed, weight in jobs:
        name = run_name(level, n, method, seed, weight)
        model, cfg, m = load_run(name)
        heldout = np.mean(
            [weighted_loss(denoiser_of(model, cfg), test, s, 4) for s in SIGMAS if s >= 2]
        )
        wall = (
            (RUNS / name / "wall_s.txt").read_text()
            if (RUNS / name / "wall_s.txt").exists()
            else "?"
        )
        lines.append(
            f"| {seed} | {'DDPM' if level == 0 else label[method].format(level, weight)} | "
            f"{m['copy_rate']:.3f} | {m['cosine_above_0.95']:.3f} | {m['cosine_median']:.3f} | "
            f"{m['ratio_median']:.3f} | {heldout:.4f} | "
            f"{fd44(load_samples(RUNS / name), test):.3f} | {wall} |"
        )
    g = torch.Generator().manual_seed(0)
    ref_gen = fd44(train_all[torch.randperm(len(train_all), generator=g)[:256]], test)
    lines.append(
        f"\nFD 4x4 reference: 256 random bundled training images {ref_gen:.3f} "
        "(a perfect generator)."
    )
    # Added after the first table, to explain the noisy-only row: the held-out loss at each level
    # (seed 0).
    lines += [
        "",
        "Held-out denoising loss per noise level, seed 0 (EDM sigma; rows as above):",
        "",
        "| method | " + " | ".join(f"sigma={s:g}" for s in SIGMAS) + " |",
        "|---" * (len(SIGMAS) + 1) + "|",
    ]
    for level, method, weight in TABLE2:
        model, cfg, _ = load_run(run_name(level, N, method, 0, weight))
        cells = [f"{weighted_loss(denoiser_of(model, cfg), test, s, 4):.3f}" for s in SIGMAS]
        lines.append(
            f"| {'DDPM' if level == 0 else label[method].format(level, weight)} | "
            + " | ".join(cells)
            + " |"
        )
    FIGS.mkdir(exist_ok=True)
    for level, method, weight in TABLE2[3:]:  # the DDPM and Algorithm 1 grids are the demo's
        name = run_name(level, N, method, 0, weight)
        shutil.copy(RUNS / name / "neighbours.png", FIGS / f"cpu_neighbours_{name}.png")
    write("table2", "\n".join(lines))


def mean_square_gradient(model, loss_of, x0, draws=8):
    """E |d loss / d theta|^2 over images and `draws` noise draws each, one sample at a time."""
    params, total, g = [p for p in model.parameters()], 0.0, torch.Generator().manual_seed(9)
    for _ in range(draws):
        for x in x0:
            grads = torch.autograd.grad(
                loss_of(model, x[None], torch.randn(x[None].shape, generator=g)).sum(), params
            )
            total += sum(gr.square().sum().item() for gr in grads)
    return total / (draws * len(x0))


def weights(args):
    """Added for issue 10 (which weight the released code uses): the mean squared per-sample
    gradient of Eq. 6 at noise levels just above sigma_tn, on the demo's trained Algorithm 1
    network, under the released weight and the x0 weight. Both scale the same per-sample gradient,
    so one pass serves both. The clean-data loss at the same level with EDM's weight is the
    reference: what DDPM sees."""
    job = DEMO_JOBS[1]
    train_missing([job], args.parallel)
    model, cfg, _ = load_run(run_name(*job))
    model.requires_grad_(True)
    S_tn = ambient.load_checkpoint(
        RUNS / run_name(*job) / "checkpoint.pt", need=dict(S_tn=torch.Tensor)
    )["S_tn"]
    subset, s_n = data()[1], torch.tensor(ambient.vp_from_edm(DEMO_SIGMA_TN))
    lines = [
        "| sigma / sigma_tn | c_h | weight released | weight x0 | E g^2, released | E g^2, x0 | "
        "E g^2, clean images (DDPM, EDM weight) |",
        "|---" * 7 + "|",
    ]
    for ratio in (1.001, 1.01, 1.1, 1.5, 3, 10):
        s_t = torch.tensor(ambient.vp_from_edm(ratio * DEMO_SIGMA_TN))
        w = {k: ambient.loss_weight(s_t, s_n, k).item() for k in ambient.AMBIENT_WEIGHTS}

        def eq6(m, x_tn, z, s_t=s_t):
            x_t = ambient.noise_further(x_tn, s_n, s_t, z)
            return ambient.ambient_loss(m(x_t, s_t), x_t, x_tn, s_t, s_n)

        ambient_g2 = mean_square_gradient(model, eq6, S_tn)
        clean_g2 = (
            mean_square_gradient(
                model,
                lambda m, x0, z, s_t=s_t: ambient.ddpm_loss(
                    m(ambient.add_noise(x0, s_t, z), s_t), x0
                ),
                subset,
            )
            * ambient.loss_weight(s_t, 0.0).item() ** 2
        )
        lines.append(
            f"| {ratio:g} | {ambient.ambient_coefficients(s_t, s_n)[0].item():.4f} | "
            f"{w['released']:.3g} | {w['x0']:.3g} | {w['released'] ** 2 * ambient_g2:.3g} | "
            f"{w['x0'] ** 2 * ambient_g2:.3g} | {clean_g2:.3g} |"
        )
    write("weights", "\n".join(lines))


# ------------------------------------------------------------------------------------------------
# Onset study (issue 17): copying and quality against images seen, each method trained once per
# setting and scored at log-spaced checkpoints. A checkpoint is a `--resume` of the previous one
# with a larger --iters in a folder of its own: ambient.py keeps the step, optimizer, EMA and
# both random states in the checkpoint, and the lr and EMA schedules are functions of the step,
# so a staged run is bit for bit the long run (checked here, 30 + 30 steps against 60, and by
# test_killed_and_resumed_run_equals_uninterrupted_run).
# Settings, checkpoints and measures were fixed before any onset run (NOTES.md, "Onset").
# ------------------------------------------------------------------------------------------------
ONSET_STEPS = (125, 250, 500, 1000, 2000, 4000, 8000, 16000)  # x 64: 8k to 1.02M images seen
# (n, last step, last step required): (a) the demo's setting, to 1.02M images; (b) four times
# the images at the same 8x8 and sigma_tn, so that only n moves; its 512k stage runs only if
# time is left.
ONSET_SETTINGS = ((N, 16000, 16000), (64, 8000, 4000))
ONSET_METHODS = (
    ("ddpm", 0, "released"),
    ("released", DEMO_SIGMA_TN, "released"),
    ("x0", DEMO_SIGMA_TN, "x0"),
)


def onset_dir(n, method, steps):
    return RUNS / "onset" / f"n{n}-{method}" / f"{steps * BATCH // 1000:04d}k"


def onset_chains():
    """One chain per setting and method: (n, method, level, weight, required steps, all steps)."""
    for n, last, required in ONSET_SETTINGS:
        for method, level, weight in ONSET_METHODS:
            steps = tuple(s for s in ONSET_STEPS if s <= last)
            yield n, method, level, weight, required, steps


def onset_command(chain, steps, previous):
    n, method, level, weight = chain[:4]
    cmd = command(level, n, "algorithm1", 0, weight)
    cmd[cmd.index("--iters") + 1] = str(steps)
    cmd[cmd.index("--out") + 1] = str(onset_dir(n, method, steps).relative_to(ROOT))
    return cmd + (["--resume"] if previous else [])


def start_stage(chain, steps, env):
    """Starts one stage in a fresh folder seeded with the previous stage's checkpoint (an
    unfinished one is redone)."""
    n, method = chain[:2]
    out, earlier = onset_dir(n, method, steps), [s for s in chain[5] if s < steps]
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    if earlier:
        for f in ("checkpoint.pt", "config.json"):
            shutil.copy(onset_dir(n, method, earlier[-1]) / f, out / f)
    cmd = onset_command(chain, steps, bool(earlier))
    print(
        time.strftime("%H:%M:%S ")
        + "$ "
        + " ".join(Path(c).name if c == sys.executable else c for c in cmd),
        flush=True,
    )
    log = open(out / "stdout.txt", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, time.time(), out


def next_stage(chain):
    """The chain's first stage without metrics.json, or None when the chain is done."""
    todo = [s for s in chain[5] if not (onset_dir(chain[0], chain[1], s) / "metrics.json").exists()]
    return todo[0] if todo else None


def train_onset(parallel=2):
    """Trains every missing stage, `parallel` chains at a time (one thread each). Order: the stage
    with the fewest images seen first, required stages before optional ones."""
    chains = list(onset_chains())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "33554432")
    env.setdefault("MALLOC_TRIM_THRESHOLD_", "1073741824")
    running = {}
    while True:
        ready = [
            (next_stage(c) > c[4], next_stage(c), i)
            for i, c in enumerate(chains)
            if i not in running and next_stage(c) is not None
        ]
        while ready and len(running) < parallel:
            _, steps, i = min(ready)
            ready.remove(min(ready))
            running[i] = start_stage(chains[i], steps, env)
        if not running:
            return
        time.sleep(2)
        for i, (proc, t0, out) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[i]
            if proc.returncode:
                raise UserError(failed(out, proc.returncode))
            (out / "wall_s.txt").write_text(f"{time.time() - t0:.0f}")
            print(
                time.strftime("%H:%M:%S ") + f"done {out.relative_to(RUNS)} in "
                f"{time.time() - t0:.0f} s",
                flush=True,
            )


# Fixed before any onset run. Bands of the held-out loss: below t_n = 1, around it, far above it.
ONSET_BANDS = HELDOUT_BANDS  # (name, the SIGMAS it averages); eval_memorization.py reports them
JUDGE_REF = "cifar10_test_png1000.npz"  # 1000 CIFAR-10 test images, lossless
PLATEAU = 0.05  # quality "arrives" at the first checkpoint within 5% of the method's best


def judge_images(x):
    """[-1, 1] images at RES -> uint8 NHWC at 32x32, upsampled nearest (the judge's README)."""
    x = F.interpolate(x.float(), size=(32, 32), mode="nearest")
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


JUDGE_API = ("load_judge", "features", "frechet", "nn_cosine")  # what onset calls in judge.py


def onset_judge(folder):
    """The offline judge's module, network and held-out images, checked before anything slow."""
    ref, fix = Path(folder).parent / "data" / JUDGE_REF, "pass the shared judge folder"
    if not ((Path(folder) / "judge.py").is_file() and ref.is_file()):
        raise UserError(
            f"--judge {folder}: needs judge.py there and {ref}; {fix} (../shared/judge) or leave "
            "--judge out"
        )
    spec = importlib.util.spec_from_file_location("judge", Path(folder) / "judge.py")
    judge = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(judge)
        missing = [f for f in JUDGE_API if not callable(getattr(judge, f, None))]
        if missing:
            raise UserError(f"--judge {folder}: judge.py has no function {missing[0]}; {fix}")
        net = judge.load_judge(Path(folder) / "cifar10_judge.pt")
    except UserError:
        raise
    except Exception as e:
        raise UserError(
            f"--judge {folder}: cannot load the judge ({type(e).__name__}: {first_line(e)[:100]}); "
            f"{fix}"
        ) from None
    return judge, net, ambient.load_images(str(ref))[0]


class OnsetData:
    """What every checkpoint of one setting is scored against; the judge's sets pass through the
    samples' own path (area-down to RES, nearest up to 32), so the judge compares like with like."""

    def __init__(self, n, judge=None, f_ref=None):
        train_all, _, self.test = data()
        self.subset = train_all[ambient.choose_subset(len(train_all), n, 0)]
        self.judge = None
        if judge:
            self.judge, self.net, held_out = judge
            if f_ref is None:  # the judge's README: its held-out reference sits in ../data
                f_ref = self.features(ambient.prepare(held_out, RES))
            self.f_ref, self.f_train = f_ref, self.features(self.subset)
            g = torch.Generator().manual_seed(0)
            generator = train_all[torch.randperm(len(train_all), generator=g)[:256]]
            copier = self.subset[torch.randint(len(self.subset), (256,), generator=g)]
            self.refs = {
                k: self.fd(self.features(v))
                for k, v in (("generator", generator), ("copier", copier))
            }

    def features(self, images):
        return self.judge.features(self.net, judge_images(images))

    def fd(self, features):
        return self.judge.frechet(features, self.f_ref)


SCORE_KEYS = ("copy", "c95", "rough")


def score_stage(out, od):
    """Copying, roughness, held-out loss per level and (with the judge) fd_judge of one checkpoint;
    cached in score.json."""
    cache = out / "score.json"
    if cache.exists():
        fix = "delete it to score the stage again"
        cached = numbers(read_json(cache, fix), SCORE_KEYS, cache, fix)
        numbers(cached.get("loss"), [f"{s:g}" for s in SIGMAS], f"{cache}'s loss", fix)
        if "fd_judge" in cached or od.judge is None:
            return numbers(cached, ("fd_judge", "sim_mean") if od.judge else (), cache, fix)
    fix = f"delete {out} to train it again"
    keys = ("copy_rate", "cosine_above_0.95", "roughness_vs_train")
    m = numbers(read_json(out / "metrics.json", fix), keys, out / "metrics.json", fix)
    model, _ = stage_network(out)
    r = dict(
        copy=m["copy_rate"],
        c95=m["cosine_above_0.95"],
        rough=m["roughness_vs_train"],
        loss=heldout_losses(model, od.test),
    )
    if od.judge is not None:
        f_gen = od.features(load_samples(out))
        r["fd_judge"] = od.fd(f_gen)
        r["sim_mean"] = float(od.judge.nn_cosine(f_gen, od.f_train)[0].mean())
    cache.write_text(json.dumps(r, indent=1))
    return r


def band(r, sigmas):
    return heldout_band(r["loss"], sigmas)


def crossing(images, values, level=0.5):
    """Images seen at which `values` first reaches `level`, log-interpolated between checkpoints."""
    for k, v in enumerate(values):
        if v >= level:
            if k == 0:
                return f"<= {images[0] / 1e3:g}k"
            lo, hi = np.log(images[k - 1]), np.log(images[k])
            frac = (level - values[k - 1]) / (v - values[k - 1])
            return f"{np.exp(lo + frac * (hi - lo)) / 1e3:.0f}k"
    return f"> {images[-1] / 1e3:g}k (not reached)" if images else "-"


def plateau(images, values):
    """First checkpoint within PLATEAU of the best (lowest) value, and the best's checkpoint."""
    best = min(values)
    first = next(i for i, v in zip(images, values, strict=True) if v <= best * (1 + PLATEAU))
    at = images[values.index(best)]
    return f"{first / 1e3:g}k (best {best:.3f} at {at / 1e3:g}k)"


def onset(args):
    """Trains the missing checkpoints (unless --no-train), then scores those there are."""
    judge = onset_judge(args.judge) if args.judge else None
    if not args.no_train:
        train_onset(args.parallel)
    curves, lines, summary, refs = {}, [], [], []
    judged = args.judge is not None
    head = (
        "| setting | method | images seen | copy rate | cos > 0.95 | roughness / data's | "
        + " | ".join(f"held-out, sigma {name}" for name, _ in ONSET_BANDS)
        + " | held-out, all 10 levels"
        + (" | fd_judge | judge sim mean" if judged else "")
        + " |"
    )
    lines += [head, "|---" * (head.count(" | ") + 1) + "|"]
    f_ref = None
    for n, _, _ in ONSET_SETTINGS:
        od = OnsetData(n, judge, f_ref)
        f_ref = od.f_ref if judged else None
        if judged:
            refs.append(
                f"n = {n}: fd_judge of 256 random bundled training images (a perfect "
                f"generator) {od.refs['generator']:.1f}, of 256 draws from the {n} "
                f"training images (a perfect copier) {od.refs['copier']:.1f}"
            )
        for chain in (c for c in onset_chains() if c[0] == n):
            method, done = chain[1], []
            for steps in chain[5]:
                out = onset_dir(n, method, steps)
                if (out / "metrics.json").exists():
                    done.append((steps * BATCH, score_stage(out, od)))
            curves[(n, method)] = done
            for images, r in done:
                lines.append(
                    f"| n = {n} | {method} | {images / 1e3:g}k | {r['copy']:.3f} | "
                    f"{r['c95']:.3f} | {r['rough']:.2f} | "
                    + " | ".join(f"{band(r, sig):.3f}" for _, sig in ONSET_BANDS)
                    + f" | {band(r, SIGMAS):.3f}"
                    + (f" | {r['fd_judge']:.1f} | {r['sim_mean']:.3f}" if judged else "")
                    + " |"
                )
            missing = [f"{s * BATCH / 1e3:g}k" for s in chain[5] if s * BATCH not in dict(done)]
            x = [i for i, _ in done]
            summary.append(
                f"| n = {n} | {method} | {crossing(x, [r['copy'] for _, r in done])} | "
                + (plateau(x, [band(r, SIGMAS) for _, r in done]) if done else "-")
                + (" | " + plateau(x, [r["fd_judge"] for _, r in done]) if judged and done else "")
                + f" | {', '.join(missing) or 'none'} |"
            )
    summary = [
        "| setting | method | 50% copies at | held-out loss arrives at (within 5% of "
        "best) | " + ("fd_judge arrives at (within 5% of best) | " if judged else "") + "not run |",
        "|---" * (5 + judged) + "|",
    ] + summary
    text = ("\n".join(summary) + "\n\n" + "\n".join(lines) + "\n\n" + "\n".join(refs)).strip()
    write("onset", text)
    onset_figure(curves, judged)


def onset_figure(curves, judged):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("copy rate (d1/d2 < 1/3)", lambda r: r["copy"]),
        ("held-out loss, mean of 10 levels (lower better)", lambda r: band(r, SIGMAS)),
    ]
    if judged:
        panels.append(("fd_judge vs test images (lower better)", lambda r: r["fd_judge"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.2))
    colour = {"ddpm": "C3", "released": "C0", "x0": "C2"}
    for ax, (label, get) in zip(axes, panels, strict=True):
        for (n, method), done in curves.items():
            if done:
                ax.plot(
                    [i for i, _ in done],
                    [get(r) for _, r in done],
                    marker="o",
                    ms=3,
                    color=colour[method],
                    ls="-" if n == N else "--",
                    label=f"{'DDPM' if method == 'ddpm' else method + ' weight'}, n = {n}",
                )
        ax.set(xscale="log", xlabel="images seen", ylabel=label)
        ax.grid(alpha=0.3)
    axes[0].axhline(0.5, color="grey", lw=0.8)
    axes[1].legend(fontsize=7, loc="upper left")  # the copy-rate panel has no free corner
    fig.suptitle(
        f"Onset of copying: DDPM and Algorithm 1 (sigma_tn = {DEMO_SIGMA_TN:g}), "
        f"CIFAR-10 at {RES}x{RES}, tiny preset, batch {BATCH}",
        fontsize=9,
    )
    fig.tight_layout()
    FIGS.mkdir(exist_ok=True)
    fig.savefig(FIGS / "onset.png", dpi=90)
    print(f"wrote {FIGS / 'onset.png'}")


def grid_png(rows, labels, header, path, up=8, label_w=230, top=16):
    """Rows of images with a text label on the left of each row and a header above the columns."""
    from PIL import Image, ImageDraw

    tile, pad = RES * up, 2
    W, H = label_w + len(rows[0]) * (tile + pad), top + len(rows) * (tile + pad)
    canvas = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(canvas)
    for c, text in enumerate(header):
        draw.text((label_w + c * (tile + pad) + 2, 2), text, fill="black")
    for r, (cells, lab) in enumerate(zip(rows, labels, strict=True)):
        y = top + r * (tile + pad)
        draw.text((4, y + tile // 2 - 6), lab, fill="black")
        for c, x in enumerate(cells):
            arr = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
            canvas.paste(
                Image.fromarray(arr).resize((tile, tile), Image.NEAREST),
                (label_w + c * (tile + pad), y),
            )
    FIGS.mkdir(exist_ok=True)
    canvas.save(path, optimize=True)
    print(f"wrote {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=("demo", "sweep", "fig3", "table2", "weights", "onset"))
    p.add_argument(
        "--parallel", type=int, default=2, help="trainings at once, one thread each (default 2)"
    )
    p.add_argument(
        "--values", default=None, help="sweep: comma-separated sigma_tn values (default: all)"
    )
    p.add_argument(
        "--no-train", action="store_true", help="onset: score the checkpoints there are, train none"
    )
    p.add_argument(
        "--judge", default=None, help="onset: the offline judge's folder (../shared/judge)"
    )
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    commands = dict(demo=demo, sweep=sweep, fig3=fig3, table2=table2, weights=weights, onset=onset)
    try:
        commands[args.command](args)
    except UserError as e:  # a damaged run or checkpoint in runs/cpu, a stage that failed: one line
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
