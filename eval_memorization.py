"""Quality and memorization of ambient.py runs, measured as in the paper (Table 1, Tables 3-4,
Figure 2).

    # run folders from ambient.py
    python eval_memorization.py runs/ddpm runs/ambient-0.4
    # any images, training set by flag
    python eval_memorization.py samples.npz --train cifar --samples 50000

Quality is FID with pytorch-fid's Inception-v3 (the TF 2015-12-05 weights that pytorch-fid and EDM
use), its input resized to 299 as EDM's fid.py does (TF1's legacy bilinear; --fid-resize pytorch-fid
for pytorch-fid's), against reference statistics over the whole dataset, cached to a file; KID and
precision/recall from the same features, as torch-fidelity computes them. FD_DINOv2 follows dgm-eval
(Stein et al. 2023): ViT-L/14, bicubic resize to 224, ImageNet normalisation, the CLS token.
Memorization is the top-1 cosine of each sample's DINOv2 CLS embedding to the training set,
following the authors' released recipe: ViT-g/14, images in [0, 1], reflect-padded to a multiple of
14, no resize, no ImageNet normalisation. The report names each metric's recipe.

Weights are never downloaded behind your back into an unexpected place and never replaced by
another network: each file is looked up by its original name in --*-weights, $AMBIENT_WEIGHTS, then
the torch hub cache, and only then downloaded there. Without them the report falls back to
ambient.py's pixel metrics and says so. Output: a Markdown table on stdout, report.json, report.md,
PNGs and per_sample_<run>.npz (each sample's similarity, nearest training image and pixel d1/d2)
in --out.
"""

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F

import ambient as A
from ambient import UserError
from feature_networks import (  # the networks, their input recipes and where their weights are
    DINOV2_SIZES,
    DINOV2_URL,
    FID_RECIPES,
    FID_RESIZES,
    INCEPTION_FILE,
    INCEPTION_URL,
    WEIGHTS_ENV,
    WeightsMissing,
    dinov2_fd_forward,
    dinov2_file,
    dinov2_forward,
    dinov2_network,
    fd_dinov2_recipe,
    find_weights,
    first_line,
    inception_forward,
    inception_network,
    similarity_recipe,
)


# ------------------------------------------------------------------------------------------------
# 1. Features in batches, Frechet distance, nearest neighbours.
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def features(forward, images, batch, device, label="features", log=None):
    """forward over images ([-1, 1], N x 3 x H x W) in batches -> float64 numpy (N, D)."""
    out, t0, last = [], time.time(), 0.0
    for start in range(0, len(images), batch):
        out.append(forward(images[start : start + batch].to(device)).double().cpu())
        done = start + len(out[-1])
        if log and (time.time() - last > 10 or done == len(images)):
            last = time.time()
            log(f"{label}: {done}/{len(images)} images ({done / (last - t0 + 1e-9):.1f} img/s)")
    return torch.cat(out).numpy() if out else np.zeros((0, 0))


def statistics(feats):
    """Mean and covariance (1/(N-1), as pytorch-fid) in float64."""
    feats = np.asarray(feats, np.float64)
    return feats.mean(0), np.atleast_2d(np.cov(feats, rowvar=False))


def above_round_off(eigenvalues):
    """Eigenvalues of a PSD matrix with the round-off noise (|e| < n eps max e) set to 0: the square
    root would blow 1e-16 up to 1e-8, once per missing dimension when samples are fewer than
    features."""
    return np.where(
        eigenvalues > len(eigenvalues) * np.finfo(np.float64).eps * eigenvalues.max(),
        eigenvalues,
        0.0,
    )


def frechet_distance(mu1, cov1, mu2, cov2):
    """|mu1 - mu2|^2 + tr(C1 + C2 - 2 (C1 C2)^1/2), in float64.
    tr (C1 C2)^1/2 = tr (C1^1/2 C2 C1^1/2)^1/2, and the inner matrix is symmetric positive
    semi-definite: its eigenvalues are real, so round-off is cut to zero instead of producing the
    complex parts and singular products that sqrtm(C1 C2) meets with fewer samples than features."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    e1, v1 = scipy.linalg.eigh(cov1)
    root1 = (v1 * np.sqrt(above_round_off(e1))) @ v1.T
    inner = root1 @ cov2 @ root1
    tr_covmean = np.sqrt(above_round_off(scipy.linalg.eigvalsh((inner + inner.T) / 2))).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * tr_covmean)


def frechet_distance_to(feats, mu2, cov2):
    """The Frechet distance of a feature set to (mu2, cov2). With fewer samples than features, C1 =
    X^T X / (n - 1) for the centred X, and C1^1/2 C2 C1^1/2 has the nonzero eigenvalues of the n x n
    X C2 X^T / (n - 1): the same number for a fraction of the work of two d x d
    eigen-decompositions."""
    mu1, cov1 = statistics(feats)
    if len(feats) > feats.shape[1]:
        return frechet_distance(mu1, cov1, mu2, cov2)
    X = np.asarray(feats, np.float64) - mu1
    inner = X @ np.asarray(cov2, np.float64) @ X.T / (len(X) - 1)
    tr_covmean = np.sqrt(above_round_off(scipy.linalg.eigvalsh((inner + inner.T) / 2))).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * tr_covmean)


KID_SUBSETS, KID_SUBSET_SIZE, KID_SEED = (
    100,
    1000,
    2020,
)  # torch-fidelity's defaults, after Binkowski et al. 2018


def kid_recipe(subsets, size):
    return (
        "Inception-v3 pool3 as for FID; k(x, y) = (x.y / d + 1)^3, unbiased MMD^2, "
        f"mean +- std over {subsets} subsets of {size} (torch-fidelity)"
    )


def polynomial_kernel(X, Y):
    """KID's kernel k(x, y) = (x.y / d + 1)^3, d the feature dimension."""
    return (X @ Y.T / X.shape[1] + 1) ** 3


def mmd2_unbiased(X, Y):
    """The unbiased MMD^2 estimate of two sets of m features: the within-set kernel means leave out
    the diagonal k(x_i, x_i); the cross mean keeps every pair, X and Y being independent draws."""
    m = len(X)
    kxx, kyy = polynomial_kernel(X, X), polynomial_kernel(Y, Y)
    within = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return within - 2 * polynomial_kernel(X, Y).mean()


def kid(gen, ref, subsets=KID_SUBSETS, subset_size=KID_SUBSET_SIZE, seed=KID_SEED, device="cpu"):
    """KID: mean and (population) std of mmd2_unbiased over random subsets drawn without
    replacement, generated first, as torch-fidelity draws them. Sets smaller than subset_size: the
    smaller set's size."""
    m = min(subset_size, len(gen), len(ref))
    if m < 2:
        return {"kid": None, "kid_unavailable": f"KID needs 2 samples or more, not {m}"}
    rng = np.random.RandomState(seed)
    X, Y = (torch.as_tensor(np.asarray(f), dtype=torch.float64, device=device) for f in (gen, ref))
    values = []
    for _ in range(subsets):
        i, j = rng.choice(len(X), m, replace=False), rng.choice(len(Y), m, replace=False)
        values.append(mmd2_unbiased(X[i], Y[j]).item())
    return {
        "kid": float(np.mean(values)),
        "kid_std": float(np.std(values)),
        "kid_subsets": subsets,
        "kid_subset_size": m,
        "kid_recipe": kid_recipe(subsets, m),
    }


PR_NEIGHBOURS = 3  # Kynkaanniemi et al. 2019 and torch-fidelity


def knn_radii(feats, k, chunk=4096):
    """Each point's distance to its k-th nearest other point of the same set (the k+1-th with
    itself)."""
    return torch.cat(
        [torch.cdist(part, feats).kthvalue(k + 1, dim=1).values for part in feats.split(chunk)]
    )


def share_inside(points, centres, radii, chunk=4096):
    """The share of points within some centre's radius: inside the k-NN manifold of the centres."""
    inside = [(torch.cdist(part, centres) <= radii).any(dim=1) for part in points.split(chunk)]
    return torch.cat(inside).double().mean().item()


def precision_recall(gen, ref, k=PR_NEIGHBOURS, device="cpu"):
    """Improved precision (generated samples inside the reference manifold) and recall (reference
    images inside the generated one), each manifold the union of balls to every point's k-th
    neighbour."""
    if min(len(gen), len(ref)) <= k:
        return {"precision": None, "recall": None}
    X, Y = (torch.as_tensor(np.asarray(f), dtype=torch.float32, device=device) for f in (gen, ref))
    return {
        "precision": share_inside(X, Y, knn_radii(Y, k)),
        "recall": share_inside(Y, X, knn_radii(X, k)),
        "pr_recipe": f"Inception-v3 pool3 as for FID; k-NN manifolds, k = {k} "
        "(Kynkaanniemi et al. 2019, torch-fidelity)",
    }


def top1_cosine(samples, train, chunk=4096):
    """Each sample's best cosine to the training features and its index (the embeddings
    L2-normalised)."""
    t = F.normalize(torch.as_tensor(train, dtype=torch.float64), dim=1)
    sims, idx = [], []
    for s in torch.as_tensor(samples, dtype=torch.float64).split(chunk):
        best = (F.normalize(s, dim=1) @ t.T).max(1)
        sims.append(best.values)
        idx.append(best.indices)
    return torch.cat(sims).numpy(), torch.cat(idx).numpy()


def similarity_summary(sims, thresholds):
    return {
        "similarity_mean": float(np.mean(sims)),
        "similarity_median": float(np.median(sims)),
        **{f"similarity_above_{th:g}": float((sims > th).mean()) for th in thresholds},
    }


# ------------------------------------------------------------------------------------------------
# Held-out denoising loss: the training objective on images the run never saw, an offline quality
# figure that needs no downloaded weights (repro_cpu.py's onset study fixed it; NOTES.md, "Onset").
# ------------------------------------------------------------------------------------------------
HELDOUT_SIGMAS = (0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 40)  # EDM units
# Below the demo's t_n (sigma_tn = 1), around it, far above it.
HELDOUT_BANDS = (("0.05-0.5", (0.05, 0.1, 0.2, 0.5)), ("1-2", (1, 2)), ("5-40", (5, 10, 20, 40)))
HELDOUT_DRAWS = 4  # fixed noise draws per image and level
HELDOUT_RECIPE = (
    "EDM-weighted squared error of h(x_t) against x_0 on the dataset's held-out images, "
    f"{HELDOUT_DRAWS} fixed noise draws each, averaged over the levels (repro_cpu.py onset)"
)


@torch.no_grad()
def weighted_loss(model, x0, sigma, draws, seed=0):
    """Mean of lambda(sigma) |h(x_t) - x_0|^2 over images and `draws` fixed noise draws each."""
    x0 = x0.repeat(draws, 1, 1, 1)
    z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(x0.device)
    s_t = torch.tensor(A.vp_from_edm(float(sigma)))
    pred = model(A.add_noise(x0, s_t, z), s_t)
    return (A.loss_weight(s_t, torch.tensor(0.0)) * A.ddpm_loss(pred, x0)).mean().item()


def heldout_losses(model, test):
    """{sigma: the held-out loss at that level} over HELDOUT_SIGMAS."""
    return {f"{s:g}": weighted_loss(model, test, s, HELDOUT_DRAWS) for s in HELDOUT_SIGMAS}


def heldout_band(losses, sigmas):
    return float(np.mean([losses[f"{s:g}"] for s in sigmas]))


def denoiser_of(model, cfg):
    """The E[x_0 | x_t] a run samples with: the network, or for masking its fixed-mask form (one
    seeded mask per image, drawn as in sampling)."""
    import baselines

    if cfg.method != "masking":
        return model
    keep = (1 - cfg.mask_p) * (1 - cfg.mask_delta)

    def h(x_t, sigma_t):
        u = torch.rand(x_t.shape[0], 1, *x_t.shape[2:], generator=torch.Generator().manual_seed(7))
        return baselines.with_mask(model, (u < keep).float().to(x_t.device))(x_t, sigma_t)

    return h


def heldout_images(data, data_dir, resolution):
    """(the held-out images of --data demo or cifar at `resolution`, None) or (None, why none)."""
    if data == "demo":
        with np.load(A.DEMO_FILE) as f:
            return A.prepare(f["test_images"], resolution), None
    if data != "cifar":
        return None, f"no held-out images for --data {data} (demo and cifar have them)"
    import torchvision

    try:  # the test batch sits beside the training batches; nothing is downloaded here
        test = torchvision.datasets.CIFAR10(data_dir, train=False, download=False).data
    except Exception as e:
        return None, f"no CIFAR-10 test set in {data_dir} ({first_line(e)[:80]})"
    return A.prepare(np.asarray(test), resolution), None


# ------------------------------------------------------------------------------------------------
# Closed-form optima: the exact minimisers of the training objectives on a finite training set,
# the theory's copiers (Section 2.2, Lemma 4.1). Runs are compared with them (repro_cpu.py fig3) and
# test_ambient.py checks ambient.py's sampler with them.
# ------------------------------------------------------------------------------------------------
def ambient_optimal_denoiser(S_tn, sigma_tn):
    """Lemma 4.1: the minimiser of Eq. 6 when the data are the finite set S_tn (VP units), t > t_n.
    x_tn is one of S_tn, weighted by N(x_t; (alpha_t / alpha_tn) x_tn, s2) with
    s2 = (sigma_t^2 - sigma_tn^2) / (1 - sigma_tn^2), and Lemma C.1's map gives E[x_0 | x_t].
    With sigma_tn = 0 it is Eq. 3's empirical optimum."""
    points = S_tn.flatten(1)
    sq_norms = points.square().sum(1)

    def h(x_t, sigma_t):
        sigma_t = torch.as_tensor(sigma_t, dtype=x_t.dtype).expand(x_t.shape[0])
        scale = A.alpha(sigma_t) / A.alpha(sigma_tn)
        s2 = (sigma_t**2 - sigma_tn**2) / (1 - sigma_tn**2)
        x = x_t.flatten(1)
        d2 = (
            x.square().sum(1, keepdim=True)
            - 2 * scale[:, None] * x @ points.T
            + scale[:, None] ** 2 * sq_norms
        )
        mean_x_tn = (torch.softmax(-d2 / (2 * s2[:, None]), dim=1) @ points).reshape(x_t.shape)
        c_h, c_x = A.ambient_coefficients(sigma_t, sigma_tn)
        return (mean_x_tn - A.bcast(c_x, x_t) * x_t) / A.bcast(c_h, x_t)

    return h


def empirical_denoiser(S):
    """Section 2.2: E[x_0 | x_t] when x_0 is uniform on the training set S. Its ODE copies S."""
    return ambient_optimal_denoiser(S, 0.0)


# ------------------------------------------------------------------------------------------------
# 2. Cache files (npz): reference statistics and training features, valid only for the same key.
# ------------------------------------------------------------------------------------------------
def cache_path(cache_dir, kind, key):
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_dir) / f"{kind}-{digest}.npz"


def save_cache(path, key, **arrays):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")  # a killed run leaves no half-written cache
    np.savez(tmp, key=json.dumps(key, sort_keys=True), **arrays)
    os.replace(tmp, path)


def load_cache(path, key):
    """The arrays of a cache file written for the same key, or None."""
    try:
        with np.load(path) as f:
            if str(f["key"]) != json.dumps(key, sort_keys=True):
                return None
            return {k: f[k] for k in f.files if k != "key"}
    except (OSError, ValueError, KeyError):
        return None


def cached(cache_dir, kind, key, compute, log):
    path = cache_path(cache_dir, kind, key)
    hit = load_cache(path, key)
    if hit is not None:
        log(f"{kind}: cached in {path}")
        return hit
    arrays = compute()
    save_cache(path, key, **arrays)
    log(f"{kind}: wrote {path}")
    return arrays


# ------------------------------------------------------------------------------------------------
# 3. Inputs: run folders (their config names the training set) or images with --train.
# ------------------------------------------------------------------------------------------------
FFHQ_THRESHOLDS, DEFAULT_THRESHOLDS = (0.85, 0.875, 0.9), (0.9, 0.925, 0.95)  # Table 1


def thresholds_for(data_spec):
    return FFHQ_THRESHOLDS if "ffhq" in str(data_spec).lower() else DEFAULT_THRESHOLDS


def find_dataset(path, cfg, args):
    """(spec, data_dir) of a run's training set, so that a run folder can be scored from any folder:
    --train; else config.json's data_path (absolute, written by newer ambient.py) if it exists; else
    "data" as written, from the current folder; else from each folder above the run (older runs
    wrote the path as typed, relative to where ambient.py ran)."""
    data_dir = args.data_dir or find_data_dir(path, cfg)
    if args.train or cfg.data in ("cifar", "demo"):
        return args.train or cfg.data, data_dir
    data = Path(cfg.data)
    places = (
        ([Path(cfg.data_path)] if cfg.data_path else [])
        + [data]
        + [p / data for p in path.resolve().parents]
    )
    for place in places:
        if place.exists():
            return str(place.resolve()), data_dir
    raise UserError(
        f"{path} was trained on {cfg.data}, which is not at {cfg.data_path or cfg.data} from "
        f"{Path.cwd()} nor under a folder above {path.resolve()}; "
        "pass --train PATH (that .npz or image folder)"
    )


def find_data_dir(path, cfg):
    """Where cifar lives for a run: its data_dir if that holds CIFAR-10 from here or from a folder
    above the run, else data_dir as written (ambient.py's loader then downloads there or says what
    to place)."""
    data_dir = Path(cfg.data_dir)
    for place in [data_dir] + [p / data_dir for p in path.resolve().parents]:
        if (place / "cifar-10-batches-py").is_dir() or (
            place / A.CIFAR_URL.rsplit("/", 1)[1]
        ).is_file():
            return str(place)
    return str(data_dir)


def read_json(file, what):
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: nested beyond reason
        raise UserError(f"cannot read {file} ({first_line(e)[:120]}); {what}") from None


def read_samples(file, resolution, fix):
    """uint8 images N x resolution x resolution x 3 from an .npz ambient.py or eval wrote."""
    try:
        samples = A.load_images(str(file))[0]
    except UserError as e:
        raise UserError(f"{e}; {fix}") from None
    if samples.shape[1:3] != (resolution, resolution):
        raise UserError(
            f"{file} holds {samples.shape[1]}x{samples.shape[2]} images and the run was trained at "
            f"{resolution}x{resolution}; {fix}"
        )
    return samples


def load_run(path, args, log):
    """A run folder -> training images, reference spec, config, and its samples ([-1, 1] tensors),
    or 'generate', which draws them from the checkpoint once the networks are known to be there."""
    cfg = run_config(path)
    spec, data_dir = find_dataset(path, cfg, args)
    dataset = A.load_images(spec, data_dir)[0]
    if cfg.resolution > dataset.shape[1]:
        raise UserError(
            f"{path} was trained at {cfg.resolution}x{cfg.resolution} and {spec} holds "
            f"{dataset.shape[1]}x{dataset.shape[2]} images; "
            "pass --train with the dataset the run was trained on"
        )
    indices = read_json(path / "indices.json", f"is {path} a run folder from ambient.py?")
    if not isinstance(indices, list) or not all(
        type(i) is int and 0 <= i < len(dataset) for i in indices or [-1]
    ):
        raise UserError(
            f"{path / 'indices.json'} is not a list of image numbers within the {len(dataset)} "
            f"images of {spec}; pass --train with the dataset the run was trained on"
        )
    samples, want = run_samples(path, args, cfg.resolution)
    heldout = heldout_of_run(path, cfg, data_dir, args.device)
    run = dict(
        samples=samples,
        train=A.prepare(dataset[indices], cfg.resolution),
        ref_spec=args.ref or spec,
        ref_dir=data_dir,
        resolution=cfg.resolution,
        indices=indices,
        data=cfg.data,
        train_key=[spec, str(Path(data_dir).resolve()), cfg.resolution, indices],
        sigma_tn=cfg.sigma_tn,
        method=cfg.method,
        mask_p=getattr(cfg, "mask_p", None),
        heldout=heldout,
    )
    if samples is None:
        run["generate"] = lambda: A.prepare(generate_for(path, cfg, want, args, log)[:want])
    return run


def heldout_of_run(path, cfg, data_dir, device):
    """What the held-out loss of a run needs, checked now: a function of nothing giving its losses
    (from the checkpoint's EMA weights), or why it is n/a."""
    import conditional

    if isinstance(cfg, conditional.Config):
        return "class-conditional runs are not scored by it"
    test, why = heldout_images(cfg.data, data_dir, cfg.resolution)
    if test is None:
        return why
    if not (path / "checkpoint.pt").is_file():
        return f"{path} has no checkpoint.pt"
    _, model = ema_network(path, lambda: A.load_checkpoint(path / "checkpoint.pt", fix=HELDOUT_FIX))
    model = model.to(device)
    return lambda: heldout_losses(denoiser_of(model, cfg), test.to(device))


HELDOUT_FIX = "the held-out loss needs its EMA weights; restore it from a copy or re-train the run"


def run_samples(path, args, resolution):
    """(samples.npz's first --samples images, how many are wanted); None when the checkpoint must
    make them, after checking now that it can, so that a damaged file is reported before any network
    loads."""
    samples = None
    if (path / "samples.npz").is_file():
        samples = read_samples(
            path / "samples.npz", resolution, "pass --samples N to draw N afresh"
        )
    if samples is None and not args.samples:
        raise UserError(
            f"{path} has no samples.npz; pass --samples N to generate N from its checkpoint"
        )
    want = args.samples or len(samples)
    if samples is not None and len(samples) >= want:
        return A.prepare(samples[:want]), want
    if not (path / f"eval-samples-{want}.npz").is_file():
        checkpoint_weights(path, want, 0 if samples is None else len(samples))
    return None, want


def checkpoint_weights(path, count, have=0):
    """path/checkpoint.pt's entries (weights-only), or one line saying what to do without it."""
    checkpoint = path / "checkpoint.pt"
    instead = f", or pass --samples {have} (what samples.npz holds)" if have else ""
    if not checkpoint.is_file():
        raise UserError(
            f"{path} has no checkpoint.pt to generate {count} samples from"
            f"{instead or '; lower --samples'}"
        )
    return A.load_checkpoint(
        checkpoint,
        fix=f"{count} samples need it; restore it from a copy or re-train the run{instead}",
    )


def run_config(path):
    """A run folder's config.json, typed and checked by the Config of the script that wrote it:
    ambient.py, baselines.py (a method other than algorithm1) or conditional.py (num_classes)."""
    import baselines
    import conditional

    saved = A.read_config(path)
    kind = (
        baselines.Config
        if saved.get("method", "algorithm1") != "algorithm1"
        else conditional.Config
        if saved.get("num_classes")
        else A.Config
    )
    return kind.from_saved(saved, path / "config.json")


def ema_network(path, load, fix="restore the run's own config.json"):
    """A run's method and its EMA network in eval mode, built as config.json describes it
    (mask-aware for masking runs), holding the "ema" weights of load()'s checkpoint entries;
    weights that do not fit that network are one line."""
    method = method_of_run(path)
    model = method.network()
    try:
        model.load_state_dict(load()["ema"])
    except RuntimeError as e:
        raise UserError(
            f"{path / 'checkpoint.pt'}: its EMA weights do not fit the network of "
            f"{path / 'config.json'} ({first_line(e)[:120]}); {fix}"
        ) from None
    return method, model.eval()


def method_of_run(path):
    """The method object a run folder was trained with, from its config.json."""
    import baselines
    import conditional

    cfg = run_config(path)
    if isinstance(cfg, baselines.Config):
        return baselines.METHODS[cfg.method](cfg)
    return (
        conditional.ClassConditional(cfg)
        if isinstance(cfg, conditional.Config)
        else A.Algorithm1(cfg)
    )


def generate_for(path, cfg, count, args, log):
    """More samples than samples.npz holds: draw them from the checkpoint's EMA weights, once, with
    the run's sampler and steps (Heun with 40 steps, the authors' released setting, where config
    lacks them)."""
    out = path / f"eval-samples-{count}.npz"
    if out.is_file():
        return read_samples(out, cfg.resolution, f"delete it to draw the {count} samples again")
    method, ema = ema_network(path, lambda: checkpoint_weights(path, count))
    ema = ema.to(args.device)
    log(f"{path.name}: generating {count} samples from its checkpoint")
    bf16 = (
        A.read_config(path).get("precision") == "bf16"
    )  # as the run sampled its samples.npz (repro_gpu.py --precision)
    with torch.autocast(args.device.type, torch.bfloat16, enabled=bf16):
        x = method.generate(ema, count, log)
    images = ((x + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    np.savez_compressed(out, images=images)
    return images


def load_images_input(path, args):
    if not args.train:
        raise UserError(
            f"{path} holds images, not an ambient.py run: pass --train with the training set "
            "(cifar, demo, a .npz or a folder of images)"
        )
    samples = A.load_images(str(path))[0]
    res = samples.shape[1]
    if args.samples:
        if args.samples > len(samples):
            raise UserError(f"--samples {args.samples}: {path} holds only {len(samples)} images")
        samples = samples[: args.samples]
    train = A.load_images(args.train, args.data_dir or "data")[0]
    return dict(
        samples=A.prepare(samples),
        train=A.prepare(train, res),
        ref_spec=args.ref or args.train,
        ref_dir=args.data_dir or "data",
        resolution=res,
        sigma_tn=None,
        heldout="images, not a run folder: no network to score",
        data=args.train,
        train_key=[args.train, str(Path(args.data_dir or "data").resolve()), res, "all"],
    )


RUN_FILES = ("checkpoint.pt", "samples.npz", "indices.json", "metrics.json", "log.txt")


def load_input(spec, args, log):
    path = Path(spec)
    if (path / "config.json").is_file():
        return with_reference(load_run(path, args, log))
    if path.is_dir() and not any(path.iterdir()):
        raise UserError(
            f"{spec} is empty; pass a run folder from ambient.py (with config.json) or images"
        )
    found = [f for f in RUN_FILES if (path / f).is_file()]
    if path.is_dir() and found:
        raise UserError(
            f"{spec} holds {', '.join(found)} but no config.json, which ambient.py writes when a "
            "run starts: restore it, or score its samples as images: "
            f"{path / 'samples.npz'} --train DATA"
        )
    if path.is_dir() or (path.suffix == ".npz" and path.is_file()):
        return with_reference(load_images_input(path, args))
    raise UserError(
        f"{spec} is neither a run folder (with config.json) nor a folder or .npz of images"
    )


def with_reference(run):
    """Adds the reference set of FID and FD_DINOv2: the whole dataset at the run's resolution, read
    on the first cache miss only and then kept for the other metric."""
    loaded = []

    def reference():
        if not loaded:
            loaded.append(
                A.prepare(A.load_images(run["ref_spec"], run["ref_dir"])[0], run["resolution"])
            )
        return loaded[0]

    run.update(
        reference=reference,
        ref_key=[run["ref_spec"], str(Path(run["ref_dir"]).resolve()), run["resolution"]],
    )
    return run


# ------------------------------------------------------------------------------------------------
# 4. The evaluation: networks once, then per run FID, FD_DINOv2, similarity and pixel metrics.
# Three networks, each with its own recipe: Inception-v3 for FID; DINOv2 (ViT-L/14 by default) as
# dgm-eval prepares its input for FD_DINOv2; DINOv2 (ViT-g/14) as the authors prepare it for the
# memorization similarity. One size for both DINOv2 uses loads that network once.
# ------------------------------------------------------------------------------------------------
SERVES = {
    "inception": "FID, KID, precision and recall",
    "fd_dinov2": "FD_DINOv2",
    "dinov2": "the DINOv2 similarity (pixel fallback instead)",
}


def wanted_networks(args):
    """name -> (weight file, its URL, the flag's path, build(path) -> network,
    network -> forward)."""

    def dinov2(size, explicit, forward):
        return (
            dinov2_file(size),
            DINOV2_URL.format(size),
            explicit,
            lambda p: dinov2_network(size, p),
            forward,
        )

    return {
        "inception": (
            INCEPTION_FILE,
            INCEPTION_URL,
            args.inception_weights,
            inception_network,
            lambda net: inception_forward(net, args.fid_resize),
        ),
        "fd_dinov2": dinov2(args.fd_dinov2, args.fd_dinov2_weights, dinov2_fd_forward),
        "dinov2": dinov2(args.dinov2, args.dinov2_weights, dinov2_forward),
    }


def networks(args, log):
    """{name: {'forward': callable or None, 'file': weights path or None, 'reason': why None}}."""
    nets, built = {}, {}  # built: weights path -> network, so one file is loaded once
    for name, (filename, url, explicit, build, forward) in wanted_networks(args).items():
        nets[name] = {"forward": None, "file": None, "reason": None}
        if args.pixels_only:
            nets[name]["reason"] = "--pixels-only"
            continue
        try:
            path = find_weights(filename, url, explicit, not args.no_download)
        except WeightsMissing as e:
            if args.require_weights:
                raise UserError(f"{name} weights missing: {e}") from None
            nets[name]["reason"] = str(e)
            log(f"note: {e.short}; skipping {SERVES[name]}")
            continue
        if str(path) not in built:
            built[str(path)] = build(path).to(args.device)
            log(f"{name}: weights {path}")
        nets[name].update(forward=forward(built[str(path)]), file=str(path))
    return nets


def net_features(nets, name, images, args, log, label):
    return features(nets[name]["forward"], images, args.batch, args.device, f"{label} {name}", log)


def net_key(nets, name, *recipe):
    """The part of a cache key that names the network, its weights file and how its input is
    prepared."""
    return [name, *recipe, Path(nets[name]["file"]).name]


def reference_statistics(feats):
    """What FID and KID need of the reference set: mean, covariance and (for KID's subsets) the
    features."""
    mu, cov = statistics(feats)
    return {"mu": mu, "cov": cov, "features": np.asarray(feats, np.float32)}


def fid_metrics(run, nets, args, log, name):
    """FID, KID, precision and recall, all from the same Inception features."""
    if nets["inception"]["forward"] is None:
        return {
            "fid": None,
            "fid_unavailable": nets["inception"]["reason"],
            "kid": None,
            "precision": None,
            "recall": None,
        }
    key = run["ref_key"] + net_key(nets, "inception", args.fid_resize, "kid")
    stats = cached(
        args.cache_dir,
        "inception-reference",
        key,
        lambda: reference_statistics(
            net_features(nets, "inception", run["reference"](), args, log, "reference")
        ),
        log,
    )
    gen = net_features(nets, "inception", run["samples"], args, log, name)
    return {
        "fid": frechet_distance_to(gen, stats["mu"], stats["cov"]),
        "fid_recipe": FID_RECIPES[args.fid_resize],
        **kid(gen, stats["features"], device=args.device),
        **precision_recall(gen, stats["features"], device=args.device),
    }


def fd_dinov2_metrics(run, nets, args, log, name):
    if nets["fd_dinov2"]["forward"] is None:
        return {"fd_dinov2": None, "fd_dinov2_unavailable": nets["fd_dinov2"]["reason"]}
    key = run["ref_key"] + net_key(nets, "fd_dinov2", args.fd_dinov2, "dgm-eval")
    stats = cached(
        args.cache_dir,
        "dinov2-reference",
        key,
        lambda: dict(
            zip(
                ("mu", "cov"),
                statistics(
                    net_features(nets, "fd_dinov2", run["reference"](), args, log, "reference")
                ),
                strict=True,
            )
        ),
        log,
    )
    gen = net_features(nets, "fd_dinov2", run["samples"], args, log, name)
    return {
        "fd_dinov2": frechet_distance_to(gen, stats["mu"], stats["cov"]),
        "fd_dinov2_recipe": fd_dinov2_recipe(args.fd_dinov2),
    }


def similarity(run, nets, args, log, name, pixel_nn):
    """Each sample's top-1 similarity to the training set and its index, with the row entries naming
    it: DINOv2 with the authors' recipe, or ambient.py's centred pixel cosine without its
    weights."""
    if nets["dinov2"]["forward"] is None:
        return (
            pixel_nn["cosine"].numpy(),
            pixel_nn["cosine_idx"].numpy(),
            {
                "similarity_space": "pixels, centred cosine",
                "similarity_unavailable": nets["dinov2"]["reason"],
                "similarity_recipe": (
                    "ambient.py's pixel fallback: cosine of mean-centred pixels (not the paper's)"
                ),
            },
        )
    key = run["train_key"] + net_key(nets, "dinov2", args.dinov2, "paper")
    train_feats = cached(
        args.cache_dir,
        "dinov2-train",
        key,
        lambda: {"features": net_features(nets, "dinov2", run["train"], args, log, "train")},
        log,
    )
    sims, idx = top1_cosine(
        net_features(nets, "dinov2", run["samples"], args, log, name), train_feats["features"]
    )
    return (
        sims,
        idx,
        {
            "similarity_space": f"DINOv2 {args.dinov2} CLS",
            "similarity_recipe": similarity_recipe(args.dinov2),
        },
    )


def evaluate_run(run, nets, args, log, name):
    """One column of the table, plus what the plots need."""
    samples, train = run["samples"], run["train"]
    thresholds = tuple(args.thresholds) if args.thresholds else thresholds_for(run["data"])
    row = {
        "samples": len(samples),
        "train_images": len(train),
        "resolution": run["resolution"],
        "sigma_tn": run["sigma_tn"],
        "method": run.get("method"),
        "mask_p": run.get("mask_p"),
        "thresholds": list(thresholds),
    }
    row.update(fid_metrics(run, nets, args, log, name))
    row.update(fd_dinov2_metrics(run, nets, args, log, name))
    pixel, pixel_nn = A.memorization_report(samples, train)
    sims, idx, space = similarity(run, nets, args, log, name, pixel_nn)
    row.update(space, **similarity_summary(sims, thresholds))
    row.update(
        pixel_copy_rate=pixel["copy_rate"],
        pixel_ratio_median=pixel["ratio_median"],
        roughness_vs_train=A.roughness(samples) / A.roughness(train),
    )
    row.update(heldout_metrics(run["heldout"]))
    if len(samples) < 10_000 and row["fid"] is not None:
        row["note"] = f"FID from {len(samples)} samples is biased upwards; the paper uses 50,000"
    return row, per_sample(run, sims, idx, pixel_nn, row["similarity_space"])


def heldout_metrics(heldout):
    """The held-out loss row: per level, per band and over all levels, or why it is n/a."""
    if isinstance(heldout, str):
        return {"heldout_loss": None, "heldout_unavailable": heldout}
    losses = heldout()
    bands = {name: heldout_band(losses, sigmas) for name, sigmas in HELDOUT_BANDS}
    return {
        "heldout_loss": heldout_band(losses, HELDOUT_SIGMAS),
        "heldout_loss_bands": bands,
        "heldout_loss_per_sigma": losses,
    }


def per_sample(run, sims, idx, pixel_nn, space):
    """Each sample's numbers for plots of one's own: the top-1 similarity and its training image (an
    index into the run's training subset, and into the whole dataset through indices.json), and the
    pixel d1/d2 with the L2-nearest training image."""
    to_dataset = np.asarray(
        run["indices"] if run.get("indices") is not None else np.arange(len(run["train"]))
    )
    pixel_idx = pixel_nn["l2_idx"].numpy()
    return {
        "similarity": sims,
        "similarity_space": np.array(space),
        "nearest_train": idx,
        "nearest_dataset": to_dataset[idx],
        "pixel_d1_d2": pixel_nn["ratio"].numpy(),
        "pixel_nearest_train": pixel_idx,
        "pixel_nearest_dataset": to_dataset[pixel_idx],
    }


# ------------------------------------------------------------------------------------------------
# 5. Report: Markdown on stdout, JSON, PNGs.
# ------------------------------------------------------------------------------------------------
PIXEL_COPY_RECIPE = (
    "ambient.py: L2 distance to the nearest training image over the second nearest's "
    "(Gu et al. 2023)"
)
ROUGHNESS_RECIPE = (
    "ambient.py: mean |difference| of neighbouring pixels, samples over training images; "
    "1 = as the data, white noise 2-3"
)
COPY_LEGEND = (
    "the similarity rows and the copy rate measure copying (lower = fewer copies; the paper seeks "
    "them low at an equal or better FID); a copy rate near 0 means nothing unless the quality rows "
    "(or roughness near 1) say the model learned the data"
)
LOWER_BETTER = (("fid", "FID"), ("kid", "KID"), ("fd_dinov2", "FD_DINOv2"))
LOWER_BETTER += (("heldout_loss", "the held-out loss"),)
UNAVAILABLE = {
    "fid_unavailable": "FID, KID, precision and recall",
    "kid_unavailable": "KID",
    "fd_dinov2_unavailable": "FD_DINOv2",
    "similarity_unavailable": "DINOv2 similarity",
    "heldout_unavailable": "held-out loss",
}


def markdown(rows, measured_only=False):
    """One column per run and a last one naming each metric's recipe (the same for every run).
    measured_only (--pixels-only): rows that are n/a for every run are left out."""
    first = next(iter(rows.values()))
    lines = ["| metric | " + " | ".join(rows) + " | recipe |", "|---" * (len(rows) + 2) + "|"]
    shown = []

    def line(label, key, fmt="{:.3f}", percent=False, recipe="", values=None):
        values = values or {name: r.get(key) for name, r in rows.items()}
        if measured_only and all(v is None for v in values.values()):
            return
        shown.append(key)
        cells = [
            "n/a" if v is None else f"{100 * v:.1f}%" if percent else fmt.format(v)
            for v in values.values()
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {recipe} |")

    line("FID (Inception-v3)", "fid", "{:.2f}", recipe=first.get("fid_recipe", "unavailable"))
    kid_cells = {
        k: None if r.get("kid") is None else f"{1e3 * r['kid']:.2f} +- {1e3 * r['kid_std']:.2f}"
        for k, r in rows.items()
    }
    line("KID x 1000", "kid", "{}", recipe=first.get("kid_recipe", "unavailable"), values=kid_cells)
    line("precision", "precision", recipe=first.get("pr_recipe", "unavailable"))
    line("recall", "recall")
    line("FD_DINOv2", "fd_dinov2", "{:.2f}", recipe=first.get("fd_dinov2_recipe", "unavailable"))
    line("held-out denoising loss, 10 levels", "heldout_loss", recipe=HELDOUT_RECIPE)
    for name, _ in HELDOUT_BANDS:
        bands = {k: r.get("heldout_loss_bands", {}).get(name) for k, r in rows.items()}
        line(f"held-out denoising loss, sigma {name}", f"heldout {name}", values=bands)
    line(
        f"similarity mean ({first['similarity_space']})",
        "similarity_mean",
        recipe=first["similarity_recipe"],
    )
    line("similarity median", "similarity_median")
    for th in first["thresholds"]:
        line(f"share with similarity > {th:g}", f"similarity_above_{th:g}", percent=True)
    line("pixel copy rate (d1/d2 < 1/3)", "pixel_copy_rate", percent=True, recipe=PIXEL_COPY_RECIPE)
    line("roughness vs training images", "roughness_vs_train", "{:.2f}", recipe=ROUGHNESS_RECIPE)
    for label, key, fmt in (
        ("samples", "samples", "{}"),
        ("training images", "train_images", "{}"),
        ("method", "method", "{}"),
        ("sigma_tn (EDM)", "sigma_tn", "{:g}"),
        ("mask p", "mask_p", "{:g}"),
    ):
        line(label, key, fmt)
    return "\n".join(lines + [""] + [f"- {n}" for n in report_notes(rows, shown)])


def legend(shown):
    """Which direction is better, for the quality rows shown, then what the copy rows measure."""
    lower = [name for key, name in LOWER_BETTER if key in shown]
    quality = "lower is better for " + ", ".join(lower) if lower else ""
    if "precision" in shown:
        quality += ", higher for precision and recall"
    return (quality + "; " if quality else "") + COPY_LEGEND


def report_notes(rows, shown):
    notes = [legend(shown)] + [
        f"{name}: the samples are {r['roughness_vs_train']:.1f}x as rough as the training images, "
        "as noise is: the model has not learned the data, so its copy rate says nothing"
        for name, r in rows.items()
        if r.get("roughness_vs_train", 0) > 1.5
    ]
    missing = {}  # why -> what was not measured for that reason, in the table's order
    for key, what in UNAVAILABLE.items():
        for why in dict.fromkeys(r[key] for r in rows.values() if key in r):
            missing.setdefault(why, []).append(what)
    notes += [f"not measured: {', '.join(what)} ({why})" for why, what in missing.items()]
    if any(r["similarity_space"].startswith("pixels") for r in rows.values()):
        notes.append(
            "the similarity rows use ambient.py's pixel fallback, not DINOv2: "
            "they are not comparable to the paper's numbers"
        )
    return notes + sorted({r["note"] for r in rows.values() if "note" in r})


def save_plots(rows, sims, out, log):
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        log(
            "note: matplotlib is not installed (pip install matplotlib); "
            "skipped the histogram and Pareto plot"
        )
        return []
    space = next(iter(rows.values()))["similarity_space"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, s in sims.items():
        ax.hist(
            s,
            bins=50,
            range=(min(0, min(x.min() for x in sims.values())), 1),
            alpha=0.5,
            label=name,
        )
    for th in next(iter(rows.values()))["thresholds"]:
        ax.axvline(th, color="k", lw=0.8, ls="--")
    ax.set(xlabel=f"top-1 similarity to the training set ({space})", ylabel="samples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "similarity_histogram.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4))
    th = next(iter(rows.values()))["thresholds"][1]
    mem = [r[f"similarity_above_{th:g}"] for r in rows.values()]
    if all(r["fid"] is not None for r in rows.values()):
        ax.plot(mem, [r["fid"] for r in rows.values()], "o-")
        ax.set(
            xlabel=f"memorization: share with similarity > {th:g}", ylabel="FID (lower is better)"
        )
    else:  # no quality axis without Inception: memorization against sigma_tn instead
        ax.plot([r["sigma_tn"] or 0 for r in rows.values()], mem, "o")
        ax.set(
            xlabel="sigma_tn (EDM units)",
            ylabel=f"share with similarity > {th:g}",
            title="FID unavailable: memorization against sigma_tn",
        )
    xs = ax.lines[0].get_xdata()
    ys = ax.lines[0].get_ydata()
    for name, x, y in zip(rows, xs, ys, strict=True):
        ax.annotate(name, (x, y), fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=120)
    plt.close(fig)
    return ["similarity_histogram.png", "pareto.png"]


# ------------------------------------------------------------------------------------------------
# 6. Command line.
# ------------------------------------------------------------------------------------------------
def build_parser():
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Weights: {INCEPTION_FILE} ({INCEPTION_URL}) and dinov2_<size>_pretrain.pth "
        f"({DINOV2_URL.format('<size>')}) for vitl14 (FD_DINOv2) and vitg14 "
        f"(similarity), in ${WEIGHTS_ENV} or the torch hub folder.",
    )
    a = p.add_argument
    a(
        "inputs",
        nargs="+",
        metavar="RUN_OR_IMAGES",
        help="run folders from ambient.py, or folders / .npz files of images",
    )
    a(
        "--train",
        help="the training set: cifar, demo, a .npz or a folder; needed for image inputs, and for "
        "run folders it replaces the dataset their config.json names (indices.json still picks the "
        "subset)",
    )
    a(
        "--ref",
        help="FID / FD_DINOv2 reference dataset (default: the run's whole dataset, or --train)",
    )
    a(
        "--data-dir",
        default=None,
        help="where cifar lives (default: the run's data_dir, else ./data)",
    )
    a(
        "--samples",
        type=int,
        default=None,
        help="score this many samples; runs generate more from their "
        "checkpoint when samples.npz holds fewer (default: all in samples.npz; paper: 50000)",
    )
    a("--batch", type=int, default=64, help="images per network batch (default 64)")
    a("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    a(
        "--dinov2",
        choices=tuple(DINOV2_SIZES),
        default="vitg14",
        help="DINOv2 size of the memorization similarity (paper: vitg14, the default)",
    )
    a(
        "--fd-dinov2",
        choices=tuple(DINOV2_SIZES),
        default="vitl14",
        help="DINOv2 size of FD_DINOv2 (dgm-eval and its leaderboard: vitl14, the default)",
    )
    a(
        "--fid-resize",
        choices=FID_RESIZES,
        default="tf1",
        help="how FID images reach 299 x 299: tf1 = EDM's fid.py and "
        "the paper (TF1 legacy bilinear on uint8, the default), "
        "pytorch-fid = pytorch-fid's half-pixel bilinear",
    )
    a(
        "--thresholds",
        type=float,
        nargs=3,
        metavar="T",
        help="similarity thresholds (default: 0.9 0.925 0.95, "
        "or 0.85 0.875 0.9 when the dataset name contains ffhq)",
    )
    a("--inception-weights", metavar="FILE", help=f"local {INCEPTION_FILE}")
    a(
        "--dinov2-weights",
        metavar="FILE",
        help="local dinov2_<size>_pretrain.pth for the similarity (--dinov2 size)",
    )
    a(
        "--fd-dinov2-weights",
        metavar="FILE",
        help="local dinov2_<size>_pretrain.pth for FD_DINOv2 (--fd-dinov2 size)",
    )
    a("--no-download", action="store_true", help="never try to download weights")
    a(
        "--require-weights",
        action="store_true",
        help="missing weights are an error instead of the pixel fallback",
    )
    a(
        "--pixels-only",
        action="store_true",
        help="skip the networks: ambient.py's pixel metrics only",
    )
    a(
        "--cache-dir",
        default="runs/eval-cache",
        help="reference statistics and training features (default runs/eval-cache)",
    )
    a(
        "--out",
        default="runs/eval",
        help="report.md, report.json and PNGs go here (default runs/eval)",
    )
    return p


def check_args(args):
    for flag in ("samples", "batch"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UserError(f"--{flag} {getattr(args, flag)} must be positive")
    if args.thresholds and not all(0 < t < 1 for t in args.thresholds):
        raise UserError(
            f"--thresholds {args.thresholds}: cosine thresholds lie between 0 and 1, "
            "e.g. 0.9 0.925 0.95"
        )


def run(args):
    check_args(args)
    args.device = A.pick_device(args.device)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    # every input is read and checked first: a bad one is reported alone, before the networks load
    runs = {}
    for spec in args.inputs:
        name = Path(spec).stem if Path(spec).suffix == ".npz" else Path(spec).resolve().name
        runs[name if name not in runs else f"{name}-{len(runs)}"] = load_input(spec, args, log)
    nets = networks(args, log)
    rows, sims, numbers, grids = {}, {}, {}, {}
    for name, run_ in runs.items():
        if "generate" in run_:
            run_["samples"] = run_.pop("generate")()
        rows[name], numbers[name] = evaluate_run(run_, nets, args, log, name)
        sims[name] = numbers[name]["similarity"]
        grids[name] = (run_["samples"], run_["train"], numbers[name]["nearest_train"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = save_plots(rows, sims, out, log)
    for name, arrays in numbers.items():
        np.savez(out / f"per_sample_{name}.npz", **arrays)
        files.append(f"per_sample_{name}.npz")
    for name, (
        samples,
        train,
        idx,
    ) in grids.items():  # most memorized first, beside their neighbours
        order = torch.as_tensor(np.argsort(-sims[name], kind="stable"))
        A.save_neighbour_grid(
            samples[order], train, torch.as_tensor(idx)[order], out / f"memorized_{name}.png"
        )
        files.append(f"memorized_{name}.png")
    table = markdown(rows, measured_only=args.pixels_only)
    print(table)
    (out / "report.md").write_text(table + "\n")
    (out / "report.json").write_text(
        json.dumps({"runs": rows, **{f"{k}_weights": v["file"] for k, v in nets.items()}}, indent=1)
    )
    log(f"wrote {out}/: report.md, report.json, " + ", ".join(files))
    return rows


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
