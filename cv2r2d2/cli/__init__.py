"""The ``cv2r2d2`` command line: the parser, ``main`` and ``train_main``, and the log setup
every command runs under.

Subcommands: ``extract`` (features of a photo collection), ``match`` (mutual nearest
neighbours), ``pairs`` (image retrieval), ``sfm`` (COLMAP reconstruction), ``localize`` (poses
of photos against a model), ``eval-hpatches`` (the HPatches benchmark), ``heatmap`` (a dense
map drawn over an image), ``presets``, ``export-onnx``, ``train``, ``fit-steerers`` (rotation
steerers of a model). Each is a pair of functions, ``add_<name>(subparsers)`` and
``_run_<name>(args) -> int``, in the module of its kind (``collection``: extract, match,
pairs; ``reconstruction``: localize, sfm; ``evaluation``: eval-hpatches, heatmap;
``models``: presets, export-onnx, fit-steerers; ``training``: train), listed in
``COMMANDS``; ``options`` holds the options they share.

Heavy modules (torch, pycolmap, h5py) are imported by the subcommand that needs them,
so that ``cv2r2d2 --help`` answers at once.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Callable, Optional, Sequence, Tuple

from ..utils import logging_beside_progress
from ..weights import LICENCE_LOGGER
from .collection import add_extract, add_match, add_pairs
from .evaluation import add_eval_hpatches, add_heatmap
from .models import add_export_onnx, add_fit_steerers, add_presets
from .reconstruction import add_localize, add_sfm
from .training import add_train, train_arguments

__all__ = ["main", "build_parser"]

logger = logging.getLogger(__name__)


COMMANDS: Tuple[Callable[[Any], None], ...] = (
    add_presets, add_extract, add_match, add_pairs, add_localize, add_sfm, add_eval_hpatches,
    add_heatmap, add_export_onnx, add_train, add_fit_steerers,
)


def build_parser() -> argparse.ArgumentParser:
    """The ``cv2r2d2`` argument parser with all subcommands."""
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="cv2r2d2",
        description="R2D2 local features for photo collections: extraction, matching, "
                    "COLMAP reconstruction, HPatches evaluation, heatmaps, rotation steerers.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status (0: success)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return int(exc.code or 0)
    return _execute(args)


def train_main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """``cv2r2d2-train`` and ``python -m cv2r2d2.train``: ``cv2r2d2 train`` under its own
    name (``prog``, the name the usage line shows; None: the script's name)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train or fine-tune R2D2 (Revaud et al., NeurIPS 2019) on your images.")
    train_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return _execute(args)


def _execute(args: argparse.Namespace) -> int:
    """Run a parsed command with the package's log on stderr (above any progress bar)."""
    package_logger = logging.getLogger("cv2r2d2")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    level = package_logger.level
    licence_logger = logging.getLogger(LICENCE_LOGGER)
    licence_level = licence_logger.level
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.DEBUG if args.verbose
                            else logging.WARNING if args.quiet else logging.INFO)
    if args.quiet:  # the licence notice is no warning of something wrong
        licence_logger.setLevel(logging.ERROR)
    try:
        with logging_beside_progress(package_logger):
            return args.run(args)
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except (ValueError, OSError, KeyError, ImportError, RuntimeError) as exc:
        logger.debug("traceback", exc_info=True)
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"cv2r2d2 {args.command}: error: {message}", file=sys.stderr)
        return 1
    finally:
        package_logger.removeHandler(handler)
        package_logger.setLevel(level)
        licence_logger.setLevel(licence_level)
