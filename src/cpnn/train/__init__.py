"""The training loop: minibatches of bags, AdamW, StepLR, clipping, early stopping."""
from .bags import BagData
from .loop import TrainResult, predict_bags, train_cpnn

__all__ = ["BagData", "TrainResult", "predict_bags", "train_cpnn"]
