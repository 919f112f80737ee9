"""Export an R2D2 network to ONNX, in fp32 or statically quantised to int8, with an
accuracy report of the int8 model against the fp32 one.

The fp32 graph and its metadata come from :mod:`cv2r2d2.onnx_export` (see there for
the graph's interface); this module adds int8 quantisation (onnxruntime's static QDQ
quantiser) and measures it on held-out images. Exporting needs torch and onnx (and
onnxruntime for int8).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import onnx

from .evaluation import homography_matching_accuracy
from .extractor import ExtractionParams, Features, NetworkRunner, describe, extract
from .image import IMAGE_SUFFIXES, is_image_file, normalize_image, read_image
from .onnx_export import check_opset, export_fp32, exporting, max_abs_error, write_metadata
from .onnx_runner import INPUT_NAME, OUTPUT_NAMES, OnnxRuntimeRunner
from .utils import progress

__all__ = ["export_onnx", "read_images", "held_out", "keypoint_agreement", "homography_mma",
           "HOMOGRAPHIES"]

logger = logging.getLogger(__name__)

# Calibration and evaluation images are downscaled to this longer side (pixels): the
# activation ranges hardly depend on scale, and the export stays quick.
CALIBRATION_SIDE = 512
# Calibration images held out for the accuracy report (at most this many, see held_out);
# each costs about 11 extractions (fp32 and int8, with 3 warps).
EVALUATION_IMAGES = 4
# Synthetic homography pairs for MMA: each image's corners (TL, TR, BR, BL) move by
# these fractions of its width and height.
HOMOGRAPHIES = (
    ((0.10, 0.05), (-0.05, 0.10), (-0.10, -0.05), (0.05, -0.10)),
    ((0.15, 0.00), (-0.15, 0.00), (0.00, 0.00), (0.00, 0.00)),
    ((0.20, 0.20), (-0.10, 0.15), (-0.20, -0.20), (0.10, -0.15)),
)


def export_onnx(
    model: str,
    output: Union[str, os.PathLike],
    opset: int = 17,
    int8: bool = False,
    calibration: Optional[Union[str, os.PathLike]] = None,
    show_progress: bool = False,
) -> dict:
    """Export a model to an ONNX file that passes ``onnx.checker``.

    Args:
        model: a registry name (``r2d2_WASF_N16``...) or a checkpoint path.
        output: the ``.onnx`` file to write (overwritten).
        opset: ONNX opset version (13 to 20).
        int8: quantise statically, per channel (QDQ, uint8 activations, 7-bit int8
            weights), the first convolution (RGB input) and the 1x1 heads kept in fp32.
        calibration: with ``int8``, a folder of at least 2 images (any size; downscaled
            to ``CALIBRATION_SIDE``). Some are held out (see :func:`held_out`) to
            measure the accuracy; the others calibrate the activation ranges.
        show_progress: progress bars for the calibration and the accuracy check (on a
            terminal).

    Returns:
        A report: ``output``, ``model``, ``precision``, ``opset``, ``bytes`` and, for
        fp32, ``max_abs_error`` (the graph's outputs vs torch's on a test input). For
        int8, the quantised model against the fp32 one on the held-out images, paper
        settings: ``keypoints_within_2px`` (fraction of fp32 keypoints with an int8
        keypoint within 2 px), ``descriptor_cosine_median`` / ``_p01`` (int8 vs fp32
        descriptors at the fp32 keypoints), ``mma3_fp32`` and ``mma3_int8`` (mean
        matching accuracy at 3 px on synthetic homography pairs of those images),
        ``calibration_images`` and ``evaluation_images`` (counts), and
        ``fp32_max_abs_error`` (the fp32 graph that was quantised, vs torch).
    """
    check_opset(opset)
    if int8 and calibration is None:
        raise ValueError("int8=True needs calibration=<folder of images> to calibrate on")
    if not int8 and calibration is not None:
        raise ValueError("calibration is only used with int8=True")
    if not int8:
        return export_fp32(model, output, opset)
    calibrate, evaluate = held_out(read_images(calibration))
    with exporting(model, output, opset, "int8") as job:
        quantised = job.fp32.with_name("int8.onnx")
        logger.info("calibrating the int8 ranges on %d image(s)", len(calibrate))
        _quantize(job.fp32, quantised, calibrate, show_progress)
        write_metadata(quantised, job.final, job.metadata)
        job.report["fp32_max_abs_error"] = max_abs_error(job.folded, job.fp32)
        job.report.update(_int8_report(OnnxRuntimeRunner(job.fp32), OnnxRuntimeRunner(job.final),
                                       evaluate, show_progress))
        job.report["calibration_images"] = len(calibrate)
    return job.report


def read_images(folder: Union[str, os.PathLike], max_side: int = CALIBRATION_SIDE) -> List[np.ndarray]:
    """The images of a folder (sorted by name), as BGR uint8, downscaled to ``max_side``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"calibration must be a folder of images, got {os.fspath(folder)!r}")
    images = []
    for path in sorted(p for p in folder.iterdir() if is_image_file(p)):
        try:
            image = read_image(path)
        except OSError:
            logger.warning("skipping %s: not readable as an image", path)
            continue
        factor = max_side / max(image.shape[:2])
        if factor < 1:
            size = (max(2, round(image.shape[1] * factor)), max(2, round(image.shape[0] * factor)))
            image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        images.append(image)
    if not images:
        raise ValueError(f"calibration folder {os.fspath(folder)!r} holds no readable image "
                         f"({', '.join(IMAGE_SUFFIXES)})")
    return images


def held_out(images: Sequence[np.ndarray]) -> Tuple[List[np.ndarray], List[np.ndarray]]:
    """Split calibration images into (calibrate, evaluate), so that the int8 accuracy is
    measured on images the calibration has not seen.

    Every k-th image is held out, k = len // n, for n = len // 5 held-out images (at
    least 1, at most ``EVALUATION_IMAGES``).

    Raises:
        ValueError: fewer than 2 images.
    """
    if len(images) < 2:
        raise ValueError(
            f"int8 calibration needs at least 2 images, got {len(images)}: some are held out "
            "to measure the accuracy on images the calibration has not seen")
    count = min(EVALUATION_IMAGES, max(1, len(images) // 5))
    step = len(images) // count
    chosen = set(range(step - 1, len(images), step)[:count])
    return ([image for i, image in enumerate(images) if i not in chosen],
            [image for i, image in enumerate(images) if i in chosen])


def _fp32_nodes(graph) -> List[str]:
    """Nodes kept in fp32: the first convolution, the squaring of the raw map and the
    two 1x1 heads that read it.

    The first convolution reads the RGB image and costs 0.2% of the network; keeping
    it in fp32 measured MMA@3 0.826 instead of 0.824 (exact 0.831) on the 40
    homography pairs of benchmarks/homography_pairs.py.
    """
    squares = [n for n in graph.node if n.op_type in ("Pow", "Mul") and OUTPUT_NAMES[0] in n.input]
    squared = {out for n in squares for out in n.output}
    heads = [n for n in graph.node if n.op_type == "Conv" and squared & set(n.input)]
    if len(heads) != 2:
        raise RuntimeError(f"expected the two 1x1 head convolutions, found {len(heads)}")
    first = [n for n in graph.node if n.op_type == "Conv" and INPUT_NAME in n.input]
    if len(first) != 1:
        raise RuntimeError(f"expected one convolution reading {INPUT_NAME!r}, found {len(first)}")
    return [n.name for n in first + squares + heads]


def _quantize(fp32_path: Path, output: Path, images: Sequence[np.ndarray],
              show_progress: bool = False) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quant_pre_process,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._images = iter(progress(images, len(images), show_progress, "calibrate",
                                         unit="image"))

        def get_next(self) -> Optional[dict]:
            image = next(self._images, None)
            return None if image is None else {INPUT_NAME: normalize_image(image)[None]}

    # Shape inference and graph clean-up, as the quantiser expects.
    prepared = fp32_path.with_name("prepared.onnx")
    quant_pre_process(str(fp32_path), str(prepared))
    excluded = _fp32_nodes(onnx.load(str(prepared)).graph)
    # CPUs without VNNI (AVX2 only) can saturate u8 x s8 products in 16 bits:
    # reduce_range (7-bit weights) avoids that at a negligible accuracy cost.
    quantize_static(
        str(prepared), str(output), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        nodes_to_exclude=excluded, calibrate_method=CalibrationMethod.MinMax,
    )


def _int8_report(fp32: NetworkRunner, int8: NetworkRunner, images: Sequence[np.ndarray],
                 show_progress: bool = False) -> dict:
    """The int8 model against the fp32 one on ``images`` (see :func:`export_onnx`)."""
    logger.info("measuring the int8 model against fp32 on %d held-out image(s)", len(images))
    params = ExtractionParams()
    within, cosines, accuracy_fp32, accuracy_int8 = [], [], [], []
    for image in progress(images, len(images), show_progress, "int8 vs fp32", unit="image"):
        ours, theirs = _extract(fp32, image, params), _extract(int8, image, params)
        close, cosine = _agreement(ours, theirs, int8, image, params, radius=2.0)
        within.append(close)
        cosines.append(cosine)
        accuracy_fp32 += _warp_accuracies(fp32, image, ours, params, threshold=3.0)
        accuracy_int8 += _warp_accuracies(int8, image, theirs, params, threshold=3.0)
    report = _agreement_figures(within, cosines)
    report["mma3_fp32"] = _mean(accuracy_fp32)
    report["mma3_int8"] = _mean(accuracy_int8)
    report["evaluation_images"] = len(images)
    return report


def _extract(runner: NetworkRunner, image: np.ndarray, params: ExtractionParams) -> Features:
    return extract(runner, normalize_image(image), params)


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def _nearest(query: np.ndarray, train: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """For each query row, the distance to and index of the nearest train row (L2)."""
    if not len(query) or not len(train):
        return np.full(len(query), np.inf, np.float32), np.zeros(len(query), np.int64)
    matches = cv2.BFMatcher(cv2.NORM_L2).match(
        np.ascontiguousarray(query, np.float32), np.ascontiguousarray(train, np.float32)
    )
    distance = np.array([m.distance for m in matches], np.float32)
    index = np.array([m.trainIdx for m in matches], np.int64)
    return distance, index


def _agreement(ours: Features, theirs: Features, runner: NetworkRunner, image: np.ndarray,
               params: ExtractionParams, radius: float) -> Tuple[np.ndarray, np.ndarray]:
    """Per reference keypoint (``ours``): whether ``theirs`` has one within ``radius``
    px, and the cosine of ``runner``'s descriptor there with the reference's."""
    distance, _ = _nearest(ours.xy, theirs.xy)
    descriptors, kept = describe(runner, normalize_image(image), ours.xy, ours.sizes, params)
    return distance <= radius, np.einsum("ij,ij->i", descriptors, ours.descriptors[kept])


def _agreement_figures(within: List[np.ndarray], cosines: List[np.ndarray]) -> dict:
    within, cosines = np.concatenate(within), np.concatenate(cosines)
    return {
        "keypoints_within_2px": _mean(within),
        "descriptor_cosine_median": float(np.median(cosines)) if len(cosines) else float("nan"),
        "descriptor_cosine_p01": float(np.percentile(cosines, 1)) if len(cosines) else float("nan"),
    }


def keypoint_agreement(
    reference: NetworkRunner, runner: NetworkRunner, images: Sequence[np.ndarray],
    params: ExtractionParams, radius: float = 2.0,
) -> dict:
    """How closely ``runner`` reproduces ``reference``'s keypoints and descriptors.

    Args:
        images: BGR uint8 images.

    Returns:
        ``keypoints_within_2px``: the fraction of reference keypoints with a keypoint of
        ``runner`` within ``radius`` px; ``descriptor_cosine_median`` and
        ``descriptor_cosine_p01`` (1st percentile): cosine between the two runners'
        descriptors at the reference keypoints.
    """
    within, cosines = [], []
    for image in images:
        close, cosine = _agreement(_extract(reference, image, params),
                                   _extract(runner, image, params), runner, image, params, radius)
        within.append(close)
        cosines.append(cosine)
    return _agreement_figures(within, cosines)


def _warp_accuracies(runner: NetworkRunner, image: np.ndarray, first: Features,
                     params: ExtractionParams, threshold: float) -> List[float]:
    """Matching accuracy at ``threshold`` px of ``image`` (features ``first``) with each of
    its :data:`HOMOGRAPHIES` warps."""
    height, width = image.shape[:2]
    size = (width, height)
    corners = np.float32([[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]])
    accuracies = []
    for offsets in HOMOGRAPHIES:
        moved = corners + np.float32(offsets) * np.float32([width, height])
        homography = cv2.getPerspectiveTransform(corners, moved)
        warped = cv2.warpPerspective(image, homography, size, flags=cv2.INTER_LINEAR)
        second = _extract(runner, warped, params)
        accuracies.append(float(homography_matching_accuracy(
            first.xy, first.descriptors, second.xy, second.descriptors, homography, size, size,
            [threshold], visible_only=True)[0]))
    return accuracies


def homography_mma(
    runner: NetworkRunner, images: Sequence[np.ndarray], params: ExtractionParams,
    threshold: float = 3.0,
) -> float:
    """Mean matching accuracy at ``threshold`` px on synthetic homography pairs.

    Each image is paired with its warps by :data:`HOMOGRAPHIES`; keypoints seen in
    both images are matched by mutual nearest neighbour (L2); a pair's accuracy is the
    fraction of matches within ``threshold`` px of the true position, and the MMA is
    the mean over pairs (HPatches-style).
    """
    accuracies: List[float] = []
    for image in images:
        accuracies += _warp_accuracies(runner, image, _extract(runner, image, params), params,
                                       threshold)
    return _mean(accuracies)
