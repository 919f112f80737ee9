"""The ``cv2r2d2`` command line, run in-process through ``main(argv)``."""
from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import stat
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import ROOT, read_image, record_progress, weights_dir, weights_file
from cv2r2d2 import feature2d
from cv2r2d2.cli import main
from cv2r2d2.stores import H5Features, ImageFeatures

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


def test_extract_small_images_at_their_own_size(photos, tmp_path, capsys):
    """Images under min_size (no pyramid level) are extracted at scale 1, said once."""
    small = tmp_path / "small"
    small.mkdir()
    for name in ("crop0.png", "crop1.png"):
        cv2.imwrite(str(small / name), cv2.resize(cv2.imread(str(photos / name)), (200, 150)))
    output = tmp_path / "small.h5"
    feature2d._tell_own_size.cache_clear()
    assert main(["extract", str(small), "-o", str(output), "--device", "cpu"]) == 0
    with h5py.File(output, "r") as f:
        assert all(f[f"{name}/keypoints"].shape[0] > 50 for name in ("crop0.png", "crop1.png"))
    assert capsys.readouterr().err.count("too small for the pyramid") == 1


def test_progress_counts_images_and_pairs(features, photos, tmp_path, monkeypatch):
    import cv2r2d2.collection

    bars = record_progress(monkeypatch, cv2r2d2.collection)
    assert main(["extract", str(photos), "-o", str(tmp_path / "f.h5"), "-q", *FAST]) == 0
    assert bars == [["extract", "image", 4, 4]]  # corrupt.jpg too
    bars = record_progress(monkeypatch, cv2r2d2.collection)
    assert main(["match", str(features), "--pairs", "exhaustive", "-o", str(tmp_path / "m.h5"),
                 "-q", "--device", "cpu"]) == 0
    assert bars == [["match", "pair", 3, 3]]


def test_log_lines_go_above_progress_bars(photos, tmp_path, monkeypatch):
    """While a command runs, the package's log handler is tqdm's (records print above
    the bars); it is removed afterwards."""
    pytest.importorskip("tqdm")
    from tqdm.contrib.logging import _TqdmLoggingHandler

    import cv2r2d2.cli.collection

    seen = []
    monkeypatch.setattr(cv2r2d2.cli.collection, "_run_extract", lambda args: seen.append(
        [type(h) for h in logging.getLogger("cv2r2d2").handlers]) or 0)
    before = list(logging.getLogger("cv2r2d2").handlers)
    assert main(["extract", str(photos), "-o", str(tmp_path / "f.h5")]) == 0
    assert seen == [[_TqdmLoggingHandler]] and logging.getLogger("cv2r2d2").handlers == before


def test_licence_notice_once_per_cache_and_not_with_quiet(photos, tmp_path, capsys,
                                                         monkeypatch):
    from cv2r2d2 import weights

    weights_dir()
    monkeypatch.setenv("CV2R2D2_CACHE_DIR", str(tmp_path / "cache"))
    args = ["extract", str(photos / "crop0.png"), "-o", str(tmp_path / "r2d2"), *FAST]
    weights._tell_licence.cache_clear()
    assert main([*args, "-q"]) == 0
    assert "CC BY-NC-SA" not in capsys.readouterr().err
    assert main(args) == 0 and main([*args, "--overwrite", "--model", "r2d2_WAF_N16"]) == 0
    assert capsys.readouterr().err.count("CC BY-NC-SA") == 1
    weights._tell_licence.cache_clear()  # as a new process: the cache remembers it
    assert main([*args, "--overwrite"]) == 0
    assert "CC BY-NC-SA" not in capsys.readouterr().err


def test_help_texts(capsys):
    assert main(["extract", "--help"]) == 0
    assert "COLMAP" not in capsys.readouterr().out
    assert main(["sfm", "--help"]) == 0
    assert "debug messages and COLMAP's own log" in capsys.readouterr().out
    for command, usage in (["-m", "cv2r2d2.train"], "usage: python -m cv2r2d2.train"), \
            (["-c", "import sys; sys.argv[0] = '/venv/bin/cv2r2d2-train'; "
                    "from cv2r2d2.cli import train_main as main; main()"], "usage: cv2r2d2-train"):
        done = subprocess.run([sys.executable, *command, "--help"], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and done.stdout.startswith(usage), done.stdout[:200]


def test_match(features, tmp_path, capsys):
    output = tmp_path / "matches.h5"
    assert main(["match", str(features), "--pairs", "sequential:1", "-o", str(output),
                 "--device", "cpu"]) == 0
    assert "matched 2 pair(s)" in capsys.readouterr().out
    with h5py.File(output, "r") as f:
        assert sorted(f) == ["crop0.png", "crop1.png"]
        assert (f["crop0.png/crop1.png/matches0"][()] >= 0).sum() > 50
    assert main(["match", str(features), "--pairs", "exhaustive", "-o", str(output),
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "matched 1 pair(s)" in out and "2 already done" in out
    # Other matching settings never add to matches of these (nor reuse them).
    assert main(["match", str(features), "--pairs", "exhaustive", "-o", str(output),
                 "--device", "cpu", "--ratio", "0.9"]) == 1
    assert "ratio: stored None, now 0.9" in capsys.readouterr().err
    one = tmp_path / "one.h5"  # a pair with one match
    with H5Features(one, writable=True) as store:
        for name in ("a.png", "b.png"):
            store.write(name, ImageFeatures(np.zeros((1, 2), np.float32),
                                            np.ones((1, 128), np.float32),
                                            np.ones(1, np.float32), (8, 8)))
    assert main(["match", str(one), "--pairs", "exhaustive", "-o", str(tmp_path / "m1.h5"),
                 "--device", "cpu"]) == 0
    assert "matched 1 pair(s) (1 match on average)" in capsys.readouterr().out


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


def test_a_missing_device_is_one_line_and_writes_nothing(features, photos, tmp_path, capsys,
                                                        monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.version, "cuda", None)
    for command in (["match", str(features), "--pairs", "exhaustive", "-o", str(tmp_path / "m.h5")],
                    ["extract", str(photos), "-o", str(tmp_path / "f.h5")]):
        assert main([*command, "--device", "cuda"]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"cv2r2d2 {command[0]}: error: device 'cuda' is not available: ")
        assert err.endswith("; available: cpu\n") and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_sfm_database_only(photos, features, tmp_path, capsys):
    pycolmap = pytest.importorskip("pycolmap")
    output = tmp_path / "sfm"
    output.mkdir()
    (output / "features.h5").write_bytes(features.read_bytes())  # resumed, not redone
    assert main(["sfm", str(photos), str(output), "--database-only", "--camera-mode",
                 "single", "--preset", "paper", "--refine", "-q", *FAST]) == 0
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


def test_a_failed_reconstruction_says_why_and_leaves_no_model_folder(tmp_path, capfd):
    """Two unrelated photos: no pair verifies; the stage is named with what to try,
    COLMAP's own log stays quiet, and no sparse/ is left."""
    pytest.importorskip("pycolmap")
    weights_dir()
    photos = tmp_path / "unrelated"
    photos.mkdir()
    cv2.imwrite(str(photos / "boat.png"), cv2.resize(read_image("boat.png"), (256, 192)))
    cv2.imwrite(str(photos / "peppers.png"), cv2.resize(read_image("peppers.png"), (256, 192)))
    output = tmp_path / "out"
    (output / "sparse" / "0").mkdir(parents=True)  # a model of an earlier run
    assert main(["sfm", str(photos), str(output), "--preset", "paper", "-q", *FAST]) == 1
    err = capfd.readouterr().err
    assert "error: COLMAP could not reconstruct anything from '" in err
    assert "no image pair passed COLMAP's geometric verification (of 1 pair(s)" in err
    assert "overlap more" in err and "--rotations 12" in err
    assert not any(line[:1] in "EWIF" and line[1:5].isdigit() for line in err.splitlines())
    assert not (output / "sparse").exists()


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


def test_eval_hpatches(tmp_path, capsys, monkeypatch):
    root = _hpatches(tmp_path / "hpatches")
    output = tmp_path / "out" / "results.json"
    args = ["eval-hpatches", str(root), "--methods", "sift,orb", "-o", str(output), "-q",
            "--device", "cpu"]
    monkeypatch.chdir(tmp_path / "hpatches")
    previous = os.umask(0o027)  # a real umask: the outputs must follow it
    try:
        if importlib.util.find_spec("matplotlib"):
            assert main(args) == 0  # the plot goes beside the results
            assert sorted(p.name for p in output.parent.iterdir()) == ["results.json", "results.png"]
        else:
            assert main([*args, "--no-plot"]) == 0
    finally:
        os.umask(previous)
    assert not list(Path.cwd().glob("*.png"))
    for path in output.parent.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path
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
    captured = capsys.readouterr()
    assert (captured.out + captured.err).count("max_abs_error") == 1  # the report, once


def _model_copy(folder: Path, monkeypatch) -> Path:
    """The official weights copied into a folder of their own, and a cache folder of
    their own for their steerers (``folder / "cache"``)."""
    monkeypatch.setenv("CV2R2D2_CACHE_DIR", str(folder / "cache"))
    path = folder / "mine.pt"
    shutil.copyfile(weights_file("r2d2_WASF_N16"), path)
    return path


def test_match_with_rotations(features, r2d2, tmp_path, capsys, monkeypatch):
    from cv2r2d2.steerer_cache import load_steerers
    from cv2r2d2.steerer_fitting import FitSettings

    model = _model_copy(tmp_path, monkeypatch)
    # Small steerers cached beforehand: the command reads them instead of fitting.
    load_steerers(r2d2, model, [90, 180], FitSettings(image_size=64, num_images=1, margin=8),
                  show_progress=False)
    plain, steered = tmp_path / "plain.h5", tmp_path / "steered.h5"
    common = ["--pairs", "sequential:1", "--device", "cpu", "-q"]
    assert main(["match", str(features), "-o", str(plain), *common]) == 0
    assert main(["match", str(features), "-o", str(steered), *common, "--rotations", "4",
                 "--model", str(model)]) == 0
    # The crops are shifted, not rotated: rotation 0 wins, and gives the plain matches.
    with h5py.File(plain, "r") as a, h5py.File(steered, "r") as b:
        for key in ("crop0.png/crop1.png/matches0", "crop1.png/crop2.png/matches0"):
            np.testing.assert_array_equal(a[key][()], b[key][()])
    capsys.readouterr()
    assert main(["match", str(features), "-o", str(steered), *common, "--rotations", "7"]) == 1
    assert "divisor of 360" in capsys.readouterr().err


def test_fit_steerers(tmp_path, capsys, monkeypatch):
    weights_dir()
    model = _model_copy(tmp_path, monkeypatch)
    images = tmp_path / "images"
    images.mkdir()
    cv2.imwrite(str(images / "boat.png"), read_image("boat.png")[100:300, 100:300])
    assert main(["fit-steerers", "--help"]) == 0
    assert "--images DIR" in capsys.readouterr().out
    assert main(["fit-steerers", "--model", str(model), "--images", str(images),
                 "--rotations", "2", "--device", "cpu", "-q"]) == 0
    out = capsys.readouterr().out
    assert "1 steerer(s) of" in out and "180 deg:" in out
    [cache] = (tmp_path / "cache").glob("mine.steerers-*.npz")
    assert not list(tmp_path.glob("mine.steerers-*"))  # never beside the weights
    with np.load(cache) as data:
        assert str(images) in str(data["settings"])
    assert main(["fit-steerers", "--images", str(tmp_path / "none")]) == 1
    assert "no such image folder" in capsys.readouterr().err
    assert main(["fit-steerers", "--rotations", "7"]) == 1
    assert "divisor of 360" in capsys.readouterr().err


def test_sfm_and_eval_hpatches_check_rotations_first(photos, tmp_path, capsys):
    pytest.importorskip("pycolmap")
    assert main(["sfm", str(photos), str(tmp_path / "sfm"), "--rotations", "7", *FAST]) == 1
    assert "divisor of 360" in capsys.readouterr().err
    assert not (tmp_path / "sfm" / "features.h5").exists()  # refused before extracting
    assert main(["eval-hpatches", str(tmp_path), "--rotations", "7", "--no-plot"]) == 1
    assert "divisor of 360" in capsys.readouterr().err


def test_sfm_refinement_options_need_refine_and_a_readable_model(photos, tmp_path, capsys):
    pytest.importorskip("pycolmap")
    output = tmp_path / "sfm"
    assert main(["sfm", str(photos), str(output), "--no-refine", "--refine-upsample", "2",
                 *FAST]) == 1
    assert "--no-refine turns off" in capsys.readouterr().err
    missing = tmp_path / "int8.onnx"
    assert main(["sfm", str(photos), str(output), "--refine", "--refine-model", str(missing),
                 *FAST]) == 1
    assert "int8.onnx" in capsys.readouterr().err
    assert main(["sfm", str(photos), str(output), "--refine", "--refine-upsample", "0", *FAST]) == 1
    assert "upsample" in capsys.readouterr().err
    assert not (output / "features.h5").exists()  # all refused before extracting


def test_pairs_and_localize_take_the_ray_options_but_not_merge(capsys):
    from cv2r2d2.cli import build_parser

    parser = build_parser()
    for command in (["pairs", "f.h5", "-o", "p.txt", "--retrieval", "3"],
                    ["localize", "model", "queries", "-o", "r.txt"]):
        args = parser.parse_args(command + ["--ray", "auto", "--actors", "2", "--threads", "1",
                                            "--block-size", "4"])
        assert (args.ray, args.actors, args.threads, args.block_size) == ("auto", 2, 1, 4)
        with pytest.raises(SystemExit):
            parser.parse_args(command + ["--ray", "--merge"])
        assert "--merge" in capsys.readouterr().err
