"""Options shared by the ``cv2r2d2`` commands: R2D2's settings (a preset and the options
that override it), matching, Ray, the model and device, output verbosity; and what they make
(the configuration, the matching thresholds, the executor, the model of the steerers)."""
from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any, Optional, Sequence, Tuple, Union

from ..config import BACKENDS, R2D2Config
from ..presets import DEFAULT_PRESET, preset_names

__all__ = ["add_output_options", "add_device_option", "add_feature_options", "feature_config",
           "create_feature", "add_matching_options", "matching_thresholds", "add_rotations_option",
           "add_ray_options", "make_executor", "report_failed", "add_model_option", "steerers_model"]

if TYPE_CHECKING:
    from ..collection import LocalExecutor
    from ..distributed import RayExecutor

_PARAM_HELP = {
    "scale_f": "ratio between consecutive pyramid scales",
    "min_size": "smallest longer side of a pyramid level, pixels",
    "max_size": "largest longer side of a pyramid level, pixels",
    "min_scale": "smallest pyramid scale",
    "max_scale": "largest pyramid scale (<= 1)",
    "reliability_thr": "minimum keypoint reliability, in [0, 1]",
    "repeatability_thr": "minimum keypoint repeatability, in [0, 1]",
    "nfeatures": "keypoints kept per image, best first (0: all)",
    "unique_radius": "keep one keypoint of those from different pyramid levels within this "
                     "many pixels, the best (set it for a ratio test; 0: off)",
}


def add_output_options(parser: argparse.ArgumentParser, colmap: bool = False) -> None:
    """-q and -v (with ``colmap``, -v shows COLMAP's own log too)."""
    group = parser.add_argument_group("output")
    group.add_argument("-q", "--quiet", action="store_true",
                       help="no progress bar, warnings and errors only")
    group.add_argument("-v", "--verbose", action="store_true",
                       help="debug messages" + (" and COLMAP's own log" if colmap else ""))


def add_device_option(parser: argparse.ArgumentParser) -> None:
    """--device, the torch device."""
    parser.add_argument("--device", default=None,
                        help="torch device, e.g. cpu or cuda:0 (default: CUDA if available)")


def add_feature_options(parser: argparse.ArgumentParser, default_preset: str = DEFAULT_PRESET
                         ) -> None:
    """R2D2 options: R2D2Config's fields (create()'s arguments). Those not given take the
    value of --preset; only the options given reach the configuration."""
    from ..weights import MODELS

    paper = R2D2Config()
    group = parser.add_argument_group(
        f"R2D2 (defaults: the preset's; {default_preset!r} unless --preset names another)",
        argument_default=argparse.SUPPRESS)
    group.add_argument("--preset", default=None, choices=preset_names(),
                       help="named settings, 'cv2r2d2 presets' lists them; the options "
                            f"below override its values (default: {default_preset})")
    group.add_argument("--model",
                       help=f"{', '.join(MODELS)}, or a checkpoint / .onnx path "
                            f"(paper: {paper.model})")
    group.add_argument("--backend", choices=BACKENDS,
                       help="torch; onnxruntime or opencv run an exported .onnx model; "
                            f"reference runs the network as the original code (paper: "
                            f"{paper.backend})")
    add_device_option(group)
    subpixel = group.add_mutually_exclusive_group()
    subpixel.add_argument("--subpixel", action="store_true",
                          help="refine keypoint positions to sub-pixel accuracy")
    subpixel.add_argument("--subpixel-descriptor", action="store_true",
                          help="refine them further by a mean-shift on the descriptor map "
                               "(implies --subpixel)")
    subpixel.add_argument("--no-subpixel", action="store_true",
                          help="the original's keypoint positions (the paper's)")
    from ..precision import PRECISIONS

    group.add_argument("--precision", choices=PRECISIONS,
                       help="fp32: exact; bf16: torch backend, fast where the CPU computes bf16 "
                            "natively; int8: ONNX Runtime network built on first use and "
                            "cached; auto: the fastest measured within 0.01 MMA@3 on this CPU "
                            f"(paper: {paper.precision})")
    group.add_argument("--tile-size", type=int,
                       help="run pyramid levels larger than this squared on tiles, "
                            f"bounding memory (0: never; paper: {paper.tile_size})")
    for name, default in paper.params.as_dict().items():
        group.add_argument("--" + name.replace("_", "-"), dest=name, type=type(default),
                           help=f"{_PARAM_HELP.get(name, name)} (paper: {default})")


def feature_config(args: argparse.Namespace, default_preset: str = DEFAULT_PRESET) -> R2D2Config:
    """The configuration of the R2D2 options: the preset's values, overridden by the
    options given on the command line."""
    given = {name: getattr(args, name) for name in R2D2Config.argument_names()
             if hasattr(args, name) and name != "preset"}
    if getattr(args, "subpixel_descriptor", False):
        given["subpixel"] = "descriptor"
    if getattr(args, "no_subpixel", False):
        given["subpixel"] = False
    return R2D2Config.from_arguments(preset=args.preset or default_preset, **given)


def create_feature(args: argparse.Namespace) -> Any:
    """The R2D2Feature of the R2D2 options."""
    from ..feature2d import R2D2Feature

    return R2D2Feature(feature_config(args))


def add_matching_options(parser: argparse.ArgumentParser, pairs_required: bool) -> None:
    """--pairs (required, or exhaustive by default), --max-distance, --ratio and --rotations."""
    group = parser.add_argument_group("matching (mutual nearest neighbours)")
    group.add_argument("--pairs", required=pairs_required,
                       default=None if pairs_required else "exhaustive",
                       help="exhaustive, sequential[:k] (each image with the k next ones by "
                            "name, k=5 by default), retrieval:k (each image with its k most "
                            "similar by visual words, as 'cv2r2d2 pairs' gives) or "
                            "a file of 'name0 name1' lines"
                            + ("" if pairs_required else " (default: %(default)s)"))
    group.add_argument("--max-distance", type=float, default=argparse.SUPPRESS,
                       help="drop matches farther apart than this L2 distance (default: the "
                            "preset's, none but in --preset ratio's)")
    group.add_argument("--ratio", type=float, default=argparse.SUPPRESS,
                       help="drop matches failing Lowe's ratio test at this ratio, both ways "
                            "(default: the preset's: 0.75 for ratio, none for the others)")
    add_rotations_option(group)


def matching_thresholds(args: argparse.Namespace, preset: str) -> dict:
    """max_distance and ratio: the preset's, overridden by the options given."""
    from ..presets import get_preset

    options = dict(dict(max_distance=None, ratio=None), **get_preset(preset).matching)
    options.update({name: getattr(args, name) for name in options if hasattr(args, name)})
    return options


def add_rotations_option(parser: Any) -> None:
    """--rotations, the steering angles matching tries."""
    parser.add_argument("--rotations", type=int, default=1, metavar="N",
                        help="views may be rotated in the image plane: estimate each pair's "
                             "rotation among N steering angles (k * 360 / N degrees, N a "
                             "divisor of 360, e.g. 12) and match under it, with the steerers "
                             "of the model (fitted on first use); 1: plain matching "
                             "(default: %(default)s)")


def add_ray_options(parser: argparse.ArgumentParser, actors: bool, shards: bool = True) -> None:
    """--ray and --block-size; with ``actors``, --actors and --threads; with ``shards``
    (outputs written as shards), --merge."""
    group = parser.add_argument_group("Ray cluster (pip install 'cv2r2d2[ray]')")
    group.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                       help="run on Ray: alone, a local Ray started for the run; 'auto', "
                            "'host:port' or 'ray://host:port', that cluster (images and "
                            "outputs on a file system all nodes share)")
    if actors:
        group.add_argument("--actors", type=int, default=None,
                           help="models run at once (default: one per GPU of the cluster, "
                                "else its CPUs / --threads)")
        group.add_argument("--threads", type=int, default=None,
                           help="CPU threads per actor without GPUs (default: 4, at most "
                                "a node's CPUs)")
    group.add_argument("--block-size", type=int, default=None,
                       help="items per Ray task and per shard file (default: about 4 per "
                            "worker, at most 64)")
    if shards:
        group.add_argument("--merge", action="store_true",
                           help="end with one .h5 file instead of a master file of links "
                                "to the shards")


def make_executor(args: argparse.Namespace) -> Union["LocalExecutor", "RayExecutor"]:
    """Where extract, match, pairs and localize run: this machine, or the Ray cluster of
    --ray and its options (a missing Ray fails here, before anything is written)."""
    if args.ray is None:
        from ..collection import LocalExecutor

        if getattr(args, "merge", False):
            raise ValueError("--merge goes with --ray (without it the output is one file)")
        return LocalExecutor()
    from ..distributed import RayExecutor

    return RayExecutor(address=args.ray, actors=getattr(args, "actors", None),
                       threads=getattr(args, "threads", None), block_size=args.block_size,
                       merge=getattr(args, "merge", False))


def report_failed(failed: Sequence[Tuple[str, str]]) -> None:
    """Say on stderr which images could not be read, and why."""
    if failed:
        print(f"{len(failed)} image(s) could not be read and were skipped:", file=sys.stderr)
        for name, reason in failed:
            print(f"  {name}: {reason}", file=sys.stderr)


def add_model_option(parser: Any, purpose: str, recorded: bool = False) -> None:
    """--model; with ``recorded``, its default is the model the features record."""
    from ..weights import DEFAULT_MODEL, MODELS

    default = f"the one FEATURES record, else {DEFAULT_MODEL}" if recorded else "%(default)s"
    parser.add_argument("--model", default=None if recorded else DEFAULT_MODEL,
                        help=f"{purpose}: {', '.join(MODELS)}, or a checkpoint / .onnx path "
                             f"(default: {default})")


def steerers_model(args: argparse.Namespace, model: Optional[str] = None) -> Any:
    """The R2D2Feature of ``model`` (None: --model), on the backend its file needs, for
    its steerers."""
    from ..feature2d import R2D2Feature

    model = model or args.model
    backend = "onnxruntime" if str(model).lower().endswith(".onnx") else "torch"
    return R2D2Feature.create(model=model, device=args.device, backend=backend)
