"""Feature and match files: round trips, resuming, killed runs, unreadable images."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import ROOT, read_image, weights_dir
from cv2r2d2.collection import detect, extract_collection
from cv2r2d2.image import list_images, write_image
from cv2r2d2.pairs import read_pairs, write_pairs
from cv2r2d2.stores import H5Features, H5Matches, ImageFeatures, R2D2Folder, open_features, pair_key
from cv2r2d2.utils import MissingDependencyError, atomic_path, import_optional

h5py = pytest.importorskip("h5py")


def _features(n: int = 50, seed: int = 0) -> ImageFeatures:
    rng = np.random.default_rng(seed)
    descriptors = rng.normal(size=(n, 128)).astype(np.float32)
    return ImageFeatures(
        keypoints=rng.uniform(0, 300, (n, 2)).astype(np.float32),
        descriptors=descriptors / np.linalg.norm(descriptors, axis=1, keepdims=True),
        scores=np.sort(rng.uniform(0.5, 1, n)).astype(np.float32)[::-1].copy(),
        image_size=(320, 240),
        sizes=rng.choice([32.0, 38.05], n).astype(np.float32),
    )


def _assert_same(a: ImageFeatures, b: ImageFeatures) -> None:
    np.testing.assert_array_equal(a.keypoints, b.keypoints)
    np.testing.assert_array_equal(a.descriptors, b.descriptors)
    np.testing.assert_array_equal(a.scores, b.scores)
    assert tuple(a.image_size) == tuple(b.image_size)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Three 256 x 160 photos (one pyramid level at the paper's settings) and a corrupt file."""
    folder = tmp_path_factory.mktemp("photos")
    for name, crop in (("boat.png", (0, 0)), ("peppers.png", (100, 150))):
        image = read_image(name)
        cv2.imwrite(str(folder / name), image[crop[0]:crop[0] + 160, crop[1]:crop[1] + 256])
    (folder / "sub").mkdir()
    cv2.imwrite(str(folder / "sub" / "brooklyn.jpg"), read_image("brooklyn.png")[300:460, 500:756])
    (folder / "broken.jpg").write_bytes(b"not an image at all")
    return folder


def test_r2d2_format_round_trip_and_layout(tmp_path):
    features = _features()
    store = R2D2Folder(tmp_path / "out")
    store.write("dir/a.jpg", features)
    assert "dir/a.jpg" in store and store.names() == ["dir/a.jpg"]
    read = store.read("dir/a.jpg")
    _assert_same(read, features)
    np.testing.assert_array_equal(read.sizes, features.sizes)
    # The original format: a plain npz named <image>.r2d2 with its four keys.
    with np.load(tmp_path / "out" / "dir" / "a.jpg.r2d2") as data:
        assert sorted(data.files) == ["descriptors", "imsize", "keypoints", "scores"]
        assert data["keypoints"].shape == (50, 3) and data["descriptors"].shape == (50, 128)
        assert list(data["imsize"]) == [320, 240]
        np.testing.assert_array_equal(data["keypoints"][:, 2], features.sizes)
    assert not [p for p in (tmp_path / "out").rglob("*") if p.name.endswith(".tmp")]


def test_h5_format_round_trip_and_hloc_layout(tmp_path):
    features = _features()
    with open_features(tmp_path / "features.h5", writable=True) as store:
        assert isinstance(store, H5Features)
        store.write("dir/a.jpg", features)
        store.write("b.png", _features(0, seed=1))
    with open_features(tmp_path / "features.h5") as store:
        assert store.names() == ["b.png", "dir/a.jpg"]
        _assert_same(store.read("dir/a.jpg"), features)
        assert len(store.read("b.png")) == 0
        with pytest.raises(KeyError, match="c.png"):
            store.read("c.png")
    with h5py.File(tmp_path / "features.h5", "r") as f:
        group = f["dir/a.jpg"]
        assert group["keypoints"].shape == (50, 2)
        assert group["descriptors"].shape == (128, 50)
        assert group["scores"].shape == (50,)
        assert list(group["image_size"][()]) == [320, 240]
        np.testing.assert_array_equal(group["sizes"][()], features.sizes)
    with open_features(tmp_path / "features.h5") as store:
        np.testing.assert_array_equal(store.read("dir/a.jpg").sizes, features.sizes)
    # hloc's own files have no sizes.
    with h5py.File(tmp_path / "features.h5", "a") as f:
        del f["dir/a.jpg/sizes"]
    with open_features(tmp_path / "features.h5") as store:
        assert store.read("dir/a.jpg").sizes is None


def test_incomplete_h5_entry_is_not_done(tmp_path):
    path = tmp_path / "features.h5"
    with h5py.File(path, "w") as f:
        f.create_group("a.png").create_dataset("keypoints", data=np.zeros((3, 2), np.float32))
    with H5Features(path, writable=True) as store:
        assert "a.png" not in store and store.names() == []
        store.write("a.png", _features())
        assert "a.png" in store


def test_matches_round_trip_both_orders(tmp_path):
    indices = np.array([[0, 5], [2, 1], [7, 3]])
    scores = np.array([0.9, 0.8, 0.7], np.float32)
    with H5Matches(tmp_path / "m.h5", writable=True) as matches:
        matches.write("x/a.png", "b.png", indices, scores, num_keypoints0=10)
        assert ("x/a.png", "b.png") in matches and ("b.png", "x/a.png") in matches
        assert ("a.png", "c.png") not in matches
    with H5Matches(tmp_path / "m.h5") as matches:
        got, got_scores = matches.read("x/a.png", "b.png")
        np.testing.assert_array_equal(got, indices)
        np.testing.assert_allclose(got_scores, scores)
        swapped, _ = matches.read("b.png", "x/a.png")
        np.testing.assert_array_equal(swapped, indices[:, ::-1])
    with h5py.File(tmp_path / "m.h5", "r") as f:  # hloc's layout
        matches0 = f[pair_key("x/a.png", "b.png")]["matches0"][()]
        assert pair_key("x/a.png", "b.png") == "x-a.png/b.png"
        assert matches0.shape == (10,) and matches0[0] == 5 and matches0[1] == -1


def test_pairs_file_round_trip(tmp_path):
    write_pairs(tmp_path / "pairs.txt", [("a.png", "b.png"), ("b.png", "c.png")])
    assert read_pairs(tmp_path / "pairs.txt") == [("a.png", "b.png"), ("b.png", "c.png")]
    (tmp_path / "bad.txt").write_text("a.png b.png c.png\n")
    with pytest.raises(ValueError, match="bad.txt:1"):
        read_pairs(tmp_path / "bad.txt")


def test_list_images(photos, tmp_path):
    names = [name for name, _ in list_images([photos])]
    assert names == ["boat.png", "broken.jpg", "peppers.png", "sub/brooklyn.jpg"]
    (tmp_path / "list.txt").write_text(f"# two images\n{photos}/boat.png\n\n{photos}/sub/brooklyn.jpg\n")
    listed = list_images([tmp_path / "list.txt", photos / "peppers.png"])
    assert [path.name for _, path in listed] == ["boat.png", "brooklyn.jpg", "peppers.png"]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list_images([tmp_path / "nowhere"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        list_images([tmp_path / "empty"])
    other = tmp_path / "other"
    other.mkdir()
    cv2.imwrite(str(other / "boat.png"), np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="two images have the name 'boat.png'"):
        list_images([photos, other])


def test_atomic_path_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "result.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["result.json"]


def test_write_image_any_path_by_suffix(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    path = tmp_path / "héatmap" / "out.png"  # a new, non-ASCII folder
    write_image(path, image)
    written = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(written, image)
    assert [p.name for p in path.parent.iterdir()] == ["out.png"]  # no temporary left
    with pytest.raises(ValueError, match="no encoder for '.xyz'"):
        write_image(tmp_path / "out.xyz", image)


def test_missing_dependency_names_the_pip_command():
    with pytest.raises(MissingDependencyError, match="pip install no_such_module"):
        import_optional("no_such_module", "this feature")


def test_detect_gives_detect_and_compute_features(r2d2, photos):
    image = cv2.imread(str(photos / "boat.png"))
    features = detect(r2d2, image)
    keypoints, descriptors = r2d2.detectAndCompute(image, None)
    assert len(features) == len(keypoints) > 100
    np.testing.assert_array_equal(features.xy, cv2.KeyPoint_convert(keypoints))
    np.testing.assert_array_equal(features.descriptors, descriptors)


@pytest.mark.parametrize("output", ["features.h5", "r2d2"])
def test_extract_resumes_and_skips_unreadable_images(r2d2, photos, tmp_path, output):
    images = list_images([photos])
    with open_features(tmp_path / output, writable=True) as store:
        report = extract_collection(images, store, r2d2)
        assert sorted(report.extracted) == ["boat.png", "peppers.png", "sub/brooklyn.jpg"]
        assert [name for name, _ in report.failed] == ["broken.jpg"]
        assert "cannot decode" in report.failed[0][1]
        first = store.read("peppers.png")
        assert len(first) > 100 and first.image_size == (256, 160)
        again = extract_collection(images, store, r2d2)
        assert again.extracted == [] and sorted(again.skipped) == sorted(report.extracted)
        assert [name for name, _ in again.failed] == ["broken.jpg"]
        redone = extract_collection(images[:1], store, r2d2, overwrite=True)
        assert redone.extracted == ["boat.png"]
        _assert_same(store.read("peppers.png"), first)


@pytest.mark.slow  # an extraction killed in a subprocess
def test_killed_run_leaves_a_readable_file_that_resumes(r2d2, photos, tmp_path):
    output = tmp_path / "features.h5"
    env = dict(os.environ, CV2R2D2_WEIGHTS_DIR=str(weights_dir()))
    process = subprocess.Popen(
        [sys.executable, "-m", "cv2r2d2", "extract", str(photos), "-o", str(output),
         "--device", "cpu", "--verbose"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 120
    try:
        for line in process.stderr:  # killed as soon as the first image is written
            if "wrote" in line or time.monotonic() > deadline:
                break
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    with open_features(output) as store:
        done = store.names()
        assert 1 <= len(done) < 3
        for name in done:
            assert len(store.read(name)) > 100
    with open_features(output, writable=True) as store:
        report = extract_collection(list_images([photos]), store, r2d2)
        assert sorted(report.skipped) == done
        assert store.names() == ["boat.png", "peppers.png", "sub/brooklyn.jpg"]
