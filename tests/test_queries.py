"""Query photos, their cameras and the results files of localisation (cv2r2d2.queries);
localisation itself is tested in test_localization.py."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from conftest import read_image

pycolmap = pytest.importorskip("pycolmap")

from cv2r2d2.queries import (  # noqa: E402
    FOCAL_LENGTH_FACTOR, Query, QueryResult, logs_path, query_camera, read_queries,
    read_results, write_results,
)

WIDTH, HEIGHT = 320, 240


@pytest.fixture()
def photos(tmp_path):
    """A folder of two photos without EXIF, ``between.png`` and ``closer.png``."""
    image = cv2.resize(read_image("boat.png"), (WIDTH, HEIGHT), interpolation=cv2.INTER_AREA)
    for name in ("between.png", "closer.png"):
        cv2.imwrite(str(tmp_path / name), image)
    return tmp_path


def test_query_lists_give_intrinsics_as_hlocs_do(photos):
    tmp_path = photos
    listed = tmp_path / "queries.txt"
    listed.write_text("# name MODEL WIDTH HEIGHT params\n"
                      f"between.png SIMPLE_RADIAL {WIDTH} {HEIGHT} 384 160 120 0\n"
                      "closer.png\n")
    between, closer = read_queries(listed)
    assert (between.name, closer.name) == ("between.png", "closer.png")
    assert between.camera.model_name == "SIMPLE_RADIAL"
    assert list(between.camera.params) == [384, 160, 120, 0]
    assert closer.camera is None
    listed.write_text(f"between.png PINHOLE {WIDTH} {HEIGHT} 384 160 120\n")
    with pytest.raises(ValueError, match="a PINHOLE camera takes 4 finite parameters"):
        read_queries(listed)
    listed.write_text("missing.png\n")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_queries(listed)


def test_results_are_written_in_hlocs_format(tmp_path):
    localised = QueryResult("a/b.jpg", True, qvec=(0.5, 0.5, -0.5, 0.5), tvec=(1.0, -2.0, 3.5),
                            num_inliers=40, num_correspondences=90)
    failed = QueryResult("c.jpg", False, reason="no keypoints")
    path = tmp_path / "results.txt"
    write_results(path, [localised, failed])
    assert path.read_text() == "a/b.jpg 0.5 0.5 -0.5 0.5 1.0 -2.0 3.5\n"
    poses = read_results(path)
    np.testing.assert_array_equal(poses["a/b.jpg"][0], [0.5, 0.5, -0.5, 0.5])
    logs = json.loads(logs_path(path).read_text())
    assert logs["results"][1]["reason"] == "no keypoints"
    # The pose helpers agree with pycolmap's (x, y, z, w) quaternions.
    rotation = pycolmap.Rotation3d(np.array([0.5, -0.5, 0.5, 0.5])).matrix()
    np.testing.assert_allclose(localised.rotation(), rotation, atol=1e-12)
    np.testing.assert_allclose(localised.projection_center(), -rotation.T @ [1.0, -2.0, 3.5])
    with pytest.raises(ValueError, match="c.jpg was not localised"):
        failed.projection_center()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.txt", "results.txt_logs.json"]


def test_query_cameras_from_the_list_the_arguments_or_a_guess(photos):
    listed, plain = Query("a", photos / "between.png", None), Query("b", photos / "closer.png")
    camera, source = query_camera(plain, (WIDTH, HEIGHT), "SIMPLE_RADIAL", None)
    assert source == "guess" and not camera.has_prior_focal_length
    assert camera.mean_focal_length() == pytest.approx(FOCAL_LENGTH_FACTOR * WIDTH)
    camera, source = query_camera(plain, (WIDTH, HEIGHT), "PINHOLE", [300, 300, 160, 120])
    assert source == "given" and list(camera.params) == [300, 300, 160, 120]
    (photos / "list.txt").write_text(f"between.png PINHOLE {WIDTH} {HEIGHT} 300 300 160 120\n")
    [listed] = read_queries(photos / "list.txt")
    with pytest.raises(ValueError, match="is 160x120 pixels but its listed camera is 320x240"):
        query_camera(listed, (WIDTH // 2, HEIGHT // 2), "SIMPLE_RADIAL", None)
