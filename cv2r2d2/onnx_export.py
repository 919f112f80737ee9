"""Export an R2D2 network to ONNX, in fp32 or statically quantised to int8, with the
metadata the ONNX backends read and an accuracy report of the int8 network.

The fp32 graph is :meth:`FoldedNet.forward_raw` (BatchNorm folded in) with dynamic batch,
height and width: input ``image`` (B, 3, H, W), outputs ``descriptors_raw``
(B, dim, H', W'), ``reliability_logits`` (B, 2, H', W') and ``repeatability_logit``
(B, 1, H', W'). The heads' softmax, softplus and normalisation stay outside the graph
(``cv2.dnn`` returns NaN for softplus/(1+softplus) inside it); :mod:`cv2r2d2.onnx_runner`
applies them in numpy. The file's metadata names the model, its licence and the
paper's settings, and gives the receptive-field halo and alignment with which the
runners crop tiles.

:func:`export_int8` quantises that graph with onnxruntime's static QDQ quantiser on the
calibration images it is given and measures the result against the fp32 graph on
others; :mod:`cv2r2d2.derived` builds it on first use, :mod:`cv2r2d2.export` from a
folder of the user's images. Exporting needs torch and onnx (and onnxruntime for int8).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import onnx
import torch

from .evaluation import homography_matching_accuracy
from .extractor import extract
from .params import ExtractionParams, Features
from .runner import NetworkRunner
from .sampling import describe
from .image import normalize_image
from .nets import FoldedNet, R2D2Net, fold_batchnorm
from .onnx_runner import ALIGNMENT_KEY, HALO_KEY, INPUT_NAME, OUTPUT_NAMES, OnnxRuntimeRunner
from .torch_runner import receptive_halo
from .utils import atomic_path, progress
from .weights import MODELS, load_model

__all__ = ["export_fp32", "export_int8", "exporting", "Export", "graph_metadata", "quantize_int8", "int8_report"]

logger = logging.getLogger(__name__)


def check_opset(opset: int) -> int:
    """Validate an ONNX opset version (13 to 20)."""
    if isinstance(opset, bool) or not isinstance(opset, int) or not 13 <= opset <= 20:
        raise ValueError(f"opset must be an integer from 13 to 20, got {opset!r}")
    return opset


def graph_metadata(net: R2D2Net, model: str, precision: str) -> Dict[str, str]:
    """The metadata written into an exported file of ``net`` (loaded from ``model``, a
    registry name or a checkpoint path); ``precision`` is ``"fp32"`` or ``"int8"``."""
    info = MODELS.get(model)
    halo, alignment = receptive_halo(net)
    return {
        "cv2r2d2.model": model if info else Path(model).stem,
        "cv2r2d2.licence": info.licence if info else "unknown: user checkpoint, see its source",
        "cv2r2d2.architecture": type(net).__name__,
        "cv2r2d2.descriptor_size": str(net.out_dim),
        "cv2r2d2.extraction_defaults": json.dumps(ExtractionParams().as_dict()),
        "cv2r2d2.input": f"{INPUT_NAME}: (B, 3, H, W) float32 RGB in [0, 1] normalised with "
                         "ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225)",
        "cv2r2d2.outputs": "descriptors_raw: L2-normalise over channels; reliability_logits: "
                           "softmax over the 2 channels, keep channel 1; repeatability_logit u: "
                           "softplus(u) / (1 + softplus(u))",
        "cv2r2d2.precision": precision,
        # What the runners need to run a tile on a crop with the same output as the
        # whole image: the receptive-field halo and the pooling alignment, input pixels.
        HALO_KEY: str(halo),
        ALIGNMENT_KEY: str(alignment),
    }


class _ForwardRaw(torch.nn.Module):
    """:meth:`FoldedNet.forward_raw` as a module's forward, for the exporter."""

    def __init__(self, folded: FoldedNet) -> None:
        super().__init__()
        self.net = folded

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.net.forward_raw(x)


def write_graph(folded: FoldedNet, path: Path, opset: int) -> None:
    """Export ``folded``'s raw graph (no metadata yet) to ``path``."""
    dynamic = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"}}
    dynamic.update({name: {0: "batch", 2: "out_height", 3: "out_width"} for name in OUTPUT_NAMES})
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of torch.export, which needs
        # the onnxscript package; it handles these plain convolutions exactly.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        with torch.no_grad():
            torch.onnx.export(
                _ForwardRaw(folded).eval(), (torch.zeros(1, 3, 64, 64),), str(path), dynamo=False,
                opset_version=opset, input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                dynamic_axes=dynamic,
            )


def write_metadata(source: Path, path: Path, metadata: Dict[str, str]) -> None:
    """Write the graph of ``source`` with ``metadata`` to ``path`` (may be ``source``),
    checked by ``onnx.checker``."""
    proto = onnx.load(str(source))
    del proto.metadata_props[:]
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    proto.doc_string = (f"R2D2 {metadata['cv2r2d2.model']} ({metadata['cv2r2d2.precision']}), "
                        "exported by cv2r2d2")
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))


def max_abs_error(folded: FoldedNet, path: Path) -> float:
    """Largest output difference, ONNX Runtime vs torch, on an odd-sized random image."""
    image = np.random.default_rng(0).standard_normal((1, 3, 61, 83)).astype(np.float32)
    with torch.no_grad():
        expected = [t.numpy() for t in folded.forward_raw(torch.from_numpy(image))]
    actual = OnnxRuntimeRunner(path).forward(image)
    return float(max(np.abs(a - e).max() for a, e in zip(actual, expected)))


@dataclass
class Export:
    """An export in progress (see :func:`exporting`): the folded network, the metadata of
    the final file, the fp32 graph written (with fp32 metadata) in a temporary folder,
    the temporary file that becomes the output, and the report so far."""

    folded: FoldedNet
    metadata: Dict[str, str]
    fp32: Path
    final: Path
    report: Dict[str, Any]


@contextlib.contextmanager
def exporting(model: str, output: Union[str, os.PathLike], opset: int,
              precision: str) -> Iterator[Export]:
    """Load ``model``, write its fp32 graph, and yield the :class:`Export`; what the
    block writes to ``final`` replaces ``output`` at its end (nothing on an error)."""
    check_opset(opset)
    text = os.fspath(model)
    net = load_model(text, device="cpu")
    metadata = graph_metadata(net, text, precision)
    folded = fold_batchnorm(net)
    report = {"output": str(output), "model": metadata["cv2r2d2.model"], "precision": precision,
              "opset": opset}
    with tempfile.TemporaryDirectory(prefix="cv2r2d2-export-") as folder, \
            atomic_path(output) as final:
        fp32 = Path(folder) / "fp32.onnx"
        write_graph(folded, fp32, opset)
        write_metadata(fp32, fp32, dict(metadata, **{"cv2r2d2.precision": "fp32"}))
        job = Export(folded, metadata, fp32, final, report)
        yield job
        report["bytes"] = final.stat().st_size
    logger.debug("exported %s to %s: %s", text, output, report)


def export_fp32(model: str, output: Union[str, os.PathLike], opset: int = 17) -> dict:
    """Export a model's fp32 graph to ``output``, written whole or not at all.

    Args:
        model: a registry name (``r2d2_WASF_N16``...) or a checkpoint path.
        output: the ``.onnx`` file to write (overwritten).
        opset: ONNX opset version (13 to 20).

    Returns:
        ``output``, ``model``, ``precision`` ("fp32"), ``opset``, ``max_abs_error`` (the
        graph's outputs vs torch's on a test input) and ``bytes``.
    """
    with exporting(model, output, opset, "fp32") as job:
        shutil.copyfile(job.fp32, job.final)
        job.report["max_abs_error"] = _significant(max_abs_error(job.folded, job.final))
    return job.report


def export_int8(
    model: str,
    output: Union[str, os.PathLike],
    calibration: Sequence[np.ndarray],
    evaluation: Sequence[np.ndarray],
    opset: int = 17,
    show_progress: bool = False,
) -> dict:
    """Export a model quantised to int8 to ``output``, written whole or not at all.

    Static quantisation, per channel (QDQ, uint8 activations, 7-bit int8 weights), the
    first convolution (RGB input) and the 1x1 heads kept in fp32.

    Args:
        model: a registry name or a checkpoint path.
        output: the ``.onnx`` file to write (overwritten).
        calibration: BGR uint8 images whose activation ranges set the quantisation.
        evaluation: other BGR uint8 images (not calibrated on), to measure the result
            against fp32 (:func:`int8_report`); may be empty.
        opset: ONNX opset version (13 to 20).
        show_progress: progress bars for the calibration and the accuracy check.

    Returns:
        ``output``, ``model``, ``precision`` ("int8"), ``opset``, ``bytes``,
        ``calibration_images``, ``fp32_max_abs_error`` (the fp32 graph quantised, vs
        torch) and, with evaluation images, :func:`int8_report`'s figures.
    """
    if len(calibration) < 1:
        raise ValueError("int8 quantisation needs at least one calibration image")
    with exporting(model, output, opset, "int8") as job:
        quantised = job.fp32.with_name("int8.onnx")
        logger.info("calibrating the int8 ranges on %d image(s)", len(calibration))
        quantize_int8(job.fp32, quantised, calibration, show_progress)
        write_metadata(quantised, job.final, job.metadata)
        job.report["fp32_max_abs_error"] = _significant(max_abs_error(job.folded, job.fp32))
        if len(evaluation):
            job.report.update(int8_report(OnnxRuntimeRunner(job.fp32), OnnxRuntimeRunner(job.final),
                                          evaluation, show_progress))
        job.report["calibration_images"] = len(calibration)
    return job.report


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


def quantize_int8(fp32_path: Path, output: Path, images: Sequence[np.ndarray],
                  show_progress: bool = False) -> None:
    """Quantise the fp32 graph ``fp32_path`` into ``output``, with the activation ranges
    (min and max) of ``images`` (BGR uint8, any size)."""
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


# Synthetic homography pairs for the int8 report's MMA: each image's corners (TL, TR,
# BR, BL) move by these fractions of its width and height.
HOMOGRAPHIES = (
    ((0.10, 0.05), (-0.05, 0.10), (-0.10, -0.05), (0.05, -0.10)),
    ((0.15, 0.00), (-0.15, 0.00), (0.00, 0.00), (0.00, 0.00)),
    ((0.20, 0.20), (-0.10, 0.15), (-0.20, -0.20), (0.10, -0.15)),
)


def _significant(value: float, digits: int = 2) -> float:
    """``value`` to ``digits`` significant digits (an error's size, not its noise)."""
    return float(f"{value:.{digits}g}")


def _fraction(value: float) -> float:
    """A fraction or accuracy to 3 decimals: the run-to-run noise of these figures is
    larger than 1e-3."""
    return round(float(value), 3)


def int8_report(fp32: NetworkRunner, int8: NetworkRunner, images: Sequence[np.ndarray],
                show_progress: bool = False) -> dict:
    """An int8 network against the fp32 one on ``images`` (BGR uint8), paper settings.

    Returns:
        ``keypoints_within_2px`` (the fraction of fp32 keypoints with an int8 keypoint
        within 2 px), ``descriptor_cosine_median`` / ``_p01`` (int8 vs fp32 descriptors
        at the fp32 keypoints), ``mma3_fp32`` and ``mma3_int8`` (mean matching accuracy
        at 3 px on the images' :data:`HOMOGRAPHIES` warps) and ``evaluation_images``
        (the count), rounded to 3 decimals.
    """
    logger.info("measuring the int8 network against fp32 on %d image(s)", len(images))
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
    report["mma3_fp32"] = _fraction(_mean(accuracy_fp32))
    report["mma3_int8"] = _fraction(_mean(accuracy_int8))
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
    nan = float("nan")
    return {
        "keypoints_within_2px": _fraction(_mean(within)),
        "descriptor_cosine_median": _fraction(np.median(cosines)) if len(cosines) else nan,
        "descriptor_cosine_p01": _fraction(np.percentile(cosines, 1)) if len(cosines) else nan,
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
        descriptors at the reference keypoints (3 decimals).
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

