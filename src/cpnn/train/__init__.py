"""Training: one epoch loop (``trainer.fit_epochs``: minibatches of bags, AdamW, StepLR,
clipping, early stopping) shared by CPNN (one or many processes), the slide baselines and the MLP probe."""
from .bags import BagData
from .loop import predict_bags, train_cpnn
from .trainer import TrainResult, fit_epochs

__all__ = ["BagData", "TrainResult", "fit_epochs", "predict_bags", "train_cpnn"]
