"""The commands on 3-D models: ``localize`` (query photos against a model) and ``sfm``
(photos to a COLMAP model)."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from ..config import R2D2Config
from ..presets import SFM_PRESET
from .options import (
    add_device_option, add_feature_options, add_matching_options, add_output_options,
    add_ray_options, feature_config, make_executor, matching_thresholds, report_failed,
)


__all__ = ["add_localize", "add_sfm"]


def add_localize(subparsers: Any) -> None:
    """Add the ``localize`` subcommand."""
    from ..localization import MAX_ERROR, MIN_INLIERS, NUM_RETRIEVED
    from ..queries import CAMERA_MODEL

    parser = subparsers.add_parser(
        "localize", help="localise photos against a model made by 'cv2r2d2 sfm'",
        description="For each query photo: R2D2 features with the settings the model's "
                    "features.h5 records, the K most similar model images (image retrieval), "
                    "matches to their keypoints that observe 3-D points, and an absolute "
                    "pose by RANSAC refined by pycolmap. RESULTS gets hloc's 'name qw qx qy "
                    "qz tx ty tz' line per localised query (COLMAP's world-to-camera pose); "
                    "RESULTS_logs.json every query's outcome, those not localised with the "
                    "reason.",
    )
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="a 'cv2r2d2 sfm' output folder")
    parser.add_argument("queries", metavar="QUERIES",
                        help="an image, a folder (searched recursively) or a .txt list (lines "
                             "'path' or, as hloc's, 'path MODEL WIDTH HEIGHT params...')")
    parser.add_argument("-o", "--output", required=True, metavar="RESULTS",
                        help="the poses file (.txt)")
    parser.add_argument("--retrieval", type=int, default=NUM_RETRIEVED, metavar="K",
                        help="match each query with its K most similar model images "
                             "(default: %(default)s)")
    parser.add_argument("--camera-model", default=CAMERA_MODEL,
                        help="COLMAP camera model of the queries (default: %(default)s)")
    parser.add_argument("--camera-params", default=None, metavar="P1,P2,...",
                        help="that model's parameters for every query, in pixels (e.g. "
                             "'f,cx,cy,k'; default: the EXIF focal length, else 1.2 x the "
                             "longer side, refined with the pose)")
    parser.add_argument("--min-inliers", type=int, default=MIN_INLIERS,
                        help="fewest RANSAC inliers of a localised query (default: "
                             "%(default)s, COLMAP's bar to register an image)")
    parser.add_argument("--max-error", type=float, default=MAX_ERROR,
                        help="RANSAC inlier threshold, pixels (default: %(default)s)")
    add_device_option(parser)
    add_ray_options(parser, actors=True, shards=False)
    add_output_options(parser)
    parser.set_defaults(run=_run_localize)


def _run_localize(args: argparse.Namespace) -> int:
    from ..localization import localize
    from ..queries import logs_path, write_results

    params = None
    if args.camera_params is not None:
        try:
            params = [float(value) for value in args.camera_params.split(",")]
        except ValueError:
            raise ValueError(f"--camera-params must be comma-separated numbers, got "
                             f"{args.camera_params!r}") from None
    results = localize(args.model_dir, args.queries, num_retrieved=args.retrieval,
                       camera_model=args.camera_model, camera_params=params,
                       min_inliers=args.min_inliers, max_error=args.max_error,
                       device=args.device, show_progress=not args.quiet,
                       executor=make_executor(args))
    write_results(args.output, results)
    localized = sum(result.success for result in results)
    print(f"localised {localized} of {len(results)} query image(s) into {args.output} (every "
          f"query's outcome in {logs_path(args.output)})")
    return 0 if localized else 1


def add_sfm(subparsers: Any) -> None:
    """Add the ``sfm`` subcommand."""
    from ..colmap import CAMERA_MODES

    parser = subparsers.add_parser(
        "sfm", help="3-D reconstruction with COLMAP (pycolmap)",
        description="Extract, match, write a COLMAP database, verify the matches and "
                    "reconstruct a sparse model with pycolmap. OUTPUT_DIR receives "
                    "features.h5, matches.h5 (reused by a later run), database.db and sparse/.",
    )
    parser.add_argument("image_dir", metavar="IMAGES_DIR", help="the photos")
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="where to write")
    parser.add_argument("--camera-model", default="SIMPLE_RADIAL",
                        help="COLMAP camera model (default: %(default)s)")
    parser.add_argument("--camera-mode", choices=CAMERA_MODES, default="auto",
                        help="cameras shared by all images, per folder, per image, or "
                             "COLMAP's choice (default: %(default)s)")
    parser.add_argument("--database-only", action="store_true",
                        help="stop after the verified database (to run COLMAP yourself)")
    parser.add_argument("--overwrite", action="store_true",
                        help="extract and match again instead of reusing earlier results")
    refine = parser.add_mutually_exclusive_group()
    refine.add_argument("--refine", action="store_true", default=None,
                        help="before mapping, move the keypoints of each verified track to "
                             "where R2D2's dense descriptors agree across it (featuremetric "
                             "keypoint refinement; cached in refined_keypoints.npz; "
                             "default: the preset's, on for sfm)")
    refine.add_argument("--no-refine", dest="refine", action="store_false",
                        help="no keypoint refinement")
    parser.add_argument("--refine-upsample", type=float, default=None, metavar="U",
                        help="refine on levels up to U times finer than the extraction's "
                             "finest (the image upsampled; window and move bound scaled "
                             "alike; default: the preset's, 2 for sfm, else 1)")
    parser.add_argument("--refine-model", default=None, metavar="MODEL",
                        help="the network computing the refinement's descriptors, a model "
                             "name, checkpoint or .onnx file (on onnxruntime); default: the "
                             "preset's (sfm: the extraction's model in int8), else the "
                             "extraction's")
    add_matching_options(parser, pairs_required=False)
    add_feature_options(parser, default_preset=SFM_PRESET)
    add_output_options(parser, colmap=True)
    parser.set_defaults(run=_run_sfm)


def _refinement(args: argparse.Namespace, config: R2D2Config) -> Any:
    """The sfm command's refinement options (None where the preset decides)."""
    from ..feature2d import R2D2Feature
    from ..refinement import RefinementParams
    from ..sfm import RefinementOptions

    explicit = args.refine_upsample is not None or args.refine_model is not None
    if args.refine is False and explicit:
        raise ValueError("--refine-upsample and --refine-model go with the refinement, "
                         "which --no-refine turns off")
    params = None
    if args.refine_upsample is not None:
        params = RefinementParams.upsampled(args.refine_upsample)
    feature = None
    if args.refine_model is not None:
        model = args.refine_model
        backend = "onnxruntime" if str(model).lower().endswith(".onnx") else (
            config.backend if config.backend in ("torch", "reference") else "torch")
        feature = R2D2Feature(config.replace(model=model, backend=backend))
    return RefinementOptions(args.refine, params, feature)


def _run_sfm(args: argparse.Namespace) -> int:
    from ..colmap import import_pycolmap
    from ..sfm import CameraOptions, MatchingOptions, reconstruct

    import_pycolmap()  # before the long extraction, not after it
    from ..feature2d import R2D2Feature

    config = feature_config(args, SFM_PRESET)
    refinement = _refinement(args, config)
    matching = matching_thresholds(args, config.preset)
    result = reconstruct(
        args.image_dir, args.output_dir, feature=R2D2Feature(config),
        matching=MatchingOptions(args.pairs, matching["max_distance"], matching["ratio"],
                                 args.rotations),
        camera=CameraOptions(args.camera_model, args.camera_mode),
        refinement=refinement,
        device=args.device, database_only=args.database_only, overwrite=args.overwrite,
        show_progress=not args.quiet, verbose=args.verbose,
    )
    print(result.summary())
    report_failed(result.failed)
    if result.failure is not None:
        print(f"cv2r2d2 sfm: error: {result.failure}", file=sys.stderr)
        return 1
    return 0 if args.database_only or result.num_registered else 1
