"""The ``cv2r2d2`` command line.

Subcommands: ``extract`` (features of a photo collection), ``match`` (mutual nearest
neighbours), ``pairs`` (image retrieval), ``sfm`` (COLMAP reconstruction), ``localize`` (poses
of photos against a model), ``eval-hpatches`` (the HPatches
benchmark), ``heatmap`` (a dense map drawn over an image), ``export-onnx``,
``fit-steerers`` (rotation steerers of a model). Each is a
pair of functions, ``_add_<name>(subparsers)`` and ``_run_<name>(args) -> int``, listed
in ``COMMANDS``.

Heavy modules (torch, pycolmap, h5py) are imported by the subcommand that needs them,
so that ``cv2r2d2 --help`` answers at once.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Sequence, Tuple, Union

from .config import BACKENDS, R2D2Config
from .presets import DEFAULT_PRESET, SFM_PRESET, preset_names
from .utils import logging_beside_progress
from .weights import DEFAULT_MODEL, LICENCE_LOGGER

if TYPE_CHECKING:
    from .collection import LocalExecutor
    from .distributed import RayExecutor

__all__ = ["main", "build_parser"]

logger = logging.getLogger(__name__)

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
METHODS = ("r2d2", "sift", "orb")


# --- shared options ----------------------------------------------------------------


def _add_output_options(parser: argparse.ArgumentParser, colmap: bool = False) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("-q", "--quiet", action="store_true",
                       help="no progress bar, warnings and errors only")
    group.add_argument("-v", "--verbose", action="store_true",
                       help="debug messages" + (" and COLMAP's own log" if colmap else ""))


def _add_device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None,
                        help="torch device, e.g. cpu or cuda:0 (default: CUDA if available)")


def _add_feature_options(parser: argparse.ArgumentParser, default_preset: str = DEFAULT_PRESET
                         ) -> None:
    """R2D2 options: R2D2Config's fields (create()'s arguments). Those not given take the
    value of --preset; only the options given reach the configuration."""
    from .weights import MODELS

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
    _add_device_option(group)
    subpixel = group.add_mutually_exclusive_group()
    subpixel.add_argument("--subpixel", action="store_true",
                          help="refine keypoint positions to sub-pixel accuracy")
    subpixel.add_argument("--subpixel-descriptor", action="store_true",
                          help="refine them further by a mean-shift on the descriptor map "
                               "(implies --subpixel)")
    subpixel.add_argument("--no-subpixel", action="store_true",
                          help="the original's keypoint positions (the paper's)")
    from .precision import PRECISIONS

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


def _config(args: argparse.Namespace, default_preset: str = DEFAULT_PRESET) -> R2D2Config:
    """The configuration of the R2D2 options: the preset's values, overridden by the
    options given on the command line."""
    given = {name: getattr(args, name) for name in R2D2Config.argument_names()
             if hasattr(args, name) and name != "preset"}
    if getattr(args, "subpixel_descriptor", False):
        given["subpixel"] = "descriptor"
    if getattr(args, "no_subpixel", False):
        given["subpixel"] = False
    return R2D2Config.from_arguments(preset=args.preset or default_preset, **given)


def _create_feature(args: argparse.Namespace) -> Any:
    from .feature2d import R2D2Feature

    return R2D2Feature(_config(args))


def _add_matching_options(parser: argparse.ArgumentParser, pairs_required: bool) -> None:
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
    _add_rotations_option(group)


def _matching(args: argparse.Namespace, preset: str) -> dict:
    """max_distance and ratio: the preset's, overridden by the options given."""
    from .presets import get_preset

    options = dict(dict(max_distance=None, ratio=None), **get_preset(preset).matching)
    options.update({name: getattr(args, name) for name in options if hasattr(args, name)})
    return options


def _add_rotations_option(parser: Any) -> None:
    parser.add_argument("--rotations", type=int, default=1, metavar="N",
                        help="views may be rotated in the image plane: estimate each pair's "
                             "rotation among N steering angles (k * 360 / N degrees, N a "
                             "divisor of 360, e.g. 12) and match under it, with the steerers "
                             "of the model (fitted on first use); 1: plain matching "
                             "(default: %(default)s)")


def _add_ray_options(parser: argparse.ArgumentParser, actors: bool) -> None:
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
    group.add_argument("--merge", action="store_true",
                       help="end with one .h5 file instead of a master file of links to "
                            "the shards")


def _executor(args: argparse.Namespace) -> Union["LocalExecutor", "RayExecutor"]:
    """Where extract and match run: this machine, or the Ray cluster of --ray and its
    options (a missing Ray fails here, before anything is written)."""
    if args.ray is None:
        from .collection import LocalExecutor

        if args.merge:
            raise ValueError("--merge goes with --ray (without it the output is one file)")
        return LocalExecutor()
    from .distributed import RayExecutor

    return RayExecutor(address=args.ray, actors=getattr(args, "actors", None),
                       threads=getattr(args, "threads", None), block_size=args.block_size,
                       merge=args.merge)


def _report_failed(failed: Sequence[Tuple[str, str]]) -> None:
    if failed:
        print(f"{len(failed)} image(s) could not be read and were skipped:", file=sys.stderr)
        for name, reason in failed:
            print(f"  {name}: {reason}", file=sys.stderr)


# --- presets -------------------------------------------------------------------------


def _add_presets(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "presets", help="list the named settings (--preset)",
        description="The named settings that --preset and R2D2Feature.create(preset=...) "
                    "take: what each is for, the figures it was chosen on, and what it sets "
                    "(options given beside --preset override its values).",
    )
    parser.set_defaults(run=_run_presets, verbose=False, quiet=False)


def _run_presets(args: argparse.Namespace) -> int:
    from .presets import PRESETS

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


# --- extract -------------------------------------------------------------------------


def _add_extract(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "extract", help="extract R2D2 features of images",
        description="Extract R2D2 features of images into .r2d2 files or an hloc "
                    "features.h5. Images already done are skipped (unless --overwrite), so "
                    "an interrupted run resumes.",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGES",
                        help="image files, folders (searched recursively) or .txt lists")
    parser.add_argument("-o", "--output", required=True,
                        help="a .h5 file (hloc's layout) or a folder of .r2d2 files")
    parser.add_argument("--format", choices=("auto", "r2d2", "h5"), default="auto",
                        help="output format (default: by the output's suffix)")
    parser.add_argument("--overwrite", action="store_true", help="redo images already done")
    _add_feature_options(parser)
    _add_ray_options(parser, actors=True)
    _add_output_options(parser)
    parser.set_defaults(run=_run_extract)


def _run_extract(args: argparse.Namespace) -> int:
    from .image import list_images

    executor = _executor(args)
    images = list_images(args.images)
    new_output = _new_paths(args.output)
    report = executor.extract(images, args.output, _config(args), args.format,
                              args.overwrite, not args.quiet)
    print(report.throughput())
    if report.failed and not (report.extracted or report.skipped):
        _remove(new_output)
        _report_failed(report.failed)
        print(f"no image could be read: nothing was written to {args.output}", file=sys.stderr)
        return 1
    print(f"extracted {len(report.extracted)} image(s), {len(report.skipped)} already done, "
          f"into {args.output}")
    _report_failed(report.failed)
    return 0


def _new_paths(output: str) -> List[Path]:
    """The paths a run writing ``output`` may create that do not exist yet (the output
    and, for an h5 output on Ray, its shards folder), to remove when it wrote nothing."""
    from .shards import SHARDS_SUFFIX

    path = Path(output)
    return [p for p in (path, path.with_name(path.name + SHARDS_SUFFIX)) if not p.exists()]


def _remove(paths: Sequence[Path]) -> None:
    import shutil

    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


# --- match ---------------------------------------------------------------------------


def _add_match(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "match", help="match features of image pairs",
        description="Mutual nearest-neighbour matching of stored features (the pairs "
                    "cv2.BFMatcher(NORM_L2, crossCheck=True) gives), batched with torch, into "
                    "an hloc matches.h5. Pairs already done are skipped (unless --overwrite).",
    )
    parser.add_argument("features", metavar="FEATURES",
                        help="a features .h5 file or a folder of .r2d2 files")
    parser.add_argument("-o", "--output", required=True, help="the matches .h5 file")
    parser.add_argument("--overwrite", action="store_true", help="redo pairs already done")
    _add_matching_options(parser, pairs_required=True)
    parser.add_argument("--preset", default=None, choices=preset_names(),
                        help="match as this preset does (its --ratio, --max-distance; "
                             "default: the preset FEATURES were extracted with, as they "
                             "record it)")
    _add_model_option(parser, "the model that extracted FEATURES, whose steerers --rotations "
                              "uses", recorded=True)
    _add_device_option(parser)
    _add_ray_options(parser, actors=False)
    _add_output_options(parser)
    parser.set_defaults(run=_run_match)


def _add_model_option(parser: Any, purpose: str, recorded: bool = False) -> None:
    """--model; with ``recorded``, its default is the model the features record."""
    from .weights import DEFAULT_MODEL, MODELS

    default = f"the one FEATURES record, else {DEFAULT_MODEL}" if recorded else "%(default)s"
    parser.add_argument("--model", default=None if recorded else DEFAULT_MODEL,
                        help=f"{purpose}: {', '.join(MODELS)}, or a checkpoint / .onnx path "
                             f"(default: {default})")


def _steerers_model(args: argparse.Namespace, model: Optional[str] = None) -> Any:
    """The R2D2Feature of ``model`` (None: --model), on the backend its file needs, for
    its steerers."""
    from .feature2d import R2D2Feature

    model = model or args.model
    backend = "onnxruntime" if str(model).lower().endswith(".onnx") else "torch"
    return R2D2Feature.create(model=model, device=args.device, backend=backend)


def _run_match(args: argparse.Namespace) -> int:
    from .collection import MatchingSettings
    from .pairs import parse_pairs
    from .stores import open_features

    executor = _executor(args)
    with open_features(args.features) as features:
        recorded = features.settings() or {}
    model = args.model or recorded.get("model", DEFAULT_MODEL)
    # Made before the model loads: a bad --rotations fails first.
    settings = MatchingSettings(
        **_matching(args, args.preset or recorded.get("preset", DEFAULT_PRESET)),
        rotations=args.rotations, device=args.device)
    steerers = (_steerers_model(args, model).getSteerers(settings.rotations)
                if settings.rotations > 1 else None)
    with open_features(args.features) as features:
        pairs = parse_pairs(args.pairs, features.names(), features, not args.quiet)
    report = executor.match(args.features, pairs, args.output, settings, steerers,
                            args.overwrite, not args.quiet)
    print(report.throughput())
    failed = report.failed
    mean = sum(report.num_matches) / len(report.num_matches) if report.num_matches else 0.0
    print(f"matched {len(report.matched)} pair(s) ({mean:.0f} "
          f"{'match' if f'{mean:.0f}' == '1' else 'matches'} on average), "
          f"{len(report.skipped)} already done, into {args.output}")
    if failed:
        print(f"{len(failed)} pair(s) failed, their workers died: {failed[0][1]}; run the "
              "same command again to retry them", file=sys.stderr)
    return 1 if failed else 0


# --- pairs ---------------------------------------------------------------------------


def _add_pairs(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "pairs", help="write the image pairs worth matching (image retrieval)",
        description="Pair each image with its K most similar others, by a bag of visual "
                    "words (tf-idf) of its stored features over a codebook learned on the "
                    "collection, and "
                    "write the pairs in hloc's format ('name0 name1' lines, each pair "
                    "once), for 'cv2r2d2 match --pairs'. The vectors are kept beside "
                    "FEATURES (<features>.retrieval.h5) and reused by later runs.",
    )
    parser.add_argument("features", metavar="FEATURES",
                        help="a features .h5 file or a folder of .r2d2 files")
    parser.add_argument("-o", "--output", required=True, help="the pairs .txt file")
    parser.add_argument("--retrieval", type=int, required=True, metavar="K",
                        help="pair each image with its K most similar others")
    parser.add_argument("--overwrite", action="store_true",
                        help="build the image vectors again instead of reusing them")
    _add_output_options(parser)
    parser.set_defaults(run=_run_pairs)


def _run_pairs(args: argparse.Namespace) -> int:
    from .pairs import write_pairs
    from .retrieval import RetrievalIndex
    from .stores import open_features

    if args.retrieval < 1:
        raise ValueError(f"--retrieval must be >= 1, got {args.retrieval}")
    with open_features(args.features) as features:
        index = RetrievalIndex.build(features, overwrite=args.overwrite,
                                     show_progress=not args.quiet)
    pairs = index.pairs(args.retrieval)
    write_pairs(args.output, pairs)
    print(f"wrote {len(pairs)} pair(s) of {len(index)} image(s) to {args.output} (image "
          f"vectors in {index.path})")
    return 0


# --- localize ------------------------------------------------------------------------


def _add_localize(subparsers: Any) -> None:
    from .localization import MAX_ERROR, MIN_INLIERS, NUM_RETRIEVED
    from .queries import CAMERA_MODEL

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
    _add_device_option(parser)
    _add_output_options(parser)
    parser.set_defaults(run=_run_localize)


def _run_localize(args: argparse.Namespace) -> int:
    from .localization import localize
    from .queries import logs_path, write_results

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
                       device=args.device, show_progress=not args.quiet)
    write_results(args.output, results)
    localized = sum(result.success for result in results)
    print(f"localised {localized} of {len(results)} query image(s) into {args.output} (every "
          f"query's outcome in {logs_path(args.output)})")
    return 0 if localized else 1


# --- sfm -----------------------------------------------------------------------------


def _add_sfm(subparsers: Any) -> None:
    from .colmap import CAMERA_MODES

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
    _add_matching_options(parser, pairs_required=False)
    _add_feature_options(parser, default_preset=SFM_PRESET)
    _add_output_options(parser, colmap=True)
    parser.set_defaults(run=_run_sfm)


def _refinement(args: argparse.Namespace, config: R2D2Config) -> Any:
    """The sfm command's refinement options (None where the preset decides)."""
    from .feature2d import R2D2Feature
    from .refinement import RefinementParams
    from .sfm import RefinementOptions

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
    from .colmap import import_pycolmap
    from .sfm import CameraOptions, MatchingOptions, reconstruct

    import_pycolmap()  # before the long extraction, not after it
    from .feature2d import R2D2Feature

    config = _config(args, SFM_PRESET)
    refinement = _refinement(args, config)
    matching = _matching(args, config.preset)
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
    _report_failed(result.failed)
    if result.failure is not None:
        print(f"cv2r2d2 sfm: error: {result.failure}", file=sys.stderr)
        return 1
    return 0 if args.database_only or result.num_registered else 1


# --- eval-hpatches -------------------------------------------------------------------


def _methods(text: str) -> List[str]:
    names = list(dict.fromkeys(n.strip().lower() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"methods must be a comma-separated list of {', '.join(METHODS)}, got {text!r}")
    return names


def _add_eval_hpatches(subparsers: Any) -> None:
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
    _add_rotations_option(parser)
    _add_feature_options(parser)
    _add_output_options(parser)
    parser.set_defaults(run=_run_eval_hpatches)


def _baseline(method: str, nfeatures: int) -> Any:
    import cv2

    if method == "sift":
        return cv2.SIFT_create(nfeatures=nfeatures)
    return cv2.ORB_create(nfeatures=nfeatures or 500)


def _run_eval_hpatches(args: argparse.Namespace) -> int:
    from .evaluation import evaluate_hpatches, format_table, plot_metrics, write_json
    from .utils import import_optional

    from .steerers import rotation_angles

    rotation_angles(args.rotations)  # before the models load
    if args.plot is None:
        output = Path(args.output)
        plot = output.with_suffix(".png")
        args.plot = str(plot if plot != output else output.with_name(output.name + ".png"))
    if args.plot:
        import_optional("matplotlib", "the HPatches plot (or pass --no-plot)")
    nfeatures = _config(args).params.nfeatures
    methods = {m: _create_feature(args) if m == "r2d2" else _baseline(m, nfeatures)
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


# --- heatmap -------------------------------------------------------------------------


def _add_heatmap(subparsers: Any) -> None:
    from .visualize import DEFAULT_HEATMAP, HEATMAPS

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
    _add_feature_options(parser)
    _add_output_options(parser)
    parser.set_defaults(run=_run_heatmap)


def _run_heatmap(args: argparse.Namespace) -> int:
    from .image import check_image_suffix, read_image, write_image
    from .visualize import draw_heatmap

    if args.keypoints < 0:
        raise ValueError(f"--keypoints must be a positive number, got {args.keypoints}")
    check_image_suffix(args.output)
    image = read_image(args.image)
    feature = _create_feature(args)
    maps = feature.computeDenseMaps(image, args.scale)
    # detect() returns keypoints best first.
    keypoints = feature.detect(image)[:args.keypoints] if args.keypoints else None
    write_image(args.output, draw_heatmap(image, maps, args.which, keypoints))
    height, width = maps["repeatability"].shape
    drawn = f", {len(keypoints)} keypoints" if keypoints is not None else ""
    print(f"{args.which} map of {width}x{height} pixels{drawn}: {args.output}")
    return 0


# --- export-onnx ---------------------------------------------------------------------


def _add_export_onnx(subparsers: Any) -> None:
    from .weights import DEFAULT_MODEL

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
    _add_output_options(parser)
    parser.set_defaults(run=_run_export_onnx)


def _run_export_onnx(args: argparse.Namespace) -> int:
    try:
        from .export import export_onnx
    except ImportError as exc:
        raise ImportError(f"ONNX export is not available: {exc}") from exc
    info = export_onnx(args.model, args.output, opset=args.opset, int8=args.int8,
                       calibration=args.calibration, show_progress=not args.quiet)
    for key, value in info.items():
        print(f"{key}: {value}")
    return 0


# --- fit-steerers --------------------------------------------------------------------


def _add_fit_steerers(subparsers: Any) -> None:
    from .steerers import DEFAULT_ROTATIONS

    parser = subparsers.add_parser(
        "fit-steerers", help="fit the rotation steerers of a model (done on first use anyway)",
        description="Fit a model's steerers (the matrices that turn its descriptors into "
                    "those of the image rotated by an angle, for --rotations) now, on "
                    "procedural images or on yours, and cache them in the package's cache "
                    "folder ($CV2R2D2_CACHE_DIR, else ~/.cache/cv2r2d2), replacing "
                    "cached ones.",
    )
    _add_model_option(parser, "the model")
    parser.add_argument("--images", default=None, metavar="DIR",
                        help="fit on the centre squares of these images instead of "
                             "procedural ones")
    parser.add_argument("--rotations", type=int, default=DEFAULT_ROTATIONS, metavar="N",
                        help="fit the angles k * 360 / N (default: %(default)s, every 30 "
                             "degrees)")
    _add_device_option(parser)
    _add_output_options(parser)
    parser.set_defaults(run=_run_fit_steerers)


def _run_fit_steerers(args: argparse.Namespace) -> int:
    import time

    from .steerers import rotation_angles

    rotation_angles(args.rotations)
    if args.images is not None and not os.path.isdir(args.images):
        raise NotADirectoryError(f"no such image folder: {args.images}")
    feature = _steerers_model(args)
    start = time.perf_counter()
    steerers = feature.fitSteerers(args.rotations, images=args.images)
    seconds = time.perf_counter() - start
    print(f"{len(steerers.angles)} steerer(s) of {args.model} in {seconds:.1f} s "
          "(the others are their transposes); mean cosine of corresponding descriptors:")
    for angle, (before, after) in zip(steerers.angles, steerers.cosines):
        print(f"  {angle:6g} deg: {before:.3f} unsteered, {after:.3f} steered")
    return 0


# --- entry point ---------------------------------------------------------------------

def _train_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``cv2r2d2 train``: the fields of TrainConfig (its defaults, the paper's)."""
    from .train.config import DEFAULT_NET, SETTING_HELP, TrainConfig

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
    _add_device_option(parser)
    add("--amp", action="store_true", help="mixed precision")
    add("--resume", default=None, metavar="FILE", help="resume file (OUTPUT stem + .resume.pt)")
    add("--no-progress", dest="progress", action="store_false",
        help="no progress bar (-q also turns it off)")
    _add_output_options(parser)
    parser.set_defaults(run=_run_train, command="train")


def _add_train(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "train", help="train or fine-tune R2D2 on your images",
        description="Train or fine-tune R2D2 (Revaud et al., NeurIPS 2019) on your images.",
    )
    _train_arguments(parser)


def _run_train(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from .train.config import TrainConfig

    settings = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    settings["progress"] = settings["progress"] and not args.quiet
    config = TrainConfig(**settings)
    from .train.trainer import train

    try:
        train(config)
    except KeyboardInterrupt:
        return 130  # the trainer has said how to resume
    return 0


COMMANDS: Tuple[Callable[[Any], None], ...] = (
    _add_presets, _add_extract, _add_match, _add_pairs, _add_localize, _add_sfm, _add_eval_hpatches, _add_heatmap, _add_export_onnx,
    _add_train,
    _add_fit_steerers,
)


def build_parser() -> argparse.ArgumentParser:
    """The ``cv2r2d2`` argument parser with all subcommands."""
    from . import __version__

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
        prog=prog, description="Train or fine-tune R2D2 (Revaud et al., NeurIPS 2019) on your images.")
    _train_arguments(parser)
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
