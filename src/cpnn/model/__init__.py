"""User-facing CPNN model: fit, predict, save and load."""
from .cpnn_model import CPNN
from .scaling import FeatureScaler

__all__ = ["CPNN", "FeatureScaler"]
