"""Network precision (fp32, bf16, int8, auto) and the CPU probe (cv2r2d2.precision)."""
from __future__ import annotations

import logging

import cv2
import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree

import cv2r2d2
from conftest import read_image, weights_file
from cv2r2d2 import derived
from cv2r2d2.backends import resolve_precision
from cv2r2d2.config import R2D2Config
from cv2r2d2.precision import (
    PRECISIONS, CpuCapability, check_precision, choose_precision, probe_cpu, warn_if_slower,
)
from cv2r2d2.weights import CACHE_DIR_ENV
from test_derived import TINY, int8_cache  # noqa: F401 (a fixture)

MODEL = "r2d2_WASF_N16"
ZEN4 = CpuCapability("Test Zen 4", "AVX512", frozenset({"avx2", "avx512f", "avx512_bf16", "avx512_vnni"}))
AVX2 = CpuCapability("Test AVX2 CPU", "AVX2", frozenset({"avx2"}))


def _cpu(*flags: str) -> CpuCapability:
    return CpuCapability("Test CPU " + " ".join(flags), "AVX512", frozenset(flags))


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return cv2.resize(read_image("boat.png"), (320, 320), interpolation=cv2.INTER_AREA)


def test_unknown_precision_lists_the_valid_ones():
    for value in ("fp16", "half", True, None):
        with pytest.raises(ValueError, match=r"precision must be one of fp32, bf16, int8, auto, got"):
            cv2r2d2.R2D2Feature.create(precision=value)
    assert PRECISIONS == ("fp32", "bf16", "int8", "auto") and R2D2Config().precision == "fp32"


@pytest.mark.parametrize("precision, backend, model, message", [
    ("bf16", "reference", MODEL, "needs backend='torch'"),
    ("int8", "reference", MODEL, "needs backend='torch'"),
    ("bf16", "onnxruntime", MODEL, "ONNX backends run fp32 or int8"),
    ("bf16", "opencv", MODEL, "ONNX backends run fp32 or int8"),
    ("int8", "onnxruntime", "exported.onnx", "runs as exported"),
    ("bf16", "torch", "exported.ONNX", "runs as exported"),
])
def test_precisions_a_backend_cannot_run_are_refused(precision, backend, model, message):
    with pytest.raises(ValueError, match=message):
        R2D2Config(model=model, backend=backend, precision=precision)
    for fine in ("fp32", "auto"):
        assert check_precision(fine, backend, model) == fine


def test_the_command_line_takes_a_precision():
    from cv2r2d2.cli import build_parser
    from cv2r2d2.cli.options import feature_config

    parser = build_parser()
    args = parser.parse_args(["extract", "photos", "-o", "f.h5", "--precision", "bf16"])
    assert feature_config(args).precision == "bf16"
    default = parser.parse_args(["extract", "photos", "-o", "f.h5"])
    assert feature_config(default).precision == "fp32"
    with pytest.raises(SystemExit):
        parser.parse_args(["extract", "photos", "-o", "f.h5", "--precision", "fp16"])


@pytest.mark.parametrize("capability, backend, expected", [
    (ZEN4, "torch", "int8"),
    (_cpu("avx512_bf16"), "torch", "bf16"),
    (_cpu("amx_bf16", "avx512_bf16"), "torch", "bf16"),
    (_cpu("avx_vnni"), "torch", "int8"),
    (AVX2, "torch", "fp32"),
    (ZEN4, "onnxruntime", "int8"),
    (_cpu("avx512_bf16"), "onnxruntime", "fp32"),  # bf16 needs torch
    (ZEN4, "reference", "fp32"),
    (ZEN4, "opencv", "fp32"),
])
def test_auto_picks_by_the_cpu_capability(capability, backend, expected):
    assert resolve_precision(MODEL, "cpu", backend, "auto", capability) == expected


def test_auto_runs_an_exported_file_as_it_is():
    assert resolve_precision("model.onnx", None, "onnxruntime", "auto", ZEN4) == "fp32"


def test_auto_is_fp32_on_an_avx2_cpu_and_falls_back_without_onnxruntime():
    precision, reason = choose_precision(AVX2, torch_available=True, onnxruntime_available=True)
    assert precision == "fp32" and "no VNNI" in reason and "no native bf16" in reason
    assert not warn_if_slower("fp32", AVX2)
    assert choose_precision(ZEN4, True, onnxruntime_available=False)[0] == "bf16"
    precision, reason = choose_precision(_cpu("avx512_vnni"), True, onnxruntime_available=False)
    assert precision == "fp32" and "int8 needs onnxruntime" in reason


def test_bf16_warns_once_where_the_cpu_lacks_native_bf16(caplog):
    with caplog.at_level(logging.WARNING, logger="cv2r2d2.precision"):
        assert warn_if_slower("bf16", AVX2)
        assert warn_if_slower("bf16", AVX2)
        assert not warn_if_slower("bf16", ZEN4)
    assert len(caplog.records) == 1
    assert "slower than fp32" in caplog.text and "0.57" in caplog.text and "Test AVX2 CPU" in caplog.text


def test_the_probe_reads_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU 9000\n"
                       "flags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16 sha_ni\n\n"
                       "processor\t: 1\nmodel name\t: Some CPU 9000\nflags\t\t: fpu\n")
    capability = probe_cpu(str(cpuinfo))
    assert capability.model == "Some CPU 9000"
    assert capability.flags == {"avx2", "avx512f", "avx512_vnni", "avx512_bf16"}
    assert capability.native_bf16 and capability.vnni
    assert capability.torch_capability == torch.backends.cpu.get_cpu_capability()
    assert "avx512_bf16" in capability.describe() and "Some CPU 9000" in capability.describe()
    bare = probe_cpu(str(tmp_path / "absent"))
    assert bare.flags == frozenset() and not bare.native_bf16 and not bare.vnni


@pytest.mark.slow  # two full extractions
def test_bf16_keeps_fp32_keypoints_and_descriptors(image):
    weights_file(MODEL)
    exact = cv2r2d2.R2D2Feature.create(device="cpu", nfeatures=1000)
    bf16 = cv2r2d2.R2D2Feature.create(device="cpu", nfeatures=1000, precision="bf16",
                                      num_threads=1)
    assert bf16.getPrecision() == "bf16" and bf16._runner().precision == "bf16"
    threads = []
    run = bf16._runner().run
    bf16._runner().run = lambda *args: threads.append(torch.get_num_threads()) or run(*args)
    points, descriptors = exact.detectAndCompute(image, None)
    theirs, their_descriptors = bf16.detectAndCompute(image, None)
    assert set(threads) == {1}  # num_threads holds for the bf16 runner too
    assert their_descriptors.dtype == np.float32 and len(theirs) == len(points) == 1000
    ours, theirs = cv2.KeyPoint_convert(points), cv2.KeyPoint_convert(theirs)
    distance, index = cKDTree(theirs).query(ours)
    shared = distance <= 1.0
    assert shared.mean() >= 0.95
    cosine = np.sum(descriptors[shared] * their_descriptors[index[shared]], axis=1)
    assert np.median(cosine) >= 0.99 and np.quantile(cosine, 0.05) >= 0.97


def test_int8_runs_the_network_built_on_first_use(int8_cache, monkeypatch, image):  # noqa: F811
    from cv2r2d2.onnx_runner import OnnxRuntimeRunner, OpenCVRunner

    monkeypatch.setenv(CACHE_DIR_ENV, str(int8_cache))
    monkeypatch.setattr(derived, "DEFAULT_CALIBRATION", TINY)
    built = []
    monkeypatch.setattr(derived, "_build", lambda *args: built.append(args))
    int8 = cv2r2d2.R2D2Feature.create(precision="int8", num_threads=1, nfeatures=500)
    runner = int8._runner()
    assert isinstance(runner, OnnxRuntimeRunner) and built == []
    assert runner.path.parent == int8_cache / "int8"
    assert runner.session.get_session_options().intra_op_num_threads == 1
    keypoints, descriptors = int8.detectAndCompute(image, None)
    assert len(keypoints) == 500 and descriptors.shape == (500, 128)
    opencv = cv2r2d2.R2D2Feature.create(precision="int8", backend="opencv")
    assert isinstance(opencv._runner(), OpenCVRunner) and opencv._runner().path == runner.path
    monkeypatch.setattr("cv2r2d2.backends.probe_cpu", lambda: ZEN4)
    auto = cv2r2d2.R2D2Feature.create(precision="auto", device="cpu")
    assert auto.getPrecision() == "auto" and auto._runner().path == runner.path
