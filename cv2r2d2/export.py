"""Export an R2D2 network to ONNX from the command line's point of view: fp32, or int8
calibrated on a folder of the user's images, some held out to measure the accuracy.

The graph, the quantiser and the accuracy report are :mod:`cv2r2d2.onnx_export`'s; the
int8 network that ``precision="int8"`` runs is built without any folder, on first use
(:mod:`cv2r2d2.derived`). Exporting needs torch and onnx (and onnxruntime for int8).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np

from .image import IMAGE_SUFFIXES, is_image_file, read_image
from .onnx_export import check_opset, export_fp32, export_int8

__all__ = ["export_onnx", "CALIBRATION_SIDE", "EVALUATION_IMAGES"]

logger = logging.getLogger(__name__)

# Calibration and evaluation images are downscaled to this longer side (pixels): the
# activation ranges hardly depend on scale, and the export stays quick.
CALIBRATION_SIDE = 512
# Calibration images held out for the accuracy report (at most this many, see held_out);
# each costs about 11 extractions (fp32 and int8, with 3 warps).
EVALUATION_IMAGES = 4


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
        int8: quantise statically (see :func:`cv2r2d2.onnx_export.export_int8`).
        calibration: with ``int8``, a folder of at least 2 images (any size; downscaled
            to ``CALIBRATION_SIDE``). Some are held out (see :func:`held_out`) to
            measure the accuracy; the others calibrate the activation ranges.
        show_progress: progress bars for the calibration and the accuracy check (on a
            terminal).

    Returns:
        A report: ``output``, ``model``, ``precision``, ``opset``, ``bytes`` and, for
        fp32, ``max_abs_error`` (the graph's outputs vs torch's on a test input); for
        int8, :func:`cv2r2d2.onnx_export.export_int8`'s figures on the held-out images.
    """
    check_opset(opset)
    if int8 and calibration is None:
        raise ValueError("int8=True needs calibration=<folder of images> to calibrate on")
    if not int8 and calibration is not None:
        raise ValueError("calibration is only used with int8=True")
    if not int8:
        return export_fp32(model, output, opset)
    calibrate, evaluate = held_out(read_images(calibration))
    return export_int8(model, output, calibrate, evaluate, opset, show_progress)


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
