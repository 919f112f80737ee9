"""Export an R2D2 network's fp32 graph to ONNX, with the metadata the ONNX backends read.

The graph is :meth:`FoldedNet.forward_raw` (BatchNorm folded in) with dynamic batch,
height and width: input ``image`` (B, 3, H, W), outputs ``descriptors_raw``
(B, dim, H', W'), ``reliability_logits`` (B, 2, H', W') and ``repeatability_logit``
(B, 1, H', W'). The heads' softmax, softplus and normalisation stay outside the graph
(``cv2.dnn`` returns NaN for softplus/(1+softplus) inside it); :mod:`cv2r2d2.onnx_runner`
applies them in numpy. The file's metadata names the model, its licence and the
paper's settings, and gives the receptive-field halo and alignment with which the
runners crop tiles. Exporting needs torch and onnx; int8 quantisation and its accuracy
report are built on this in :mod:`cv2r2d2.export`.
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
from typing import Any, Dict, Iterator, Tuple, Union

import numpy as np
import onnx
import torch

from .extractor import ExtractionParams
from .nets import FoldedNet, R2D2Net, fold_batchnorm
from .onnx_runner import ALIGNMENT_KEY, HALO_KEY, INPUT_NAME, OUTPUT_NAMES, OnnxRuntimeRunner
from .torch_runner import receptive_halo
from .utils import atomic_path
from .weights import MODELS, load_model

__all__ = ["export_fp32", "exporting", "Export", "check_opset", "graph_metadata", "write_graph", "write_metadata",
           "max_abs_error"]

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
        job.report["max_abs_error"] = max_abs_error(job.folded, job.final)
    return job.report
