"""Pixels -> features: an encoder registry and factory, CLAM/TRIDENT feature files and
batched, resumable extraction.

>>> from cpnn.encoders import create_encoder, list_encoders
>>> enc = create_encoder("efficientnet-lite0")       # offline default, 1,280-d
>>> feats = enc.encode(patches_uint8_bhwc)             # float32 (B, 1280)

Hub encoders (``uni``, ``uni2-h``, ``h-optimus-0``, ``virchow2``, ``phikon-v2``,
``prov-gigapath``, ``conch``, ``dinov2-*``, ``resnet50``) need ``pip install 'cpnn[hub]'``
and import their packages only when created.
"""
from cpnn.encoders.registry import Encoder, create_encoder, encoder_info, list_encoders, register_encoder
from cpnn.encoders import efficientnet as _efficientnet  # noqa: F401  (registers encoders)
from cpnn.encoders import hub as _hub  # noqa: F401  (registers encoders)
from cpnn.encoders.features import (
    FeatureFile,
    read_feature_attrs,
    read_feature_file,
    write_feature_file,
)
from cpnn.encoders.extract import encode_batches, extract_spot_features, extract_tile_features

__all__ = [
    "Encoder",
    "create_encoder",
    "encoder_info",
    "list_encoders",
    "register_encoder",
    "FeatureFile",
    "read_feature_file",
    "read_feature_attrs",
    "write_feature_file",
    "encode_batches",
    "extract_spot_features",
    "extract_tile_features",
]
