"""The commands that show what a model does: ``eval-hpatches`` (the paper's benchmark)
and ``heatmap`` (a dense map drawn over an image)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, List

from .options import (
    add_feature_options, add_output_options, add_rotations_option, create_feature,
    feature_config,
)

__all__ = ["add_eval_hpatches", "add_heatmap"]

METHODS = ("r2d2", "sift", "orb")


def _methods(text: str) -> List[str]:
    names = list(dict.fromkeys(n.strip().lower() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"methods must be a comma-separated list of {', '.join(METHODS)}, got {text!r}")
    return names


def add_eval_hpatches(subparsers: Any) -> None:
    """Add the ``eval-hpatches`` subcommand."""
    parser = subparsers.add_parser(
        "eval-hpatches",
        help="HPatches matching accuracy, repeatability and matching score (the paper's "
             "benchmark)",
        description="D2-Net's HPatches-sequences protocol, as reported by the R2D2 paper: "
                    "mutual nearest-neighbour matches of image 1 with images 2..6, mean "
                    "matching accuracy at 1..10 px per illumination (i_*), viewpoint (v_*) "
                    "and overall, on the sequences ROOT holds (the 8 high-resolution ones "
                    "are left out); and the detector's repeatability and the matching score "
                    "at 1..10 px, over the smaller count of keypoints in the region both "
                    "images see. SIFT and ORB keep --nfeatures keypoints too.",
    )
    parser.add_argument("root", metavar="ROOT", help="hpatches-sequences-release or alike")
    parser.add_argument("--methods", type=_methods, default=["r2d2", "sift"],
                        help=f"comma-separated, of {', '.join(METHODS)} (default: r2d2,sift)")
    parser.add_argument("-o", "--output", default="hpatches-mma.json",
                        help="results JSON file (default: %(default)s)")
    plot = parser.add_mutually_exclusive_group()
    plot.add_argument("--plot", default=None,
                      help="plot of the metrics, PNG (default: beside the results, the same "
                           "name with .png)")
    plot.add_argument("--no-plot", dest="plot", action="store_const", const="",
                      help="no plot (no matplotlib needed)")
    add_rotations_option(parser)
    add_feature_options(parser)
    add_output_options(parser)
    parser.set_defaults(run=_run_eval_hpatches)


def _baseline(method: str, nfeatures: int) -> Any:
    import cv2

    if method == "sift":
        return cv2.SIFT_create(nfeatures=nfeatures)
    return cv2.ORB_create(nfeatures=nfeatures or 500)


def _run_eval_hpatches(args: argparse.Namespace) -> int:
    from ..evaluation import evaluate_hpatches, format_table, plot_metrics, write_json
    from ..utils import import_optional

    from ..steerers import rotation_angles

    rotation_angles(args.rotations)  # before the models load
    if args.plot is None:
        output = Path(args.output)
        plot = output.with_suffix(".png")
        args.plot = str(plot if plot != output else output.with_name(output.name + ".png"))
    if args.plot:
        import_optional("matplotlib", "the HPatches plot (or pass --no-plot)")
    nfeatures = feature_config(args).params.nfeatures
    methods = {m: create_feature(args) if m == "r2d2" else _baseline(m, nfeatures)
               for m in args.methods}
    results = evaluate_hpatches(args.root, methods, device=args.device,
                                show_progress=not args.quiet, rotations=args.rotations)
    print(format_table(results))
    write_json(results, args.output)
    print(f"results: {args.output}")
    if args.plot:
        plot_metrics(results, args.plot)
        print(f"plot: {args.plot}")
    return 0


def add_heatmap(subparsers: Any) -> None:
    """Add the ``heatmap`` subcommand."""
    from ..visualize import DEFAULT_HEATMAP, HEATMAPS

    parser = subparsers.add_parser(
        "heatmap", help="draw R2D2's repeatability, reliability or score map over an image",
        description="Run the network on IMAGE resized by --scale and draw one of its dense "
                    "maps (values 0 to 1 span the colour map) blended over the photo, at the "
                    "photo's size. The score is repeatability x reliability: keypoints are its "
                    "local maxima that pass both thresholds. --keypoints adds the best keypoints "
                    "that the R2D2 options give, as circles of their size.",
    )
    parser.add_argument("image", metavar="IMAGE", help="the image")
    parser.add_argument("-o", "--output", required=True,
                        help="the heatmap image to write (.png, .jpg, ...)")
    parser.add_argument("--which", choices=HEATMAPS, default=DEFAULT_HEATMAP,
                        help="the map to draw (default: %(default)s)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="the image's scale for the network, in (0, 1] (default: %(default)s)")
    parser.add_argument("--keypoints", type=int, nargs="?", const=200, default=0, metavar="N",
                        help="draw the N best detected keypoints (all pyramid levels) too; "
                             "N defaults to 200, more hide the map")
    add_feature_options(parser)
    add_output_options(parser)
    parser.set_defaults(run=_run_heatmap)


def _run_heatmap(args: argparse.Namespace) -> int:
    from ..image import check_image_suffix, read_image, write_image
    from ..visualize import draw_heatmap

    if args.keypoints < 0:
        raise ValueError(f"--keypoints must be a positive number, got {args.keypoints}")
    check_image_suffix(args.output)
    image = read_image(args.image)
    feature = create_feature(args)
    maps = feature.computeDenseMaps(image, args.scale)
    # detect() returns keypoints best first.
    keypoints = feature.detect(image)[:args.keypoints] if args.keypoints else None
    write_image(args.output, draw_heatmap(image, maps, args.which, keypoints))
    height, width = maps["repeatability"].shape
    drawn = f", {len(keypoints)} keypoints" if keypoints is not None else ""
    print(f"{args.which} map of {width}x{height} pixels{drawn}: {args.output}")
    return 0
