"""Derived networks built on first use and cached (cv2r2d2.derived), and the cache folder."""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest

from conftest import missing, weights_file
from cv2r2d2 import derived, onnx_export
from cv2r2d2.derived import Calibration, int8_model, read_report
from cv2r2d2.utils import TEMPORARY_GLOB
from cv2r2d2.weights import CACHE_DIR_ENV, cache_dir, sha256sum

MODEL = "r2d2_WASF_N16"
# A calibration small enough for tests: the build takes seconds, not a minute.
TINY = Calibration(images=2, size=128, evaluation_images=1, evaluation_size=128)


def _need_export() -> None:
    for module in ("onnx", "onnxruntime"):
        if importlib.util.find_spec(module) is None:
            missing(f"the {module} package (pip install cv2r2d2[onnx])")


@pytest.fixture(scope="session")
def int8_cache(tmp_path_factory) -> Path:
    """A cache folder holding MODEL's int8 network calibrated as TINY, built once per
    session, offline (a download attempt fails the build). Other test modules using this
    fixture share the folder, so they get a cache hit."""
    _need_export()
    weights_file(MODEL)
    folder = tmp_path_factory.getbasetemp() / "int8-cache"

    def offline(*args, **kwargs):
        raise AssertionError("the first-use build must not reach the network")

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_DIR_ENV, str(folder))
        patch.setattr(urllib.request, "urlopen", offline)
        int8_model(MODEL, TINY, show_progress=False)
    return folder


@pytest.fixture
def cache_copy(int8_cache, tmp_path, monkeypatch) -> Path:
    """A private copy of the session's cache, in use ($CV2R2D2_CACHE_DIR)."""
    folder = tmp_path / "cache"
    shutil.copytree(int8_cache, folder)
    monkeypatch.setenv(CACHE_DIR_ENV, str(folder))
    return folder


@pytest.fixture
def exports(monkeypatch) -> list:
    """The int8 exports run (the real export runs; each call is recorded)."""
    calls = []
    real = onnx_export.export_int8

    def recorded(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(onnx_export, "export_int8", recorded)
    return calls


def test_the_cache_is_the_env_folder_else_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
    monkeypatch.delenv(CACHE_DIR_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "cv2r2d2"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "cv2r2d2"


@pytest.mark.slow  # an int8 build
def test_second_use_is_a_cache_hit_with_a_rounded_report(cache_copy, exports):
    network = int8_model(MODEL, TINY, show_progress=False)
    assert exports == []
    assert network.parent == cache_copy / "int8" and network.name.startswith(f"{MODEL}-")
    assert sorted(p.suffix for p in network.parent.iterdir()) == [".json", ".lock", ".onnx"]
    report = read_report(network)
    assert report["onnx_sha256"] == sha256sum(network) and report["bytes"] == network.stat().st_size
    assert report["key"]["weights_sha256"] == sha256sum(weights_file(MODEL))
    assert report["key"]["calibration"] == dict(images=2, size=128, seed=0, evaluation_images=1,
                                                evaluation_size=128)
    assert report["key"]["source"] == "procedural" and report["key"]["cv2r2d2"]
    assert report["calibration_images"] == 2 and report["evaluation_images"] == 1
    for name in ("keypoints_within_2px", "descriptor_cosine_median", "descriptor_cosine_p01",
                 "mma3_fp32", "mma3_int8"):
        assert report[name] == round(report[name], 3) and 0 < report[name] <= 1, name
    assert report["keypoints_within_2px"] >= 0.9 and report["descriptor_cosine_median"] >= 0.98
    assert float(f"{report['fp32_max_abs_error']:.2g}") == report["fp32_max_abs_error"] < 1e-3
    # Another calibration is another network, beside the first.
    assert derived.cache_key("0" * 64, TINY)[0] != derived.cache_key("0" * 64, Calibration())[0]


@pytest.mark.slow  # an int8 build
def test_a_corrupted_cached_network_is_rebuilt_with_a_warning(cache_copy, exports, caplog):
    network = next((cache_copy / "int8").glob("*.onnx"))
    network.write_bytes(network.read_bytes()[:1000])
    with caplog.at_level(logging.WARNING, logger="cv2r2d2.derived"):
        assert int8_model(MODEL, TINY, show_progress=False) == network
    assert "building the int8 network again" in caplog.text and "sha256" in caplog.text
    assert exports == [network]
    assert read_report(network)["onnx_sha256"] == sha256sum(network)
    assert not list(network.parent.glob(TEMPORARY_GLOB))
    from cv2r2d2.onnx_runner import OnnxRuntimeRunner

    assert OnnxRuntimeRunner(network).descriptor_size == 128


@pytest.mark.slow  # an int8 build
def test_a_network_without_its_report_is_not_used(cache_copy):
    network = next((cache_copy / "int8").glob("*.onnx"))
    parts = read_report(network)["key"]
    assert derived._problem(network, parts) is None
    assert "not the report of this key" in derived._problem(network, dict(parts, cv2r2d2="0.0.0"))
    derived.int8_report_file(network).write_text("{")
    assert "not readable" in derived._problem(network, parts)
    derived.int8_report_file(network).unlink()
    assert "missing" in derived._problem(network, parts)
    network.unlink()
    assert derived._problem(network, parts) == "missing"  # never built: no warning


def test_calibration_settings_are_checked():
    with pytest.raises(ValueError, match="images must be an integer >= 1, got 0"):
        Calibration(images=0)
    with pytest.raises(ValueError, match="size must be >= 64 pixels"):
        Calibration(size=32)


_BUILDER = textwrap.dedent("""
    import logging, sys, time
    from pathlib import Path
    from cv2r2d2.derived import Calibration, int8_model

    logging.basicConfig(level=logging.INFO, stream=sys.stdout)
    # Both processes ask at the same moment: each waits for the other's marker.
    Path(sys.argv[1]).touch()
    while not Path(sys.argv[2]).exists():
        time.sleep(0.01)
    path = int8_model("{model}", Calibration(images=2, size=128, evaluation_images=0),
                      show_progress=False)
    print("NETWORK", path)
""")


@pytest.mark.slow  # two processes building an int8 network
def test_two_processes_building_at_once_leave_one_valid_file(tmp_path):
    _need_export()
    weights_file(MODEL)
    script = tmp_path / "build.py"
    script.write_text(_BUILDER.format(model=MODEL))
    env = dict(os.environ, **{CACHE_DIR_ENV: str(tmp_path / "cache")})
    marks = [str(tmp_path / "a"), str(tmp_path / "b")]
    processes = [subprocess.Popen([sys.executable, str(script), mine, other], env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                 for mine, other in (marks, marks[::-1])]
    logs = [p.communicate(timeout=300)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], logs
    paths = {line.split(" ", 1)[1] for log in logs for line in log.splitlines()
             if line.startswith("NETWORK ")}
    assert len(paths) == 1, logs
    assert sum(log.count("building the int8 network of") for log in logs) == 1, logs
    assert sum(log.count("waiting for another process") for log in logs) == 1, logs
    network = Path(paths.pop())
    assert read_report(network)["onnx_sha256"] == sha256sum(network)
    assert sorted(p.name for p in network.parent.iterdir()) == sorted(
        [network.name, network.with_suffix(".json").name, network.with_suffix(".lock").name])
