"""Train or fine-tune an R2D2 network: ``python -m cv2r2d2.train --images DIR --output r2d2.pt``.

The run is seeded and resumable: the network's initialisation, the data (see
:mod:`cv2r2d2.train.data`) and the samplers' random draws depend only on the seed, and
the resume file written every ``checkpoint_every`` steps and at each epoch's end holds
everything else (weights, optimiser, random state), so that an interrupted run resumed
with ``--resume`` ends with the weights an uninterrupted one would have.

The output is ``{"net": "Quad_L2Net_ConfCFS()", "state_dict": ...}``, the format of the
official checkpoints: ``cv2r2d2.R2D2Feature.create(model=path)`` loads it.
"""
from __future__ import annotations

import argparse
import logging
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..utils import atomic_path, logging_beside_progress, progress_bar, torch_device
from ..nets import R2D2Net, build_net
from ..weights import load_checkpoint, resolve_weights
from .data import (
    FlowPairs,
    HomographyPairs,
    PairDataset,
    SyntheticPairs,
    epoch_batches,
    list_images,
    make_loader,
)
from .losses import MultiLoss, default_loss

__all__ = ["TrainConfig", "Trainer", "train", "resume_path", "save_model", "main"]

logger = logging.getLogger(__name__)

DEFAULT_NET = "Quad_L2Net_ConfCFS()"

# Settings a resumed run may change; all others must equal the interrupted run's.
_FREE_ON_RESUME = {
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


def resume_path(output: str) -> Path:
    """The resume file that goes with an output file: ``r2d2.pt`` -> ``r2d2.resume.pt``."""
    path = Path(output)
    return path.with_name(path.stem + ".resume" + (path.suffix or ".pt"))


def save_model(net: nn.Module, net_string: str, path: Path, **extra: Any) -> None:
    """Write ``{"net": net_string, "state_dict": ..., **extra}`` (CPU tensors) atomically."""
    state_dict = {key: value.detach().cpu() for key, value in net.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"net": net_string, "state_dict": state_dict, **extra}, tmp)


class Trainer:
    """Network, loss, Adam optimiser and (optional) AMP gradient scaler.

    Args:
        net: the network (moved to ``device``, put in training mode).
        loss: a :class:`MultiLoss` (``default_loss()`` by default).
        device: torch device.
        lr, weight_decay: Adam's settings.
        amp: mixed precision.
    """

    def __init__(
        self,
        net: R2D2Net,
        loss: Optional[MultiLoss] = None,
        device: Any = "cpu",
        lr: float = 1e-4,
        weight_decay: float = 5e-4,
        amp: bool = False,
    ) -> None:
        self.device = torch.device(device)
        self.net = net.to(self.device).train()
        self.loss = (default_loss() if loss is None else loss).to(self.device)
        self.optimizer = torch.optim.Adam(
            [p for p in net.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay
        )
        self.amp = bool(amp)
        self.amp_dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp and self.device.type == "cuda")

    def step(self, batch: Dict[str, torch.Tensor]) -> Dict[str, float]:
        """One optimisation step on a batch of ``image1``, ``image2`` (B, 3, H, W) and
        ``aflow`` (B, 2, H, W); returns the loss terms."""
        image1, image2, aflow = (
            batch[key].to(self.device, non_blocking=True) for key in ("image1", "image2", "aflow")
        )
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
            output1, output2 = self.net(image1), self.net(image2)
        loss, details = self.loss(output1, output2, aflow)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the training loss is not finite: {details}")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return details

    def state_dict(self) -> Dict[str, Any]:
        """Optimiser and scaler state (plain types and tensors)."""
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])


def _initial_net(config: TrainConfig) -> Tuple[R2D2Net, str]:
    """The network to train and its architecture string."""
    if config.pretrained is None:
        net_string = config.net or DEFAULT_NET
        return build_net(net_string), net_string
    checkpoint = load_checkpoint(resolve_weights(config.pretrained))
    if config.net is not None and config.net.replace(" ", "") != checkpoint["net"].replace(" ", ""):
        raise ValueError(
            f"net {config.net!r} differs from the pretrained model's {checkpoint['net']!r}"
        )
    net = build_net(checkpoint["net"])
    net.load_state_dict(checkpoint["state_dict"])
    return net, checkpoint["net"]


def _datasets(config: TrainConfig) -> PairDataset:
    sources: List[object] = []
    if config.images:
        images = [image for entry in config.images for image in list_images(entry)]
        sources.append(SyntheticPairs(images, scale=config.scale))
    sources += [HomographyPairs(folder) for folder in config.homographies]
    sources += [FlowPairs(folder) for folder in config.flow_pairs]
    return PairDataset(sources, crop=config.crop, scale=config.scale, seed=config.seed)


def _plain_config(config: TrainConfig) -> Dict[str, Any]:
    return {
        key: list(value) if isinstance(value, tuple) else value
        for key, value in asdict(config).items()
    }


def _check_resumable(stored: Dict[str, Any], config: TrainConfig) -> None:
    current = _plain_config(config)
    changed = [
        f"{key}: {stored.get(key)!r} -> {current[key]!r}"
        for key in current
        if key not in _FREE_ON_RESUME and stored.get(key) != current[key]
    ]
    if changed:
        raise ValueError(
            "cannot resume with settings that change the training (rerun the interrupted "
            "command with --resume added): " + "; ".join(changed)
        )


class _Progress:
    """A tqdm bar with the loss terms when possible, else a log line every few steps."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self.every = max(1, total // 20)
        self.bar = progress_bar(total, enabled, unit="step", initial=initial)

    def update(self, step: int, total: int, epoch: int, details: Dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.set_description(f"epoch {epoch + 1}")
            terms = {k[len("loss_"):] or k: f"{v:.3f}" for k, v in details.items()}
            self.bar.set_postfix(terms, refresh=False)
            self.bar.update(1)
        elif step % self.every == 0 or step == total:
            terms = " ".join(f"{k}={v:.4f}" for k, v in details.items())
            logger.info("epoch %d step %d/%d %s", epoch + 1, step, total, terms)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _steps(dataset: PairDataset, config: TrainConfig, start: Tuple[int, int]
           ) -> Iterator[Tuple[int, int, int, Dict[str, torch.Tensor]]]:
    """(epoch, step in epoch, steps in epoch, batch) from ``start`` = (epoch, step) on."""
    for epoch in range(start[0], config.epochs):
        batches = epoch_batches(
            len(dataset), config.batch_size, epoch, config.seed, config.epoch_size
        )
        first = start[1] if epoch == start[0] else 0
        loader = make_loader(dataset, batches[first:], config.workers,
                             pin_memory=torch_device(config.device).type == "cuda")
        for step, batch in enumerate(loader, start=first + 1):
            yield epoch, step, len(batches), batch


def train(config: TrainConfig) -> Path:
    """Run a training; returns the path of the final checkpoint.

    The global torch random state is used under a fork, so it is the same after the
    call as before.
    """
    device = torch_device(config.device)
    dataset = _datasets(config)
    output, resume_file = Path(config.output), resume_path(config.output)
    steps_per_epoch = len(
        epoch_batches(len(dataset), config.batch_size, 0, config.seed, config.epoch_size)
    )
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(config.seed)
        net, net_string = _initial_net(config)
        trainer = Trainer(
            net, default_loss(config.N), device, config.lr, config.weight_decay, config.amp
        )
        start = (0, 0)
        if config.resume is not None:
            state = torch.load(config.resume, map_location="cpu", weights_only=True)
            if "training" not in state:
                raise ValueError(f"{config.resume} is not a resume file (no training state)")
            _check_resumable(state["training"]["config"], config)
            net.load_state_dict(state["state_dict"])
            trainer.load_state_dict(state["training"])
            torch.set_rng_state(state["training"]["rng"])
            start = (state["training"]["epoch"], state["training"]["step"])
            logger.info("resuming %s at epoch %d, step %d", config.resume, start[0] + 1, start[1])
        if start[1] >= steps_per_epoch:
            start = (start[0] + 1, 0)
        logger.info("training %s on %d pairs, %d steps per epoch, on %s",
                    net_string, len(dataset), steps_per_epoch, device)

        def save_state(epoch: int, step: int) -> None:
            save_model(net, net_string, resume_file, training={
                **trainer.state_dict(), "epoch": epoch, "step": step,
                "rng": torch.get_rng_state(), "config": _plain_config(config),
            })

        total = config.epochs * steps_per_epoch
        progress = _Progress(total, start[0] * steps_per_epoch + start[1], config.progress)
        sums: Dict[str, float] = {}
        count = 0
        try:
            for epoch, step, epoch_steps, batch in _steps(dataset, config, start):
                details = trainer.step(batch)
                done = epoch * steps_per_epoch + step
                progress.update(done, total, epoch, details)
                sums = {k: sums.get(k, 0.0) + v for k, v in details.items()}
                count += 1
                if step == epoch_steps:
                    logger.info("epoch %d: mean %s", epoch + 1,
                                " ".join(f"{k}={v / count:.4f}" for k, v in sums.items()))
                    sums, count = {}, 0
                periodic = config.checkpoint_every and done % config.checkpoint_every == 0
                if step == epoch_steps or periodic:
                    save_state(epoch, step)
        except KeyboardInterrupt:
            if resume_file.exists():
                logger.warning("interrupted; continue with --resume %s", resume_file)
            else:
                logger.warning("interrupted before the first checkpoint")
            raise
        finally:
            progress.close()
        save_model(net, net_string, output)
    logger.info("wrote %s", output)
    return output


def _parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    defaults = TrainConfig(images=["."])
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train or fine-tune R2D2 (Revaud et al., NeurIPS 2019) on your images.",
    )
    data = parser.add_argument_group("training data (at least one)")
    data.add_argument("--images", nargs="+", action="extend", default=[], metavar="DIR",
                      help="folders of single images: synthetic pairs by perspective tilt")
    data.add_argument("--homographies", nargs="+", action="extend", default=[], metavar="DIR",
                      help="HPatches-style folders: 1.ppm .. 6.ppm and H_1_k")
    data.add_argument("--flow-pairs", nargs="+", action="extend", default=[], metavar="DIR",
                      help="folders with 1.<ext>, k.<ext> and flow_1_k.npy (absolute flow)")
    add = parser.add_argument
    add("--output", default=defaults.output, help="final checkpoint (default: %(default)s)")
    add("--net", default=None,
        help=f"architecture (default: {DEFAULT_NET} or the pretrained one's)")
    add("--pretrained", default=None, metavar="NAME_OR_PATH",
        help="fine-tune these weights (e.g. r2d2_WASF_N16 or a .pt file)")
    settings = {
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
    for name, (kind, text) in settings.items():
        default = getattr(defaults, name)
        add("--" + name.replace("_", "-"), type=kind, default=default,
            help=text if default is None else text + " (default: %(default)s)")
    add("--scale", type=int, nargs=2, default=defaults.scale, metavar=("MIN", "MAX"),
        help="shorter side range of the rescaled images (default: %(default)s)")
    add("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    add("--amp", action="store_true", help="mixed precision")
    add("--resume", default=None, metavar="FILE", help="resume file (OUTPUT stem + .resume.pt)")
    add("--no-progress", dest="progress", action="store_false", help="no progress bar")
    add("-q", "--quiet", action="store_true", help="log warnings only")
    return parser


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """Command-line entry point (``cv2r2d2-train``; ``python -m cv2r2d2.train`` passes
    its own ``prog``, the name the usage line shows; None: the script's name)."""
    parser = _parser(prog)
    args = vars(parser.parse_args(argv))
    logging.basicConfig(level=logging.WARNING if args.pop("quiet") else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s")
    names = {f.name for f in fields(TrainConfig)}
    try:
        config = TrainConfig(**{k: v for k, v in args.items() if k in names})
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))
    try:
        with logging_beside_progress():
            train(config)
    except KeyboardInterrupt:
        return 130
    return 0
