"""Steerers (cv2r2d2.steerers), their Procrustes fits (steerer_fitting), their cache
(steerer_cache), R2D2Feature.steer."""
from __future__ import annotations

import logging
import shutil
import stat

import cv2
import numpy as np
import pytest

from conftest import read_image, weights_file
from cv2r2d2 import steerer_cache
from cv2r2d2.steerer_cache import cache_file, load_steerers, read_cache
from cv2r2d2.steerer_fitting import FitSettings, fit_steerers, procedural_images, rotate_image
from cv2r2d2.steerers import Steerers, check_angle, fitted_angle, rotation_angles

# Tiny fits (one 64 px image: two network runs per angle) where only the mechanics matter.
SMALL = FitSettings(image_size=64, num_images=1, margin=8)


@pytest.fixture()
def model_copy(tmp_path, monkeypatch):
    """The official weights copied into a writable folder (a checkpoint of one's own);
    the package's cache folder made empty."""
    monkeypatch.setenv("CV2R2D2_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "weights" / "mine.pt"
    path.parent.mkdir()
    shutil.copyfile(weights_file("r2d2_WASF_N16"), path)
    return path


@pytest.fixture()
def count_fits(monkeypatch):
    """The angles of each fit_steerers call that load_steerers makes; the default
    settings made small."""
    monkeypatch.setattr(steerer_cache, "DEFAULT_SETTINGS", SMALL)
    calls = []

    def counted(feature, angles, *args, **kwargs):
        calls.append(list(angles))
        return fit_steerers(feature, angles, *args, **kwargs)

    monkeypatch.setattr(steerer_cache, "fit_steerers", counted)
    return calls


def test_angles():
    assert rotation_angles(1) == (0,)
    assert rotation_angles(12) == tuple(range(0, 360, 30))
    assert rotation_angles(8)[1] == 45
    for bad in (0, -4, 7, 16, 2.5, True, "12"):
        with pytest.raises(ValueError, match="divisor of 360"):
            rotation_angles(bad)
    assert check_angle(-90) == 270 and check_angle(450.0) == 90 and check_angle(np.int64(30)) == 30
    for bad in (22.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="whole number of degrees"):
            check_angle(bad)
    with pytest.raises(TypeError):
        check_angle("90")
    assert [fitted_angle(a) for a in (0, 30, 330, -90, 180, 540)] == [0, 30, 30, 90, 180, 180]


def test_rotate_image_quarter_turns_are_exact_and_the_homography_maps_pixels():
    image = procedural_images(1, 64, seed=3)[0][:, :48]
    for angle, code in ((90, cv2.ROTATE_90_COUNTERCLOCKWISE), (180, cv2.ROTATE_180),
                        (270, cv2.ROTATE_90_CLOCKWISE)):
        rotated, homography = rotate_image(image, angle)
        np.testing.assert_array_equal(rotated, cv2.rotate(image, code))
        # Every pixel lands where the homography says.
        ys, xs = np.mgrid[0:64, 0:48]
        mapped = cv2.perspectiveTransform(np.stack([xs, ys], -1).reshape(1, -1, 2).astype(np.float64),
                                          homography)[0].round().astype(int)
        np.testing.assert_array_equal(rotated[mapped[:, 1], mapped[:, 0]], image.reshape(-1, 3))
    rotated, homography = rotate_image(image, 30)
    corners = cv2.perspectiveTransform(np.array([[[0, 0], [47, 0], [47, 63], [0, 63]]], np.float64),
                                       homography)[0]
    height, width = rotated.shape[:2]
    assert corners.min() >= -0.5 and (corners[:, 0] <= width - 0.5).all() \
        and (corners[:, 1] <= height - 0.5).all()
    assert procedural_images(2, 64)[1].tobytes() == procedural_images(2, 64)[1].tobytes()


@pytest.mark.slow  # fits steerers twice
def test_fits_are_orthogonal_deterministic_and_per_angle(r2d2):
    first = fit_steerers(r2d2, [90, 30, 330], SMALL, show_progress=False)
    again = fit_steerers(r2d2, [30, 90], SMALL, show_progress=False)
    alone = fit_steerers(r2d2, [30], SMALL, show_progress=False)
    assert first.angles == (30.0, 90.0)  # 330 is the transpose of 30
    assert first.matrices.dtype == np.float32 and first.matrices.shape == (2, 128, 128)
    assert first.matrices.tobytes() == again.matrices.tobytes()
    # Each angle is fitted directly, whatever else is fitted with it.
    assert alone.matrix(30).tobytes() == first.matrix(30).tobytes()
    for matrix in first.matrices:
        np.testing.assert_allclose(matrix.T @ matrix, np.eye(128), atol=1e-5)
    np.testing.assert_array_equal(first.matrix(330), first.matrix(30).T)
    np.testing.assert_array_equal(first.matrix(0), np.eye(128, dtype=np.float32))
    # Steered descriptors are much closer to the rotated image's than unsteered ones.
    assert (first.cosines[:, 1] > first.cosines[:, 0] + 0.3).all()


@pytest.mark.slow  # fits steerers twice
def test_cached_in_the_cache_folder_reused_and_refitted_when_the_weights_change(
        r2d2, model_copy, count_fits, tmp_path):
    torch = pytest.importorskip("torch")
    fitted = load_steerers(r2d2, model_copy, [90], SMALL, show_progress=False)
    path = cache_file(model_copy, fitted.sha256)
    assert path.parent == tmp_path / "cache" and path.is_file() and count_fits == [[90.0]]
    assert sorted(p.name for p in model_copy.parent.iterdir()) == ["mine.pt"]
    data = path.read_bytes()
    # Reused: same matrices, nothing fitted; the same fit writes the same bytes.
    cached = load_steerers(r2d2, model_copy, [90, 270], show_progress=False)
    assert count_fits == [[90.0]] and cached.matrix(90).tobytes() == fitted.matrix(90).tobytes()
    load_steerers(r2d2, model_copy, [90], SMALL, show_progress=False)
    assert path.read_bytes() == data
    # A missing angle is added as the cached ones were fitted.
    more = load_steerers(r2d2, model_copy, [30, 90], show_progress=False)
    assert count_fits[-1] == [30.0] and more.angles == (30.0, 90.0)
    assert more.settings == fitted.settings
    # New weights, new sha256: fitted again, in a file of their own.
    checkpoint = torch.load(model_copy, weights_only=False)
    key = next(k for k, v in checkpoint["state_dict"].items() if v.dtype.is_floating_point)
    checkpoint["state_dict"][key] = checkpoint["state_dict"][key] * 1.01
    torch.save(checkpoint, model_copy)
    changed = load_steerers(r2d2, model_copy, [90], show_progress=False)
    assert count_fits[-1] == [90.0] and changed.sha256 != fitted.sha256
    assert cache_file(model_copy, changed.sha256).is_file() and path.is_file()


@pytest.mark.parametrize("corruption", ["truncated", "garbage", "not orthogonal", "other sha256"])
def test_a_corrupted_cache_is_refitted_with_a_warning(r2d2, model_copy, count_fits, caplog,
                                                       corruption):
    fitted = load_steerers(r2d2, model_copy, [90], SMALL, show_progress=False)
    path = cache_file(model_copy, fitted.sha256)
    if corruption == "truncated":
        path.write_bytes(path.read_bytes()[:300])
    elif corruption == "garbage":
        path.write_bytes(b"\x00not a cache" * 10)
    else:
        with np.load(path) as data:
            stored = dict(data)
        if corruption == "not orthogonal":
            stored["matrices"] = stored["matrices"] * np.float32(1.5)
        else:
            stored["sha256"] = np.str_("0" * 64)
        with open(path, "wb") as f:
            np.savez(f, **stored)
    with caplog.at_level(logging.WARNING, logger="cv2r2d2.steerer_cache"):
        refitted = load_steerers(r2d2, model_copy, [90], show_progress=False)
    assert "ignoring the steerer cache" in caplog.text and str(path) in caplog.text
    assert len(count_fits) == 2
    assert refitted.matrix(90).tobytes() == fitted.matrix(90).tobytes()
    assert read_cache(path, fitted.sha256) is not None  # rewritten whole


def test_a_read_only_weights_folder_caches_in_the_user_cache_folder(r2d2, model_copy, tmp_path,
                                                                    monkeypatch, count_fits):
    folder = model_copy.parent
    read_only = stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP
    folder.chmod(read_only)
    try:
        fitted = load_steerers(r2d2, model_copy, [90], SMALL, show_progress=False)
        assert sorted(p.name for p in folder.iterdir()) == ["mine.pt"]
        path = cache_file(model_copy, fitted.sha256)
        assert path.parent == tmp_path / "cache" and path.is_file()
        assert load_steerers(r2d2, model_copy, [90], show_progress=False).matrix(90).tobytes() \
            == fitted.matrix(90).tobytes() and len(count_fits) == 1
        # Steerers placed beside read-only weights are read; a broken one there is passed
        # over for the user cache's (not refitted at every call).
        folder.chmod(stat.S_IRWXU)
        beside = folder / path.name
        shutil.move(path, beside)
        folder.chmod(read_only)
        assert load_steerers(r2d2, model_copy, [90], show_progress=False).matrix(90).tobytes() \
            == fitted.matrix(90).tobytes() and len(count_fits) == 1
        folder.chmod(stat.S_IRWXU)
        shutil.copyfile(beside, path)
        beside.write_bytes(b"broken")
        folder.chmod(read_only)
        load_steerers(r2d2, model_copy, [90], show_progress=False)
        assert len(count_fits) == 1
    finally:
        folder.chmod(stat.S_IRWXU)


def test_r2d2_steer_and_get_steerers(model_copy, count_fits):
    import cv2r2d2

    feature = cv2r2d2.R2D2Feature.create(model=model_copy, device="cpu", nfeatures=200)
    # Small steerers cached beforehand: steer() and getSteerers() read them.
    load_steerers(feature, model_copy, [90, 180], SMALL, show_progress=False)
    image = cv2.resize(read_image("boat.png"), (256, 256), interpolation=cv2.INTER_AREA)
    _, descriptors = feature.detectAndCompute(image, None)
    steered = feature.steer(descriptors, 90)
    assert len(count_fits) == 1
    assert steered.dtype == np.float32 and steered.shape == descriptors.shape
    np.testing.assert_allclose(np.linalg.norm(steered, axis=1), 1, atol=1e-6)
    steerers = feature.getSteerers(4)
    assert isinstance(steerers, Steerers) and steerers.for_rotations(4).shape == (4, 128, 128)
    expected = descriptors @ steerers.matrix(90).T
    np.testing.assert_allclose(steered, expected / np.linalg.norm(expected, axis=1, keepdims=True),
                               atol=1e-6)
    np.testing.assert_array_equal(feature.steer(descriptors, -90), feature.steer(descriptors, 270))
    np.testing.assert_allclose(feature.steer(descriptors, 0), descriptors, atol=1e-6)
    assert len(count_fits) == 1
    feature.steer(descriptors, 45)  # not fitted yet: fitted when first asked for
    assert count_fits[-1] == [45.0]
    with pytest.raises(ValueError, match="whole number of degrees"):
        feature.steer(descriptors, 22.5)
    with pytest.raises(ValueError, match="N x 128"):
        feature.steer(descriptors[:, :64], 90)
    with pytest.raises(TypeError, match="float32"):
        feature.steer(descriptors.astype(np.float64), 90)
    assert feature.steer(np.zeros((0, 128), np.float32), 90).shape == (0, 128)
    with pytest.raises(ValueError, match="no steerer for 60"):
        feature.getSteerers(4).steer(descriptors, 60)
    assert len(count_fits) == 2
