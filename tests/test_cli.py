"""The ``cv2r2d2`` command line, run in-process through ``main(argv)``."""
from __future__ import annotations

import importlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import ROOT, read_image, weights_dir
from cv2r2d2.cli import main

h5py = pytest.importorskip("h5py")

# Small inputs for speed: one pyramid level.
FAST = ["--device", "cpu", "--nfeatures", "500", "--min-size", "256", "--max-size", "256"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Three overlapping 256 x 192 crops of brooklyn (a plane seen with shifts) and a
    corrupt file."""
    folder = tmp_path_factory.mktemp("photos")
    brooklyn = read_image("brooklyn.png")
    for i, x in enumerate((400, 460, 520)):
        cv2.imwrite(str(folder / f"crop{i}.png"), brooklyn[300:492, x:x + 256])
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8 truncated")
    return folder


@pytest.fixture(scope="module")
def features(photos, tmp_path_factory) -> Path:
    weights_dir()
    path = tmp_path_factory.mktemp("features") / "features.h5"
    assert main(["extract", str(photos), "-o", str(path), "-q", *FAST]) == 0
    return path


def test_help_lists_the_subcommands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("extract", "match", "sfm", "eval-hpatches", "heatmap", "export-onnx"):
        assert command in out
    assert main(["extract", "--help"]) == 0
    assert "--nfeatures NFEATURES" in capsys.readouterr().out
    assert main(["no-such-command"]) == 2


def test_python_dash_m():
    done = subprocess.run([sys.executable, "-m", "cv2r2d2", "--version"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("cv2r2d2 ")


def test_extract_reports_unreadable_images_and_resumes(features, photos, capsys):
    with h5py.File(features, "r") as f:
        assert sorted(f) == ["crop0.png", "crop1.png", "crop2.png"]
        assert f["crop0.png/keypoints"].shape[0] <= 500
    capsys.readouterr()
    assert main(["extract", str(photos), "-o", str(features), *FAST]) == 0
    captured = capsys.readouterr()
    assert "extracted 0 image(s), 3 already done" in captured.out
    assert "corrupt.jpg" in captured.err and "skipped" in captured.err


def test_extract_r2d2_format(photos, tmp_path):
    assert main(["extract", str(photos / "crop0.png"), "-o", str(tmp_path / "out"), "-q",
                 *FAST]) == 0
    with np.load(tmp_path / "out" / "crop0.png.r2d2") as data:
        assert data["keypoints"].shape[1] == 3 and list(data["imsize"]) == [256, 192]


def test_match(features, tmp_path, capsys):
    output = tmp_path / "matches.h5"
    assert main(["match", str(features), "--pairs", "sequential:1", "-o", str(output),
                 "--device", "cpu"]) == 0
    assert "matched 2 pair(s)" in capsys.readouterr().out
    with h5py.File(output, "r") as f:
        assert sorted(f) == ["crop0.png", "crop1.png"]
        assert (f["crop0.png/crop1.png/matches0"][()] >= 0).sum() > 50
    assert main(["match", str(features), "--pairs", "exhaustive", "-o", str(output),
                 "--device", "cpu", "--ratio", "0.9"]) == 0
    out = capsys.readouterr().out
    assert "matched 1 pair(s)" in out and "2 already done" in out


def test_errors_are_messages_not_tracebacks(features, tmp_path, capsys, monkeypatch):
    assert main(["match", str(features), "--pairs", "sequential:x", "-o",
                 str(tmp_path / "m.h5")]) == 1
    err = capsys.readouterr().err
    assert "cv2r2d2 match: error:" in err and "sequential:k" in err and "Traceback" not in err
    assert main(["match", str(tmp_path / "none.h5"), "--pairs", "exhaustive", "-o",
                 str(tmp_path / "m.h5")]) == 1
    assert "no such file" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "h5py", None)  # as if h5py were not installed
    assert main(["match", str(features), "--pairs", "exhaustive", "-o",
                 str(tmp_path / "m.h5")]) == 1
    assert "pip install h5py" in capsys.readouterr().err


def test_sfm_database_only(photos, features, tmp_path, capsys):
    pycolmap = pytest.importorskip("pycolmap")
    output = tmp_path / "sfm"
    output.mkdir()
    (output / "features.h5").write_bytes(features.read_bytes())  # resumed, not redone
    assert main(["sfm", str(photos), str(output), "--database-only", "--camera-mode",
                 "single", "--refine", "-q", *FAST]) == 0
    captured = capsys.readouterr()
    assert "images:                4 (1 unreadable)" in captured.out
    assert "verified image pairs:  3 / 3" in captured.out
    assert "refined keypoints:     " in captured.out and "tracks" in captured.out
    assert (output / "refined_keypoints.npz").is_file()
    assert "corrupt.jpg" in captured.err
    database = pycolmap.Database.open(str(output / "database.db"))
    try:
        assert database.num_images() == 3 and database.num_matched_image_pairs() == 3
        assert database.num_verified_image_pairs() == 3
    finally:
        database.close()


def _hpatches(root: Path) -> Path:
    """One viewpoint and one illumination sequence of 6 images each."""
    boat = cv2.resize(read_image("boat.png"), (256, 256), interpolation=cv2.INTER_AREA)
    for name in ("i_boat", "v_boat"):
        (root / name).mkdir(parents=True)
        for k in range(1, 7):
            H = np.eye(3)
            if name.startswith("v_") and k > 1:
                H = np.array([[1 + 0.02 * k, 0.01 * k, 2.0 * k], [0, 1, -k], [0, 0, 1]])
            image = cv2.warpPerspective(boat, H, (256, 256), borderMode=cv2.BORDER_REFLECT)
            if name.startswith("i_"):
                image = np.clip(image * (1.1 - 0.1 * k) + 5 * k, 0, 255).astype(np.uint8)
            cv2.imwrite(str(root / name / f"{k}.ppm"), image)
            if k > 1:
                np.savetxt(root / name / f"H_1_{k}", H)
    return root


def test_eval_hpatches(tmp_path, capsys):
    root = _hpatches(tmp_path / "hpatches")
    output = tmp_path / "results.json"
    args = ["eval-hpatches", str(root), "--methods", "sift,orb", "-o", str(output), "-q",
            "--device", "cpu"]
    if importlib.util.find_spec("matplotlib"):
        assert main([*args, "--plot", str(tmp_path / "mma.png")]) == 0
        assert (tmp_path / "mma.png").is_file()
    else:
        assert main([*args, "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "sift" in out and "orb" in out and "illumination" in out
    assert "REPEATABILITY on HPatches" in out and "MATCHING SCORE on HPatches" in out
    results = json.loads(output.read_text())
    assert results["sequences"] == {"i": 1, "v": 1}
    sift = results["methods"]["sift"]
    assert sift["mma"]["overall"][2] > 0.8
    assert sift["repeatability"]["overall"][2] > 0.5 and sift["matching_score"]["overall"][2] > 0.3
    assert main(["eval-hpatches", str(root), "--methods", "surf"]) == 2


def test_heatmap(photos, tmp_path, capsys):
    weights_dir()
    output = tmp_path / "heat.png"
    assert main(["heatmap", str(photos / "crop0.png"), "-o", str(output), "--which",
                 "repeatability", "--scale", "0.5", "--keypoints", "-q", *FAST]) == 0
    assert "repeatability map of 128x96 pixels" in capsys.readouterr().out
    heatmap = cv2.imread(str(output))
    assert heatmap.shape == (192, 256, 3)
    # White keypoint circles: no heat colour blended with the photo is that light.
    assert (heatmap.min(axis=2) > 200).sum() > 100
    assert main(["heatmap", str(photos / "crop0.png"), "-o", str(output), "--keypoints", "3",
                 "--scale", "0.5", *FAST]) == 0
    assert ", 3 keypoints:" in capsys.readouterr().out
    assert main(["heatmap", str(photos / "crop0.png"), "-o", str(output), "--keypoints", "-1"]) == 1
    assert "--keypoints" in capsys.readouterr().err
    assert main(["heatmap", str(photos / "crop0.png"), "-o", str(tmp_path / "heat.xyz")]) == 1
    assert "no encoder for '.xyz'" in capsys.readouterr().err
    assert main(["heatmap", str(photos / "crop0.png"), "-o", str(output), "--which", "x"]) == 2


def test_export_onnx(tmp_path, capsys):
    pytest.importorskip("onnx")
    try:
        importlib.import_module("cv2r2d2.export")
    except ImportError as exc:
        pytest.skip(f"cv2r2d2.export is not importable: {exc}")
    weights_dir()
    output = tmp_path / "r2d2.onnx"
    assert main(["export-onnx", "--model", "r2d2_WASF_N16", "--output", str(output)]) == 0
    assert output.is_file() and output.stat().st_size > 100_000
