"""The commands on models and their settings: ``presets`` (the named settings),
``export-onnx`` and ``fit-steerers``."""
from __future__ import annotations

import argparse
import os
from typing import Any

from ..presets import DEFAULT_PRESET, SFM_PRESET
from .options import add_device_option, add_model_option, add_output_options, steerers_model


__all__ = ["add_presets", "add_export_onnx", "add_fit_steerers"]


def add_presets(subparsers: Any) -> None:
    """Add the ``presets`` subcommand."""
    parser = subparsers.add_parser(
        "presets", help="list the named settings (--preset)",
        description="The named settings that --preset and R2D2Feature.create(preset=...) "
                    "take: what each is for, the figures it was chosen on, and what it sets "
                    "(options given beside --preset override its values).",
    )
    parser.set_defaults(run=_run_presets, verbose=False, quiet=False)


def _run_presets(args: argparse.Namespace) -> int:
    from ..presets import PRESETS

    for preset in PRESETS.values():
        used = [command for command, name in (("extract, match, create()", DEFAULT_PRESET),
                                               ("sfm", SFM_PRESET)) if name == preset.name]
        print(f"{preset.name}{'  (default of ' + used[0] + ')' if used else ''}")
        print(f"  for:      {preset.purpose}")
        print(f"  figures:  {preset.figures}")
        sets = [f"{k}={v!r}" for k, v in preset.extraction.items()]
        sets += [f"matching {k}={v!r}" for k, v in preset.matching.items()]
        if preset.refinement is not None:
            sets.append("refinement " + ", ".join(
                f"{k}={v!r}" for k, v in preset.refinement.items()))
        print(f"  sets:     {'; '.join(sets) if sets else 'nothing (the paper settings)'}")
    return 0


def add_export_onnx(subparsers: Any) -> None:
    """Add the ``export-onnx`` subcommand."""
    from ..weights import DEFAULT_MODEL

    parser = subparsers.add_parser(
        "export-onnx", help="export an R2D2 model to ONNX",
        description="Export an R2D2 network to ONNX, optionally quantised to int8.",
    )
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="model name or checkpoint path (default: %(default)s)")
    parser.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default: %(default)s)")
    parser.add_argument("--int8", action="store_true", help="quantise to int8")
    parser.add_argument("--calibration", default=None,
                        help="a folder of at least 2 images for --int8: most calibrate the "
                             "quantisation, a few (1 in 5, at most 4) are held out to report "
                             "int8's accuracy against fp32")
    add_output_options(parser)
    parser.set_defaults(run=_run_export_onnx)


def _run_export_onnx(args: argparse.Namespace) -> int:
    try:
        from ..export import export_onnx
    except ImportError as exc:
        raise ImportError(f"ONNX export is not available: {exc}") from exc
    info = export_onnx(args.model, args.output, opset=args.opset, int8=args.int8,
                       calibration=args.calibration, show_progress=not args.quiet)
    for key, value in info.items():
        print(f"{key}: {value}")
    return 0


def add_fit_steerers(subparsers: Any) -> None:
    """Add the ``fit-steerers`` subcommand."""
    from ..steerers import DEFAULT_ROTATIONS

    parser = subparsers.add_parser(
        "fit-steerers", help="fit the rotation steerers of a model (done on first use anyway)",
        description="Fit a model's steerers (the matrices that turn its descriptors into "
                    "those of the image rotated by an angle, for --rotations) now, on "
                    "procedural images or on yours, and cache them in the package's cache "
                    "folder ($CV2R2D2_CACHE_DIR, else ~/.cache/cv2r2d2), replacing "
                    "cached ones.",
    )
    add_model_option(parser, "the model")
    parser.add_argument("--images", default=None, metavar="DIR",
                        help="fit on the centre squares of these images instead of "
                             "procedural ones")
    parser.add_argument("--rotations", type=int, default=DEFAULT_ROTATIONS, metavar="N",
                        help="fit the angles k * 360 / N (default: %(default)s, every 30 "
                             "degrees)")
    add_device_option(parser)
    add_output_options(parser)
    parser.set_defaults(run=_run_fit_steerers)


def _run_fit_steerers(args: argparse.Namespace) -> int:
    import time

    from ..steerers import rotation_angles

    rotation_angles(args.rotations)
    if args.images is not None and not os.path.isdir(args.images):
        raise NotADirectoryError(f"no such image folder: {args.images}")
    feature = steerers_model(args)
    start = time.perf_counter()
    steerers = feature.fitSteerers(args.rotations, images=args.images)
    seconds = time.perf_counter() - start
    print(f"{len(steerers.angles)} steerer(s) of {args.model} in {seconds:.1f} s "
          "(the others are their transposes); mean cosine of corresponding descriptors:")
    for angle, (before, after) in zip(steerers.angles, steerers.cosines):
        print(f"  {angle:6g} deg: {before:.3f} unsteered, {after:.3f} steered")
    return 0
