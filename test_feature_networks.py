"""Facts about feature_networks.py: each test checks an identity, a closed form, or behaviour a
user relies on.

Random-init networks of the real architectures and small generated data: nothing is downloaded.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

import feature_networks as N


def test_dinov2_size_flag_builds_the_published_architectures():
    """DINOv2 paper: ViT-S/14 21M, ViT-B/14 86M, ViT-L/14 300M, ViT-g/14 1.1B parameters (on the
    meta device: no memory used)."""
    published = {"vits14": 21e6, "vitb14": 86e6, "vitl14": 300e6, "vitg14": 1.1e9}
    for size, count in published.items():
        with torch.device("meta"):
            net = N.DINOv2(size)
        assert abs(sum(p.numel() for p in net.parameters()) / count - 1) < 0.06, size
    # ViT-g: 40 blocks of width 1536, SwiGLU of hidden width 2/3 of 4 x 1536 (the hub checkpoint's)
    assert len(net.blocks) == 40 and net.norm.normalized_shape == (1536,)
    assert net.blocks[0].mlp.w3.in_features == 4096


# ---------------------------------------------------------------------------------------------
# The FID Inception-v3 is pytorch-fid's own network, bit for bit
# ---------------------------------------------------------------------------------------------
def pytorch_fid_built(build, state=None):
    """pytorch-fid's build(pf) as pytorch-fid runs it, its download answered with `state`; without
    a state, its load is skipped and the random initialisation kept. Patching is for tests only."""
    from unittest import mock

    import torchvision
    from pytorch_fid import inception as pf

    with mock.patch.object(pf, "load_state_dict_from_url", lambda *a, **k: state):
        if state is not None:
            return build(pf)
        skip = mock.patch.object(torchvision.models.Inception3, "load_state_dict", lambda *a: None)
        with skip:
            return build(pf)


def pytorch_fid_pool3(pf):
    pool3 = pf.InceptionV3.BLOCK_INDEX_BY_DIM[2048]
    return pf.InceptionV3([pool3], resize_input=False, normalize_input=False)


def test_fid_inception_is_pytorch_fids_own_network_bit_for_bit(tmp_path):
    """Our FID features equal pytorch-fid's InceptionV3 pool3 on the same input, to the last bit:
    loaded from a weight file in the released layout (random weights, batch-norm statistics moved
    off 0 and 1 so that each one counts), and, without a file, drawn from the same seed as
    pytorch-fid draws them."""
    gen = torch.Generator().manual_seed(20)
    # pytorch-fid's raw Inception3: its state dict has the released file's layout
    state = pytorch_fid_built(lambda pf: pf.fid_inception_v3()).state_dict()
    for name, value in state.items():
        if name.endswith("running_mean"):
            value.copy_(torch.randn(value.shape, generator=gen) * 0.1)
        elif name.endswith("running_var"):
            value.copy_(torch.rand(value.shape, generator=gen) + 0.5)
    torch.save(state, tmp_path / N.INCEPTION_FILE)
    x = torch.rand(1, 3, 32, 32, generator=gen) * 2 - 1  # one image: a forward pass takes a second
    with torch.no_grad():
        ours = N.inception_forward(N.inception_network(tmp_path / N.INCEPTION_FILE))(x)
        theirs = pytorch_fid_built(pytorch_fid_pool3, state).eval()
        theirs = theirs(N.inception_input(x))[0].flatten(1)
        assert ours.shape == (1, 2048) and ours.std() > 0 and torch.equal(ours, theirs)
        torch.manual_seed(3)
        ours = N.inception_forward(N.inception_network(None))(x)
        torch.manual_seed(3)
        theirs = pytorch_fid_built(pytorch_fid_pool3).eval()
        theirs = theirs(N.inception_input(x))[0].flatten(1)
        assert ours.std() > 0 and torch.equal(ours, theirs)


# ---------------------------------------------------------------------------------------------
# DINOv2 against the official code (fixtures/make_dinov2_fixture.py ran facebookresearch/dinov2)
# ---------------------------------------------------------------------------------------------
FIXTURE = Path(__file__).with_name("fixtures") / "dinov2_tiny.npz"


@pytest.mark.parametrize("tag, mlp", [("mlp", "mlp"), ("swiglu", "swiglu")])
def test_dinov2_matches_the_official_code_at_42_and_224_pixels(tag, mlp, monkeypatch):
    """Same parameter names (strict load) and the same CLS token as the official forward pass,
    with the position embeddings interpolated from 37x37 to 3x3 and to 16x16."""
    f = np.load(FIXTURE)
    width, depth, heads = f[f"{tag}:config"].tolist()
    monkeypatch.setitem(N.DINOV2_SIZES, f"tiny-{tag}", (width, depth, heads, mlp))
    net = N.DINOv2(f"tiny-{tag}").eval()
    prefix = f"{tag}:state:"
    net.load_state_dict(
        {
            k[len(prefix) :]: torch.from_numpy(f[k].astype(np.float32))
            for k in f.files
            if k.startswith(prefix)
        },
        strict=True,
    )
    for side in ("42", "224"):
        x = torch.from_numpy(f[f"input_{side}"]).float() / 255
        with torch.no_grad():
            assert np.allclose(net(x).numpy(), f[f"{tag}:cls_{side}"], atol=1e-5, rtol=0), side


# ---------------------------------------------------------------------------------------------
# FID input as EDM's detector prepares it: TF1's legacy bilinear resize, then (v - 128) / 128
# ---------------------------------------------------------------------------------------------
def test_tf1_resize_follows_the_legacy_formula_and_differs_from_half_pixel_bilinear():
    """Output i reads position i * n_in / n_out: its floor and the next pixel, clamped at the edge,
    blended."""
    up = N.resize_bilinear_tf1(torch.tensor([[[[0.0, 3.0], [6.0, 9.0]]]]), (3, 3))
    # positions 0, 2/3, 4/3 on both axes: 4/3 has floor 1 and its neighbour clamps to 1
    assert torch.equal(up, torch.tensor([[[[0.0, 2.0, 3.0], [4.0, 6.0, 7.0], [6.0, 8.0, 9.0]]]]))
    # positions 0, 2/3, ..., 10/3
    row = N.resize_bilinear_tf1(torch.tensor([[[[0.0, 3.0, 6.0, 12.0]]]]), (1, 6))
    assert torch.allclose(row, torch.tensor([[[[0.0, 2.0, 4.0, 6.0, 10.0, 12.0]]]]), atol=1e-6)
    # positions 0, 1.5, 3, 4.5
    down = N.resize_bilinear_tf1(torch.arange(6.0).view(1, 1, 1, 6), (1, 4))
    assert torch.allclose(down, torch.tensor([[[[0.0, 1.5, 3.0, 4.5]]]]))
    half_pixel = torch.nn.functional.interpolate(
        torch.arange(6.0).view(1, 1, 1, 6), size=(1, 4), mode="bilinear", align_corners=False
    )
    # (i + 1/2) 6/4 - 1/2
    assert torch.allclose(half_pixel, torch.tensor([[[[0.25, 1.75, 3.25, 4.75]]]]))
    half_pixel_up = torch.nn.functional.interpolate(
        torch.tensor([[[[0.0, 3.0]]]]), size=(1, 3), mode="bilinear"
    )
    # where TF1 gives 0, 2, 3
    assert torch.allclose(half_pixel_up, torch.tensor([[[[0.0, 1.5, 3.0]]]]))


def test_fid_input_scales_uint8_values_by_v_minus_128_over_128_or_as_pytorch_fid():
    """A horizontal ramp v = 8 c (c = 0..31) in channel 0, 0 and 255 in the others. Bilinear
    resizing reproduces a linear ramp exactly, so each output column j holds 8 p(j) for the input
    position it reads, clamped to the last column: p = 32 j / 299 (tf1) or 32 (j + 1/2) / 299 - 1/2
    (pytorch-fid)."""
    values = torch.zeros(2, 3, 32, 32)
    values[:, 0], values[:, 2] = 8 * torch.arange(32.0), 255
    x = values / 127.5 - 1  # as ambient.prepare stores uint8 images
    j = torch.arange(299, dtype=torch.float64)
    for resize, position, scale in (
        ("tf1", j * 32 / 299, lambda v: (v - 128) / 128),
        ("pytorch-fid", (j + 0.5) * 32 / 299 - 0.5, lambda v: 2 * v / 255 - 1),
    ):
        got = N.inception_input(x, resize)
        assert got.shape == (2, 3, 299, 299)
        ramp = scale(8 * position.clamp(0, 31)).float()
        assert torch.allclose(got[:, 0], ramp.expand(2, 299, 299), atol=1e-5), resize
        flat = scale(values[:, 1:, :1, :1]).expand(2, 2, 299, 299)
        assert torch.allclose(got[:, 1:], flat, atol=1e-6), resize
    assert N.inception_input(x, "tf1")[0, 2, 0, 0] == 127 / 128  # 255 -> 0.9921875, not 1


# ---------------------------------------------------------------------------------------------
# SSCD: GeM pooling, DCR's input recipe, its weight files read weights-only in either layout
# ---------------------------------------------------------------------------------------------
def test_gem_pooling_is_the_generalised_mean_between_average_and_max():
    """A channel holding 1 and 2 (and one holding 3 everywhere): p = 1 gives 1.5 and 3, p = 3 gives
    ((1 + 8) / 2)^(1/3) and 3, and a large p approaches the max, 2."""
    x = torch.tensor([[[[1.0, 2.0]], [[3.0, 3.0]]]], dtype=torch.float64)
    assert torch.allclose(N.GeM(1.0)(x), torch.tensor([[1.5, 3.0]], dtype=torch.float64))
    assert torch.allclose(N.GeM(3.0)(x), torch.tensor([[4.5 ** (1 / 3), 3.0]], dtype=torch.float64))
    assert abs(N.GeM(200.0)(x)[0, 0] - 2) < 0.01


def test_sscd_input_is_dcrs_resize_crop_and_half_normalisation():
    """A 256 x 256 image is not resized, only cropped at offset 16: its pixel (16, 16) lands at
    (0, 0); values v become (v / 255 - 0.5) / 0.5. A flat 300 x 400 image stays flat, 224 x 224."""
    values = torch.zeros(1, 3, 256, 256)
    values[0, :, 16, 16] = 255
    values[0, :, 15, 15] = 51
    got = N.sscd_input(values / 127.5 - 1)
    assert got.shape == (1, 3, 224, 224) and torch.all(got[0, :, 0, 0] == 1)
    assert (got == -1).sum() == 3 * (224 * 224 - 1)  # the pixel at 15 falls outside the crop
    flat = N.sscd_input(torch.full((2, 3, 300, 400), 102 / 127.5 - 1))
    assert flat.shape == (2, 3, 224, 224) and torch.allclose(
        flat, torch.tensor(102 / 255 / 0.5 - 1)
    )
    # DCR's own transform (torchvision on PIL images), on images taller and wider than square
    from PIL import Image
    from torchvision import transforms

    dcr = transforms.Compose(
        [
            transforms.Resize(256),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(0.5, 0.5),
        ]
    )
    rng = np.random.default_rng(5)
    for h, w in ((300, 457), (457, 300)):
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
        assert torch.allclose(N.sscd_input(x)[0], dcr(Image.fromarray(image)), atol=1e-6)


def test_sscd_loads_a_bare_torchvision_state_dict_weights_only_and_gives_unit_descriptors(tmp_path):
    """A bare torchvision ResNet's state dict loads into SSCD's Model layout (backbone.*) with the
    same output, 512-d and of norm 1; a file holding a pickled callable is refused and the callable
    never runs (torch.jit.load or full unpickling would run it)."""
    torch.manual_seed(4)
    net = N.sscd_network()
    torch.save(net.backbone.state_dict(), tmp_path / "bare.pt")
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        want = net(x)
        for p in net.parameters():  # what the load must overwrite
            p.add_(1)
        N.load_state_dict(net, tmp_path / "bare.pt", "SSCD", N.with_backbone_prefix)
        assert torch.equal(net(x), want)
    assert want.shape == (1, 512) and torch.allclose(want.norm(dim=1), torch.ones(1))
    marker = tmp_path / "ran"
    torch.save({"fc.weight": Planted(marker)}, tmp_path / "planted.pt")
    with pytest.raises(N.UserError, match="is not a SSCD"):
        N.load_state_dict(net, tmp_path / "planted.pt", "SSCD", N.with_backbone_prefix)
    assert not marker.exists()


class Planted:
    """Unpickling this calls os.system: what full unpickling (weights_only=False) would run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch '{self.marker}'",)
