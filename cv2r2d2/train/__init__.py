"""Training of R2D2 networks (Revaud et al., NeurIPS 2019): samplers, losses, pairs, trainer.

Never imported by the inference code. Command line: ``python -m cv2r2d2.train --help``.
"""
from .data import FlowPairs, HomographyPairs, Pair, PairDataset, SyntheticPairs, make_loader
from .losses import (
    APLoss, CosimLoss, MultiLoss, PeakyLoss, PixelAPLoss, ReliabilityLoss, default_loss,
)
from .samplers import FullSampler, NghSampler2, Samples, SubSampler
from .trainer import TrainConfig, Trainer, train

__all__ = [
    "FullSampler", "SubSampler", "NghSampler2", "Samples",
    "APLoss", "PixelAPLoss", "ReliabilityLoss", "CosimLoss", "PeakyLoss", "MultiLoss",
    "default_loss",
    "Pair", "SyntheticPairs", "HomographyPairs", "FlowPairs", "PairDataset", "make_loader",
    "TrainConfig", "Trainer", "train",
]
