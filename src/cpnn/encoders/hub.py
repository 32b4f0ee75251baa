"""Pathology and ImageNet encoders from the Hugging Face hub / timm (optional extra ``hub``).

Nothing here imports timm, huggingface_hub, transformers or conch at import time; each
factory imports what it needs and turns a missing package, a gated model or no network
into a :class:`CPNNInputError` that says what to do. Every timm-based encoder also accepts
``weights=PATH``: a local checkpoint (``.pth``/``.bin``/``.pt`` or ``.safetensors``) loaded
into the same architecture with no network access.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from cpnn.errors import CPNNInputError
from cpnn.encoders.registry import Encoder, register_encoder

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# OpenAI CLIP statistics, used by CONCH
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# H-optimus-0's own statistics (its model card)
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)

HUB_INSTALL = "pip install 'cpnn[hub]'"


def _require(module: str, name: str, install: str = HUB_INSTALL) -> Any:
    if importlib.util.find_spec(module) is None:
        raise CPNNInputError(
            f"encoder {name!r} needs the optional package {module!r}, which is not installed.",
            field="encoder", fix=f"{install} (or choose the offline default 'efficientnet-lite0').",
        )
    return importlib.import_module(module)


def _hub_error(name: str, repo: str, exc: BaseException) -> CPNNInputError:
    return CPNNInputError(
        f"could not load encoder {name!r} from the Hugging Face hub repository {repo!r} "
        f"({type(exc).__name__}: {exc}). Downloading it needs network access to the "
        "Hugging Face hub, and the model is gated: its terms must be accepted first.",
        field="encoder",
        fix=(
            f"request access on https://huggingface.co/{repo}, then log in with "
            "`huggingface-cli login` or set the HF_TOKEN environment variable, on a machine "
            "with network access; or pass a local weights file: "
            f"create_encoder({name!r}, weights=PATH)."
        ),
    )


def _read_state_dict(path: str) -> Dict[str, Any]:
    import torch

    p = Path(path)
    if not p.is_file():
        raise CPNNInputError("weights file not found.", path=p, field="weights",
                             fix="pass the path of an existing checkpoint file.")
    try:
        if p.suffix == ".safetensors":
            st = _require("safetensors.torch", "weights", "pip install safetensors")
            state = st.load_file(str(p))
        else:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
    except CPNNInputError:
        raise
    except Exception as exc:
        from ..errors import first_line  # without torch's advice to load unsafely

        raise CPNNInputError(f"cannot read the weights file ({type(exc).__name__}: {first_line(exc)}).",
                             path=p, field="weights",
                             fix="pass a PyTorch state dict (.pth/.bin/.pt) or .safetensors file.") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise CPNNInputError("the weights file does not hold a state dict.", path=p,
                             field="weights", fix="save the model with torch.save(model.state_dict(), PATH).")
    # checkpoints saved from DataParallel / compiled modules
    prefixes = ("module.", "_orig_mod.")
    return {next((k[len(pr):] for pr in prefixes if k.startswith(pr)), k): v for k, v in state.items()}


def _load_local(model: Any, path: str, name: str, ignore: tuple = ()) -> Any:
    state = _read_state_dict(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # a classification head (or, for truncated networks, the dropped layers) in the
    # checkpoint is fine: the encoders do not use them
    unexpected = [k for k in unexpected
                  if not k.startswith(("head.", "fc.", "classifier.") + tuple(ignore))]
    if missing or unexpected:
        raise CPNNInputError(
            f"the weights do not match the architecture of {name!r}: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]}).",
            path=path, field="weights", fix=f"pass the checkpoint published for {name!r}.",
        )
    return model


def _is_download_error(exc: BaseException) -> bool:
    # huggingface_hub's errors (gated, not found, offline) derive from OSError or live in
    # the http stacks it uses; anything else is a genuine failure to build the model
    module = type(exc).__module__ or ""
    return isinstance(exc, (OSError, ConnectionError, TimeoutError)) or module.startswith(
        ("huggingface_hub", "requests", "urllib3", "httpx"))


def _build_error(name: str, package: str, exc: BaseException) -> CPNNInputError:
    return CPNNInputError(
        f"{package} could not build encoder {name!r} ({type(exc).__name__}: {exc}).",
        field="encoder", fix=f"upgrade it: pip install -U {package}.")


def _timm_model(name: str, repo: str, hub_id: str, arch: str, kwargs: Dict[str, Any],
                weights: Optional[str], ignore: tuple = ()) -> Any:
    timm = _require("timm", name)
    if weights is not None:
        model = timm.create_model(arch, pretrained=False, **kwargs)
        return _load_local(model, os.fspath(weights), name, ignore)
    try:
        return timm.create_model(hub_id, pretrained=True, **kwargs)
    except Exception as exc:
        if _is_download_error(exc):
            raise _hub_error(name, repo, exc) from exc
        raise _build_error(name, "timm", exc) from exc


def _cls_token(model: Any, x: Any) -> Any:
    return model(x)


def _virchow_tokens(model: Any, x: Any) -> Any:
    import torch

    tokens = model(x)  # (B, 1 + 4 registers + 256 patches, 1280)
    return torch.cat([tokens[:, 0], tokens[:, 5:].mean(dim=1)], dim=1)


def _timm_factory(name: str, repo: str, hub_id: str, arch: str, dim: int,
                  mean=IMAGENET_MEAN, std=IMAGENET_STD, input_px: int = 224,
                  kwargs: Optional[Callable[[], Dict[str, Any]]] = None,
                  forward: Callable[[Any, Any], Any] = _cls_token,
                  channels_last: bool = False, ignore: tuple = ()) -> None:
    """Register a timm-based encoder under ``name``."""

    def factory(device: str = "cpu", weights: Optional[str] = None) -> Encoder:
        _require("timm", name)  # before kwargs(), which may reference timm
        kw = kwargs() if kwargs is not None else {}
        model = _timm_model(name, repo, hub_id, arch, kw, weights, ignore)
        return Encoder(name, model, dim=dim, input_px=input_px, mean=mean, std=std,
                       forward=forward, device=device, channels_last=channels_last,
                       weights=os.fspath(weights) if weights is not None else hub_id)

    factory.__name__ = f"create_{name.replace('-', '_')}"
    factory.__doc__ = f"{name}: {dim}-d features, {input_px} px input (timm, {hub_id})."
    register_encoder(name, dim=dim, input_px=input_px, weights="hub", source=repo,
                     requires=("timm", "huggingface_hub"))(factory)


def _uni2_kwargs() -> Dict[str, Any]:
    import timm
    import torch

    return dict(img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5,
                embed_dim=1536, mlp_ratio=2.66667 * 2, num_classes=0, no_embed_class=True,
                mlp_layer=timm.layers.SwiGLUPacked, act_layer=torch.nn.SiLU, reg_tokens=8,
                dynamic_img_size=True)


def _virchow2_kwargs() -> Dict[str, Any]:
    import timm
    import torch

    return dict(img_size=224, init_values=1e-5, num_classes=0, mlp_ratio=5.3375,
                global_pool="", dynamic_img_size=True, reg_tokens=4, no_embed_class=True,
                mlp_layer=timm.layers.SwiGLUPacked, act_layer=torch.nn.SiLU)


def _resnet50_trunc(model: Any, x: Any) -> Any:
    # CLAM's ResNet50 features: output of layer3 (1,024 channels), average pooled
    return model(x)[-1].mean(dim=(2, 3))


_timm_factory("uni", "MahmoodLab/UNI", "hf-hub:MahmoodLab/uni", "vit_large_patch16_224", 1024,
              kwargs=lambda: dict(img_size=224, patch_size=16, init_values=1e-5,
                                  num_classes=0, dynamic_img_size=True))
_timm_factory("uni2-h", "MahmoodLab/UNI2-h", "hf-hub:MahmoodLab/UNI2-h", "vit_giant_patch14_224",
              1536, kwargs=_uni2_kwargs)
_timm_factory("h-optimus-0", "bioptimus/H-optimus-0", "hf-hub:bioptimus/H-optimus-0",
              "vit_giant_patch14_reg4_dinov2", 1536, mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD,
              kwargs=lambda: dict(img_size=224, num_classes=0, global_pool="token",
                                  init_values=1e-5, dynamic_img_size=False))
_timm_factory("virchow2", "paige-ai/Virchow2", "hf-hub:paige-ai/Virchow2", "vit_huge_patch14_224",
              2560, kwargs=_virchow2_kwargs, forward=_virchow_tokens)
_timm_factory("prov-gigapath", "prov-gigapath/prov-gigapath", "hf_hub:prov-gigapath/prov-gigapath",
              "vit_giant_patch14_dinov2", 1536,
              kwargs=lambda: dict(img_size=224, in_chans=3, patch_size=16, embed_dim=1536,
                                  depth=40, num_heads=24, init_values=1e-5, mlp_ratio=5.33334,
                                  num_classes=0))
_timm_factory("dinov2-vits14", "timm/vit_small_patch14_dinov2.lvd142m",
              "vit_small_patch14_dinov2.lvd142m", "vit_small_patch14_dinov2", 384,
              kwargs=lambda: dict(img_size=224, num_classes=0))
_timm_factory("dinov2-vitl14", "timm/vit_large_patch14_dinov2.lvd142m",
              "vit_large_patch14_dinov2.lvd142m", "vit_large_patch14_dinov2", 1024,
              kwargs=lambda: dict(img_size=224, num_classes=0))
_timm_factory("resnet50", "timm/resnet50.tv_in1k", "resnet50.tv_in1k", "resnet50", 1024,
              kwargs=lambda: dict(features_only=True, out_indices=(3,)),
              forward=_resnet50_trunc, channels_last=True, ignore=("layer4.",))


@register_encoder("phikon-v2", dim=1024, input_px=224, weights="hub", source="owkin/phikon-v2",
                  requires=("transformers",))
def phikon_v2(device: str = "cpu", weights: Optional[str] = None) -> Encoder:
    """Phikon-v2 (owkin/phikon-v2, ViT-L/16 DINOv2), CLS token, 1,024-d, 224 px.

    ``weights`` may be a local folder saved with ``save_pretrained`` (config + weights).
    """
    transformers = _require("transformers", "phikon-v2", f"{HUB_INSTALL} transformers")
    source = os.fspath(weights) if weights is not None else "owkin/phikon-v2"
    try:
        model = transformers.AutoModel.from_pretrained(source)
    except Exception as exc:
        if weights is not None:
            raise CPNNInputError(f"cannot load phikon-v2 from {source} ({exc}).", path=source,
                                 field="weights",
                                 fix="pass a folder written by model.save_pretrained().") from exc
        if _is_download_error(exc):
            raise _hub_error("phikon-v2", "owkin/phikon-v2", exc) from exc
        raise _build_error("phikon-v2", "transformers", exc) from exc

    def forward(m: Any, x: Any) -> Any:
        return m(pixel_values=x).last_hidden_state[:, 0, :]

    return Encoder("phikon-v2", model, dim=1024, input_px=224, mean=IMAGENET_MEAN,
                   std=IMAGENET_STD, forward=forward, device=device, weights=source)


@register_encoder("conch", dim=512, input_px=448, weights="hub", source="MahmoodLab/CONCH", requires=("conch",))
def conch(device: str = "cpu", weights: Optional[str] = None) -> Encoder:
    """CONCH (MahmoodLab/CONCH, ViT-B/16) image embedding before projection, 512-d, 448 px.

    Needs the ``conch`` package (https://github.com/mahmoodlab/CONCH).
    """
    _require("conch", "conch", "pip install git+https://github.com/Mahmoodlab/CONCH.git")
    from conch.open_clip_custom import create_model_from_pretrained

    try:
        if weights is not None:
            model, _ = create_model_from_pretrained("conch_ViT-B-16", checkpoint_path=os.fspath(weights))
        else:
            model, _ = create_model_from_pretrained("conch_ViT-B-16", "hf_hub:MahmoodLab/conch")
    except Exception as exc:
        if weights is not None:
            raise CPNNInputError(f"cannot load CONCH weights ({exc}).", path=weights, field="weights",
                                 fix="pass the pytorch_model.bin published for CONCH.") from exc
        if _is_download_error(exc):
            raise _hub_error("conch", "MahmoodLab/CONCH", exc) from exc
        raise _build_error("conch", "conch", exc) from exc

    def forward(m: Any, x: Any) -> Any:
        return m.encode_image(x, proj_contrast=False, normalize=False)

    return Encoder("conch", model, dim=512, input_px=448, mean=CLIP_MEAN, std=CLIP_STD,
                   forward=forward, device=device,
                   weights=os.fspath(weights) if weights is not None else "hf_hub:MahmoodLab/conch")
