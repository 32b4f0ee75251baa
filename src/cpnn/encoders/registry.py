"""Encoder registry and factory: a name -> factory map, and the `Encoder` wrapper.

The preprocessing an encoder needs (input size, mean, std) travels with it, like timm's
``pretrained_cfg``, so extraction code never has to know which model it is running.
torch is imported inside functions: importing this module stays cheap.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from cpnn.errors import CPNNInputError

_REGISTRY: Dict[str, Callable[..., "Encoder"]] = {}
_INFO: Dict[str, Dict[str, Any]] = {}

#: test-time augmentation name -> number of views averaged
TTA_VIEWS = {"none": 1, "flips": 4, "flips8": 8}


def register_encoder(name: str, **info: Any) -> Callable[[Callable[..., "Encoder"]], Callable[..., "Encoder"]]:
    """Register ``factory`` under ``name`` (used as a decorator).

    Parameters
    ----------
    name
        Registry name, e.g. ``"efficientnet-lite0"``. Names are case-insensitive.
    **info
        What ``cpnn encoders`` lists without building the model: ``dim`` (feature
        size), ``input_px`` (input side), ``weights`` (``"offline"`` or ``"hub"``),
        ``source`` (package or hub repository), ``requires`` (optional packages).

    Returns
    -------
    callable
        A decorator that stores the factory and returns it unchanged. The factory is
        called as ``factory(device=..., **kw)`` and must return an :class:`Encoder`.
    """
    key = name.lower()

    def decorator(factory: Callable[..., "Encoder"]) -> Callable[..., "Encoder"]:
        if key in _REGISTRY and _REGISTRY[key] is not factory:
            raise ValueError(f"encoder {name!r} is already registered")
        _REGISTRY[key] = factory
        _INFO[key] = dict(info)
        return factory

    return decorator


def list_encoders() -> List[str]:
    """Names of all registered encoders, sorted."""
    return sorted(_REGISTRY)


def encoder_info(name: str) -> Dict[str, Any]:
    """What the registry knows of ``name`` without building it: ``name``, ``dim``,
    ``input_px``, ``weights`` (``"offline"``/``"hub"``), ``source``, ``requires`` and
    ``missing`` (required packages not installed). Unknown facts are None."""
    import importlib.util

    key = str(name).lower()
    if key not in _REGISTRY:
        raise CPNNInputError(f"unknown encoder {name!r}.", field="encoder", fix=f"use one of: {', '.join(list_encoders())}.")
    info = {"name": key, "dim": None, "input_px": None, "weights": None, "source": None, "requires": ()}
    info.update(_INFO.get(key, {}))
    info["requires"] = tuple(info["requires"] or ())
    info["missing"] = tuple(m for m in info["requires"] if importlib.util.find_spec(m) is None)
    return info


def create_encoder(name: str = "efficientnet-lite0", device: str = "cpu", **kw: Any) -> "Encoder":
    """Build a registered encoder, in eval mode on ``device``.

    Parameters
    ----------
    name
        A name from :func:`list_encoders`.
    device
        Torch device string (``"cpu"``, ``"cuda"``, ``"cuda:1"``...).
    **kw
        Passed to the factory, e.g. ``weights=PATH`` for hub encoders.

    Returns
    -------
    Encoder

    Raises
    ------
    CPNNInputError
        Unknown name, a missing optional package, or weights that cannot be obtained.
    """
    factory = _REGISTRY.get(str(name).lower())
    if factory is None:
        raise CPNNInputError(
            f"unknown encoder {name!r}.",
            field="encoder",
            fix=f"use one of: {', '.join(list_encoders())}.",
        )
    return factory(device=device, **kw)


class Encoder:
    """A frozen image encoder with its preprocessing.

    Parameters
    ----------
    name
        Registry name (stored in feature files).
    model
        The torch module (moved to ``device``, put in eval mode, gradients off).
    dim
        Feature dimension D.
    input_px
        Side of the square input the model expects; other sizes are resized.
    mean, std
        Per-channel normalisation of images scaled to [0, 1].
    forward
        ``forward(model, x) -> (B, D)`` tensor; defaults to ``model(x)``.
    device
        Torch device string.
    channels_last
        Run convolutions in channels-last memory format (faster on CPU for CNNs).
    weights
        Where the weights came from (for provenance only).
    """

    def __init__(
        self,
        name: str,
        model: Any,
        dim: int,
        input_px: int,
        mean: Sequence[float],
        std: Sequence[float],
        forward: Optional[Callable[[Any, Any], Any]] = None,
        device: str = "cpu",
        channels_last: bool = False,
        weights: Optional[str] = None,
    ) -> None:
        import torch

        self.name = name
        self.dim = int(dim)
        self.input_px = int(input_px)
        self.mean: Tuple[float, float, float] = tuple(float(m) for m in mean)  # type: ignore[assignment]
        self.std: Tuple[float, float, float] = tuple(float(s) for s in std)  # type: ignore[assignment]
        self.device = torch.device(device)
        self.channels_last = bool(channels_last)
        self.weights = weights
        self._forward = forward
        model = model.eval().to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model
        # uint8 -> normalised float in one multiply-add: (x/255 - mean)/std
        mean_t = torch.tensor(self.mean, dtype=torch.float32, device=self.device)
        std_t = torch.tensor(self.std, dtype=torch.float32, device=self.device)
        self._scale = (1.0 / (255.0 * std_t)).view(1, 3, 1, 1)
        self._shift = (-mean_t / std_t).view(1, 3, 1, 1)

    @property
    def config(self) -> Dict[str, Any]:
        """The preprocessing and provenance of this encoder, as plain values."""
        return {
            "name": self.name,
            "dim": self.dim,
            "input_px": self.input_px,
            "mean": list(self.mean),
            "std": list(self.std),
            "weights": self.weights,
        }

    def __repr__(self) -> str:
        return (
            f"Encoder(name={self.name!r}, dim={self.dim}, input_px={self.input_px}, "
            f"device={str(self.device)!r})"
        )

    def preprocess(self, batch: Any) -> Any:
        """uint8 (B, H, W, 3) numpy/torch -> normalised float (B, 3, input_px, input_px) tensor."""
        import torch
        import torch.nn.functional as F

        x = _as_uint8_tensor(batch)
        x = x.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        if x.shape[-2:] != (self.input_px, self.input_px):
            # antialias: downsampling large patches without it aliases nuclei texture
            x = F.interpolate(
                x, size=(self.input_px, self.input_px), mode="bilinear",
                align_corners=False, antialias=True,
            ).clamp_(0.0, 255.0)
        x = x * self._scale + self._shift
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def forward_preprocessed(self, x: Any) -> Any:
        """Run the model on an already preprocessed tensor; returns a (B, D) tensor."""
        out = self._forward(self.model, x) if self._forward is not None else self.model(x)
        return out.reshape(out.shape[0], -1)

    def encode(self, batch: Any, tta: str = "none") -> np.ndarray:
        """Features of a batch of RGB patches.

        Parameters
        ----------
        batch
            uint8 array or tensor of shape (B, H, W, 3); resized to ``input_px`` if needed.
        tta
            Test-time augmentation: ``"none"``; ``"flips"`` = mean over the identity,
            horizontal flip, vertical flip and 180° rotation; ``"flips8"`` = mean over
            the 8 flips/rotations of the square (dihedral group), which makes features
            invariant to the orientation of the tissue.

        Returns
        -------
        numpy.ndarray
            float32, shape (B, D).
        """
        import torch

        if tta not in TTA_VIEWS:
            raise CPNNInputError(
                f"unknown test-time augmentation {tta!r}.",
                field="tta", fix=f"use one of {sorted(TTA_VIEWS)}.",
            )
        with torch.inference_mode():
            x = self.preprocess(batch)
            if x.shape[0] == 0:
                return np.zeros((0, self.dim), dtype=np.float32)
            acc = None
            for view in _tta_views(x, tta):
                out = self.forward_preprocessed(view).float()
                acc = out if acc is None else acc.add_(out)
            acc = acc / TTA_VIEWS[tta]
            feats = acc.cpu().numpy().astype(np.float32, copy=False)
        if feats.shape[1] != self.dim:
            raise RuntimeError(
                f"encoder {self.name!r} returned {feats.shape[1]} features, expected {self.dim}"
            )
        return feats


def _tta_views(x: Any, tta: str):
    import torch

    yield x
    if tta == "none":
        return
    yield torch.flip(x, dims=(3,))  # horizontal
    yield torch.flip(x, dims=(2,))  # vertical
    yield torch.flip(x, dims=(2, 3))  # 180 degrees
    if tta == "flips8":
        t = x.transpose(2, 3)  # transpose + the three above = the other 4 elements of D4
        yield t
        yield torch.flip(t, dims=(3,))
        yield torch.flip(t, dims=(2,))
        yield torch.flip(t, dims=(2, 3))


def _as_uint8_tensor(batch: Any) -> Any:
    import torch

    if isinstance(batch, np.ndarray):
        if batch.dtype != np.uint8:
            raise CPNNInputError(
                f"image batch has dtype {batch.dtype}, expected uint8.",
                field="batch", fix="pass RGB patches as uint8 (0-255) arrays.",
            )
        t = torch.from_numpy(np.ascontiguousarray(batch))
    elif isinstance(batch, torch.Tensor):
        if batch.dtype != torch.uint8:
            raise CPNNInputError(
                f"image batch has dtype {batch.dtype}, expected torch.uint8.",
                field="batch", fix="pass RGB patches as uint8 (0-255) tensors.",
            )
        t = batch
    else:
        raise CPNNInputError(
            f"image batch is a {type(batch).__name__}, expected a numpy array or torch tensor.",
            field="batch", fix="stack patches into a uint8 array of shape (B, H, W, 3).",
        )
    if t.ndim != 4 or t.shape[-1] != 3:
        raise CPNNInputError(
            f"image batch has shape {tuple(t.shape)}, expected (B, H, W, 3).",
            field="batch", fix="pass channels-last RGB patches; add a batch axis for one patch.",
        )
    return t
