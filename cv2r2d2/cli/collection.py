"""The commands on a photo collection's features: ``extract``, ``match`` and ``pairs``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, List, Sequence

from ..presets import DEFAULT_PRESET, preset_names
from ..weights import DEFAULT_MODEL
from .options import (
    add_device_option, add_feature_options, add_matching_options, add_model_option,
    add_output_options, add_ray_options, feature_config, make_executor, matching_thresholds,
    report_failed, steerers_model,
)


__all__ = ["add_extract", "add_match", "add_pairs"]


def add_extract(subparsers: Any) -> None:
    """Add the ``extract`` subcommand."""
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
    add_feature_options(parser)
    add_ray_options(parser, actors=True)
    add_output_options(parser)
    parser.set_defaults(run=_run_extract)


def _run_extract(args: argparse.Namespace) -> int:
    from ..image import list_images

    executor = make_executor(args)
    images = list_images(args.images)
    new_output = _new_paths(args.output)
    report = executor.extract(images, args.output, feature_config(args), args.format,
                              args.overwrite, not args.quiet)
    print(report.throughput())
    if report.failed and not (report.extracted or report.skipped):
        _remove(new_output)
        report_failed(report.failed)
        print(f"no image could be read: nothing was written to {args.output}", file=sys.stderr)
        return 1
    print(f"extracted {len(report.extracted)} image(s), {len(report.skipped)} already done, "
          f"into {args.output}")
    report_failed(report.failed)
    return 0


def _new_paths(output: str) -> List[Path]:
    """The paths a run writing ``output`` may create that do not exist yet (the output
    and, for an h5 output on Ray, its shards folder), to remove when it wrote nothing."""
    from ..shards import SHARDS_SUFFIX

    path = Path(output)
    return [p for p in (path, path.with_name(path.name + SHARDS_SUFFIX)) if not p.exists()]


def _remove(paths: Sequence[Path]) -> None:
    import shutil

    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def add_match(subparsers: Any) -> None:
    """Add the ``match`` subcommand."""
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
    add_matching_options(parser, pairs_required=True)
    parser.add_argument("--preset", default=None, choices=preset_names(),
                        help="match as this preset does (its --ratio, --max-distance; "
                             "default: the preset FEATURES were extracted with, as they "
                             "record it)")
    add_model_option(parser, "the model that extracted FEATURES, whose steerers --rotations "
                              "uses", recorded=True)
    add_device_option(parser)
    add_ray_options(parser, actors=False)
    add_output_options(parser)
    parser.set_defaults(run=_run_match)


def _run_match(args: argparse.Namespace) -> int:
    from ..collection import MatchingSettings
    from ..pairs import parse_pairs
    from ..stores import open_features

    executor = make_executor(args)
    with open_features(args.features) as features:
        recorded = features.settings() or {}
    model = args.model or recorded.get("model", DEFAULT_MODEL)
    # Made before the model loads: a bad --rotations fails first.
    settings = MatchingSettings(
        **matching_thresholds(args, args.preset or recorded.get("preset", DEFAULT_PRESET)),
        rotations=args.rotations, device=args.device)
    steerers = (steerers_model(args, model).getSteerers(settings.rotations)
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


def add_pairs(subparsers: Any) -> None:
    """Add the ``pairs`` subcommand."""
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
    add_ray_options(parser, actors=True, shards=False)
    add_output_options(parser)
    parser.set_defaults(run=_run_pairs)


def _run_pairs(args: argparse.Namespace) -> int:
    from ..pairs import write_pairs
    from ..retrieval import RetrievalIndex
    from ..stores import open_features

    if args.retrieval < 1:
        raise ValueError(f"--retrieval must be >= 1, got {args.retrieval}")
    executor = make_executor(args)
    with open_features(args.features) as features:
        index = RetrievalIndex.build(features, overwrite=args.overwrite,
                                     show_progress=not args.quiet, executor=executor)
    pairs = index.pairs(args.retrieval)
    write_pairs(args.output, pairs)
    print(f"wrote {len(pairs)} pair(s) of {len(index)} image(s) to {args.output} (image "
          f"vectors in {index.path})")
    return 0
