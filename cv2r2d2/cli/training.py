"""The ``train`` command (also ``cv2r2d2-train`` and ``python -m cv2r2d2.train``)."""
from __future__ import annotations

import argparse
from typing import Any

from .options import add_device_option, add_output_options


__all__ = ["add_train", "train_arguments"]


def train_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``cv2r2d2 train``: the fields of TrainConfig (its defaults, the paper's)."""
    from ..train.config import DEFAULT_NET, SETTING_HELP, TrainConfig

    defaults = TrainConfig(images=["."])
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
    for name, (kind, text) in SETTING_HELP.items():
        default = getattr(defaults, name)
        add("--" + name.replace("_", "-"), type=kind, default=default,
            help=text if default is None else text + " (default: %(default)s)")
    add("--scale", type=int, nargs=2, default=defaults.scale, metavar=("MIN", "MAX"),
        help="shorter side range of the rescaled images (default: %(default)s)")
    add_device_option(parser)
    add("--amp", action="store_true", help="mixed precision")
    add("--resume", default=None, metavar="FILE", help="resume file (OUTPUT stem + .resume.pt)")
    add("--no-progress", dest="progress", action="store_false",
        help="no progress bar (-q also turns it off)")
    add_output_options(parser)
    parser.set_defaults(run=_run_train, command="train")


def add_train(subparsers: Any) -> None:
    """Add the ``train`` subcommand."""
    parser = subparsers.add_parser(
        "train", help="train or fine-tune R2D2 on your images",
        description="Train or fine-tune R2D2 (Revaud et al., NeurIPS 2019) on your images.",
    )
    train_arguments(parser)


def _run_train(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from ..train.config import TrainConfig

    settings = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    settings["progress"] = settings["progress"] and not args.quiet
    config = TrainConfig(**settings)
    from ..train.trainer import train

    try:
        train(config)
    except KeyboardInterrupt:
        return 130  # the trainer has said how to resume
    return 0
