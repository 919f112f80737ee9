"""Training of R2D2 networks (Revaud et al., NeurIPS 2019): samplers, losses, pairs, trainer.

Never imported by the inference code. Command line: ``cv2r2d2 train --help`` (also
``cv2r2d2-train`` and ``python -m cv2r2d2.train``). The names below are imported on
first use, so that :mod:`cv2r2d2.train.config` (what the command line reads) does not
import torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "FullSampler": "samplers", "SubSampler": "samplers", "NghSampler2": "samplers",
    "Samples": "samplers",
    "APLoss": "losses", "PixelAPLoss": "losses", "ReliabilityLoss": "losses",
    "CosimLoss": "losses", "PeakyLoss": "losses", "MultiLoss": "losses",
    "default_loss": "losses",
    "Pair": "data", "SyntheticPairs": "data", "HomographyPairs": "data", "FlowPairs": "data",
    "PairDataset": "data", "make_loader": "data",
    "TrainConfig": "config",
    "Trainer": "trainer", "train": "trainer",
}

__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
