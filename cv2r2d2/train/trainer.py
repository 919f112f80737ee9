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

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from ..nets import R2D2Net, build_net
from ..utils import atomic_path, progress_bar, torch_device
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
from .config import DEFAULT_NET, FREE_ON_RESUME, TrainConfig
from .losses import MultiLoss, default_loss

__all__ = ["TrainConfig", "Trainer", "train", "resume_path", "save_model"]

logger = logging.getLogger(__name__)

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
        lr: Adam's learning rate.
        weight_decay: Adam's weight decay.
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
        if key not in FREE_ON_RESUME and stored.get(key) != current[key]
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
