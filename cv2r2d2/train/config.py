"""Training settings (torch-free, so that the command line can describe them cheaply)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

__all__ = ["DEFAULT_NET", "FREE_ON_RESUME", "TrainConfig", "SETTING_HELP"]

DEFAULT_NET = "Quad_L2Net_ConfCFS()"
"""The architecture trained when no other is named (nor a pretrained model's)."""

# Settings a resumed run may change; all others must equal the interrupted run's.
FREE_ON_RESUME = {
    "epochs", "output", "resume", "device", "workers", "checkpoint_every", "progress",
}


@dataclass
class TrainConfig:
    """Training settings; the defaults are the paper's.

    Attributes:
        images: folders (or files) of single images: synthetic pairs by perspective tilt.
        homographies: HPatches-style folders (``1.ppm``, ``k.ppm``, ``H_1_k``).
        flow_pairs: folders of pairs with a stored flow (``1.*``, ``k.*``, ``flow_1_k.npy``).
        output: the final checkpoint file.
        net: architecture string (default ``Quad_L2Net_ConfCFS()``, or the pretrained one's).
        pretrained: model name or checkpoint path to fine-tune.
        epochs, batch_size: number of epochs; pairs per step.
        lr, weight_decay: Adam's learning rate and weight decay.
        N: patch size of the repeatability losses (pixels, even).
        crop: training crop size (pixels).
        scale: (min, max) shorter side of the rescaled images (pixels).
        epoch_size: pairs per epoch (None: the number of pairs, rounded up to a batch).
        seed: seed of every random draw.
        device: torch device (None: CUDA when available, else the CPU).
        amp: mixed precision (float16 on CUDA, bfloat16 on the CPU).
        workers: data-loading processes (0: in the main process; default: up to 4, one
            per CPU).
        checkpoint_every: steps between resume checkpoints (0: at epoch ends only).
        resume: resume file of an interrupted run.
        progress: show a progress bar (when stderr is a terminal and tqdm is installed).
    """

    images: List[str] = field(default_factory=list)
    homographies: List[str] = field(default_factory=list)
    flow_pairs: List[str] = field(default_factory=list)
    output: str = "r2d2_trained.pt"
    net: Optional[str] = None
    pretrained: Optional[str] = None
    epochs: int = 25
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 5e-4
    N: int = 16
    crop: int = 192
    scale: Tuple[int, int] = (256, 1024)
    epoch_size: Optional[int] = None
    seed: int = 0
    device: Optional[str] = None
    amp: bool = False
    workers: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))
    checkpoint_every: int = 0
    resume: Optional[str] = None
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("images", "homographies", "flow_pairs"):
            value = getattr(self, name)
            if isinstance(value, (str, os.PathLike)):
                raise TypeError(f"{name} must be a list of folders, got a single {value!r}")
            setattr(self, name, [os.fspath(v) for v in value])
        if not (self.images or self.homographies or self.flow_pairs):
            raise ValueError("no training data: give images, homographies or flow_pairs folders")
        for name in ("epochs", "batch_size", "crop"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("workers", "checkpoint_every", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if self.epoch_size is not None and self.epoch_size < self.batch_size:
            raise ValueError(f"epoch_size must be >= batch_size, got {self.epoch_size!r}")
        if not self.lr > 0 or not self.weight_decay >= 0:
            raise ValueError(
                f"expected lr > 0 and weight_decay >= 0, got {self.lr!r}, {self.weight_decay!r}"
            )
        self.scale = tuple(self.scale)
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale must be (min, max) with 0 < min <= max, got {self.scale!r}")


# Command-line help of the TrainConfig fields that are plain numbers (cv2r2d2 train).
SETTING_HELP = {
    "epochs": (int, "number of epochs"),
    "batch_size": (int, "pairs per step"),
    "lr": (float, "Adam's learning rate"),
    "weight_decay": (float, "Adam's weight decay"),
    "N": (int, "patch size of the repeatability losses (pixels, even)"),
    "crop": (int, "training crop size (pixels)"),
    "epoch_size": (int, "pairs per epoch (default: the number of pairs, rounded up to "
                        "a whole batch)"),
    "seed": (int, "seed of every random draw"),
    "workers": (int, "data-loading processes"),
    "checkpoint_every": (int, "steps between resume checkpoints, besides epoch ends"),
}
