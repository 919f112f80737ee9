"""R2D2Feature as a cv2.Feature2D drop-in, on real images and real weights."""
from __future__ import annotations

import inspect
import types

import cv2
import numpy as np
import pytest

import cv2r2d2
from conftest import weights_file
from cv2r2d2 import feature2d

# A moderate perspective warp of a 512 x 512 image.
H_TRUE = np.array([[0.92, 0.08, 18.0], [-0.06, 0.95, 25.0], [1.2e-4, -0.8e-4, 1.0]])


@pytest.fixture(scope="session")
def boat_features(r2d2, boat):
    return r2d2.detectAndCompute(boat, None)


@pytest.fixture(scope="session")
def warped_pair(r2d2, boat, boat_features):
    warped = cv2.warpPerspective(boat, H_TRUE, boat.shape[1::-1])
    return boat_features, r2d2.detectAndCompute(warped, None), warped


def _corner_error(H, shape) -> float:
    h, w = shape[:2]
    corners = np.float32([[0, 0], [w, 0], [w, h], [0, h]]).reshape(-1, 1, 2)
    a = cv2.perspectiveTransform(corners, H)
    b = cv2.perspectiveTransform(corners, H_TRUE)
    return float(np.linalg.norm(a - b, axis=2).mean())


def test_feature2d_information(r2d2):
    assert r2d2.descriptorSize() == 128
    assert r2d2.descriptorType() == cv2.CV_32F
    assert r2d2.defaultNorm() == cv2.NORM_L2
    assert r2d2.getDefaultName() == "Feature2D.R2D2"
    assert not r2d2.empty()
    assert r2d2.getNFeatures() == 5000 and r2d2.getScaleFactor() == 2**0.25
    assert r2d2.getModel() == "r2d2_WASF_N16" and r2d2.getBackend() == "torch"


@pytest.mark.slow  # full-size boat
def test_detect_and_compute_outputs(boat_features, boat):
    keypoints, descriptors = boat_features
    assert isinstance(keypoints, tuple) and len(keypoints) == 5000
    assert all(isinstance(k, cv2.KeyPoint) for k in keypoints)
    assert descriptors.dtype == np.float32 and descriptors.shape == (5000, 128)
    responses = np.array([k.response for k in keypoints])
    assert np.all(np.diff(responses) <= 0) and responses.min() >= 0.49
    assert {k.angle for k in keypoints} == {-1.0} and {k.class_id for k in keypoints} == {-1}
    sizes = {round(k.size, 3) for k in keypoints}
    octaves = {k.octave for k in keypoints}
    assert sizes == {round(32 * 2 ** (o / 4), 3) for o in octaves} and min(octaves) == 0
    pts = np.array([k.pt for k in keypoints])
    assert pts.min() >= 0 and pts[:, 0].max() < boat.shape[1] and pts[:, 1].max() < boat.shape[0]


@pytest.mark.slow  # full-size boat
def test_detect_then_compute_equals_detect_and_compute(r2d2, boat, boat_features):
    keypoints, descriptors = boat_features
    detected = r2d2.detect(boat)
    assert [k.pt for k in detected] == [k.pt for k in keypoints]
    kept, again = r2d2.compute(boat, keypoints[:300])
    assert len(kept) == 300
    np.testing.assert_allclose(again, descriptors[:300], atol=1e-5)


@pytest.mark.slow  # full-size boat
def test_homography_recovery_beats_sift(warped_pair, boat):
    (kp1, d1), (kp2, d2), warped = warped_pair
    results = {}
    for name, matcher in [
        ("bf", cv2.BFMatcher(cv2.NORM_L2, crossCheck=True)),
        ("flann", cv2.FlannBasedMatcher(dict(algorithm=1, trees=5), dict(checks=64))),
    ]:
        matches = matcher.match(d1, d2)
        src = np.float32([kp1[m.queryIdx].pt for m in matches])
        dst = np.float32([kp2[m.trainIdx].pt for m in matches])
        H, inliers = cv2.findHomography(src, dst, cv2.RANSAC, 3.0)
        results[name] = (_corner_error(H, boat.shape), int(inliers.sum()))
    sift = cv2.SIFT_create(5000)
    s1, e1 = sift.detectAndCompute(boat, None)
    s2, e2 = sift.detectAndCompute(warped, None)
    matches = cv2.BFMatcher(cv2.NORM_L2, crossCheck=True).match(e1, e2)
    _, sift_inliers = cv2.findHomography(
        np.float32([s1[m.queryIdx].pt for m in matches]),
        np.float32([s2[m.trainIdx].pt for m in matches]), cv2.RANSAC, 3.0)
    print("R2D2", results, "SIFT inliers", int(sift_inliers.sum()))
    for error, inliers in results.values():
        assert error < 2.0
    assert results["bf"][1] >= int(sift_inliers.sum())


@pytest.mark.slow  # the full-size warped pair
def test_drawing_functions_accept_outputs(warped_pair, boat):
    (kp1, d1), (kp2, d2), warped = warped_pair
    drawn = cv2.drawKeypoints(boat, kp1[:200], None, flags=cv2.DRAW_MATCHES_FLAGS_DRAW_RICH_KEYPOINTS)
    assert drawn.shape == boat.shape
    matches = cv2.BFMatcher(cv2.NORM_L2, crossCheck=True).match(d1[:500], d2[:500])
    canvas = cv2.drawMatches(boat, kp1[:500], warped, kp2[:500], matches[:50], None)
    assert canvas.shape == (512, 1024, 3)


@pytest.mark.slow  # full-size boat
def test_compute_on_sift_and_orb_keypoints(r2d2, boat):
    for detector in (cv2.SIFT_create(300), cv2.ORB_create(300)):
        keypoints = detector.detect(boat)
        outside = cv2.KeyPoint(-5.0, 10.0, 20.0)
        kept, descriptors = r2d2.compute(boat, list(keypoints) + [outside])
        assert len(kept) == len(keypoints) and outside not in kept
        assert descriptors.shape == (len(keypoints), 128) and descriptors.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(descriptors, axis=1), 1, atol=1e-5)
    assert r2d2.compute(boat, []) == ((), None)
    assert r2d2.compute(boat, [cv2.KeyPoint(600.0, 1.0, 8.0)]) == ((), None)


@pytest.mark.slow  # full-size boat
def test_mask_restricts_detection(r2d2, boat):
    mask = np.zeros(boat.shape[:2], np.uint8)
    mask[:, 256:] = 255
    keypoints, descriptors = r2d2.detectAndCompute(boat, mask)
    assert len(keypoints) == len(descriptors) > 1000
    assert min(k.pt[0] for k in keypoints) >= 255.5
    with pytest.raises(ValueError, match="size"):
        r2d2.detect(boat, np.zeros((10, 10), np.uint8))
    with pytest.raises(TypeError, match="uint8"):
        r2d2.detect(boat, np.zeros(boat.shape[:2], np.float32))


def test_list_forms(r2d2, boat):
    small = cv2.resize(boat, (256, 256))
    flat = np.zeros((12, 9, 3), np.uint8)  # nothing detected
    both = r2d2.detect([small, flat])
    assert len(both) == 2 and len(both[0]) > 100 and both[1] == ()
    keypoints, descriptors = r2d2.compute([small, flat], [both[0][:20], ()])
    assert len(keypoints[0]) == 20 and descriptors[0].shape == (20, 128)
    assert keypoints[1] == () and descriptors[1] is None
    with pytest.raises(ValueError, match="one mask per image"):
        r2d2.detect([small, flat], [None])


@pytest.mark.slow  # several full-size blank images
def test_nothing_to_detect_gives_empty_results(r2d2):
    strict = cv2r2d2.R2D2_create(reliability_thr=1.0, repeatability_thr=1.0, device="cpu")
    flat = np.full((300, 400), 90, np.uint8)
    assert strict.detect(flat) == ()
    assert strict.detectAndCompute(flat, None) == ((), None)
    # An image too thin for the network, or one where it finds nothing.
    for tiny in (np.zeros((1, 1, 3), np.uint8), np.zeros((1, 300), np.uint8),
                 np.zeros((12, 9, 3), np.uint8)):
        assert r2d2.detectAndCompute(tiny, None) == ((), None)
    assert r2d2.compute(np.zeros((1, 300), np.uint8), [cv2.KeyPoint(0.2, 0.2, 32)]) == ((), None)


@pytest.mark.slow  # extractions of the boat
def test_images_too_small_for_the_pyramid_run_at_their_own_size(boat, caplog):
    """The reference finds nothing on an image whose longer side is under min_size;
    such images are processed at scale 1 instead, with one log line per process."""
    weights_file("r2d2_WASF_N16")
    r2d2 = cv2r2d2.R2D2_create(device="cpu")
    small = [cv2.resize(boat, (240, 180), interpolation=cv2.INTER_AREA),
             cv2.resize(boat, (120, 90), interpolation=cv2.INTER_AREA)]
    at_scale_1 = cv2r2d2.R2D2_create(device="cpu", min_size=0, max_scale=1, min_scale=1)
    feature2d._tell_own_size.cache_clear()
    with caplog.at_level("INFO", logger="cv2r2d2.feature2d"):
        for image in small:
            keypoints, descriptors = r2d2.detectAndCompute(image, None)
            expected, expected_descriptors = at_scale_1.detectAndCompute(image, None)
            assert len(keypoints) == len(expected) > 50
            assert [k.pt for k in keypoints] == [k.pt for k in expected]
            assert {k.octave for k in keypoints} == {0} and {k.size for k in keypoints} == {32}
            np.testing.assert_array_equal(descriptors, expected_descriptors)
            kept, again = r2d2.compute(image, keypoints[:10])
            np.testing.assert_allclose(again, descriptors[:10], atol=1e-5)
        for side in (2, 3, 8):  # the network runs; nothing to find, no crash
            r2d2.detectAndCompute(np.full((side, side, 3), 200, np.uint8), None)
    told = [r for r in caplog.records if "too small for the pyramid" in r.getMessage()]
    assert len(told) == 1 and "is processed at its own size" in told[0].getMessage()


@pytest.mark.parametrize(
    "image,error",
    [
        (None, ValueError),
        (np.zeros((0, 0, 3), np.uint8), ValueError),
        (np.zeros((64, 64), np.int64), TypeError),
        (np.zeros((64, 64, 2), np.uint8), ValueError),
        (np.full((64, 64), np.nan, np.float32), ValueError),
        ("image.jpg", TypeError),
    ],
)
def test_bad_images(r2d2, image, error):
    for call in (lambda: r2d2.detect(image), lambda: r2d2.detectAndCompute(image, None),
                 lambda: r2d2.compute(image, [cv2.KeyPoint(1, 1, 8)])):
        with pytest.raises(error):
            call()


def test_bad_keypoints_and_flags(r2d2, boat):
    with pytest.raises(TypeError, match="cv2.KeyPoint"):
        r2d2.compute(boat, [(1, 2)])
    with pytest.raises(TypeError, match="None"):
        r2d2.compute(boat, None)
    with pytest.raises(ValueError, match="keypoints="):
        r2d2.detectAndCompute(boat, None, useProvidedKeypoints=True)
    kept, descriptors = r2d2.detectAndCompute(boat, None, useProvidedKeypoints=True,
                                              keypoints=[cv2.KeyPoint(100, 100, 32)])
    assert len(kept) == 1 and descriptors.shape == (1, 128)


@pytest.mark.slow  # extractions of the full-size boat
def test_setters_validate_and_apply(boat):
    weights_file("r2d2_WASF_N16")
    r2d2 = cv2r2d2.R2D2_create(nfeatures=100, device="cpu")
    assert len(r2d2.detect(boat)) == 100
    r2d2.setNFeatures(0)
    r2d2.setMinSize(400)
    assert r2d2.getMinSize() == 400 and len(r2d2.detect(boat)) > 100
    for setter, value in [(r2d2.setScaleFactor, 0.9), (r2d2.setMaxScale, 1.5),
                          (r2d2.setReliabilityThreshold, -0.1), (r2d2.setNFeatures, -3)]:
        with pytest.raises(ValueError):
            setter(value)
    assert r2d2.getScaleFactor() == 2**0.25 and r2d2.getNFeatures() == 0
    with pytest.raises(ValueError, match="backend"):
        cv2r2d2.R2D2_create(backend="tensorflow")
    with pytest.raises(cv2r2d2.weights.WeightsError, match="neither an existing file"):
        cv2r2d2.R2D2_create(model="no_such_model")


@pytest.mark.parametrize("value, error", [(-1, ValueError), (1.5, TypeError), (True, TypeError),
                                          ("2", TypeError)])
def test_num_threads_is_validated(value, error):
    with pytest.raises(error, match="num_threads"):
        cv2r2d2.R2D2_create(num_threads=value)


def test_num_threads_applies_to_torch_only_during_a_call(boat, monkeypatch):
    import torch

    weights_file("r2d2_WASF_N16")
    previous = torch.get_num_threads()
    wanted = 1 if previous != 1 else 2
    r2d2 = cv2r2d2.R2D2_create(nfeatures=50, min_size=0, device="cpu", num_threads=wanted)
    assert r2d2.getNumThreads() == wanted and torch.get_num_threads() == previous
    seen = []
    run = r2d2._runner().run

    def recorded(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return run(*args, **kwargs)

    monkeypatch.setattr(r2d2._runner(), "run", recorded)
    crop = boat[:160, :192]
    keypoints, _ = r2d2.detectAndCompute(crop, None)
    assert len(keypoints) == 50 and torch.get_num_threads() == previous
    r2d2.compute(crop, keypoints)
    r2d2.computeDenseMaps(crop, 0.5)
    assert torch.get_num_threads() == previous
    assert seen and set(seen) == {wanted}
    # Restored when the call fails, too.
    monkeypatch.setattr(r2d2._runner(), "run", lambda *args, **kwargs: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        r2d2.computeDenseMaps(crop)
    assert torch.get_num_threads() == previous


@pytest.mark.parametrize("suffix", [".yml", ".xml", ".json"])
def test_write_read_round_trip(r2d2, tmp_path, suffix):
    path = tmp_path / f"r2d2{suffix}"
    other = cv2r2d2.R2D2_create(nfeatures=123, min_size=300, reliability_thr=0.6, device="cpu",
                                subpixel=True, tile_size=0)
    other.write(str(path))
    r2d2_copy = cv2r2d2.R2D2_create(device="cpu")
    r2d2_copy.read(str(path))
    assert r2d2_copy.getConfig().params == other.getConfig().params and repr(r2d2_copy) == repr(other)
    assert r2d2_copy.getSubpixel() and r2d2_copy.getTileSize() == 0
    # Inside a FileStorage, under a name, as OpenCV's write(fs, name) does.
    fs = cv2.FileStorage(str(tmp_path / f"many{suffix}"), cv2.FILE_STORAGE_WRITE)
    other.write(fs, "r2d2")
    cv2.SIFT_create().write(fs, "sift")
    fs.release()
    fs = cv2.FileStorage(str(tmp_path / f"many{suffix}"), cv2.FILE_STORAGE_READ)
    third = cv2r2d2.R2D2_create(device="cpu")
    third.read(fs.getNode("r2d2"))
    assert third.getNFeatures() == 123
    with pytest.raises(ValueError, match="Feature2D.SIFT"):
        third.read(fs.getNode("sift"))
    fs.release()
    other.save(str(tmp_path / f"saved{suffix}"))
    assert (tmp_path / f"saved{suffix}").stat().st_size > 0
    with pytest.raises(FileNotFoundError):
        third.read(str(tmp_path / "absent.yml"))
    with pytest.raises(TypeError):
        third.read(42)


# A value other than the default for every argument of R2D2Feature.create.
CHANGED = dict(model="r2d2_WAF_N16", nfeatures=123, scale_f=2**0.5, min_size=200, max_size=800,
               min_scale=0.1, max_scale=0.9, reliability_thr=0.6, repeatability_thr=0.65, unique_radius=2.5,
               device="cpu", backend="reference", tile_size=0, precision="bf16", subpixel=True,
               num_threads=1, preset="ratio")


@pytest.fixture
def built_runners(monkeypatch):
    """The runners' arguments, recorded instead of loading networks."""
    from cv2r2d2 import feature2d

    built = []

    def make_runner(model, device, backend, precision="fp32", num_threads=None):
        built.append(dict(model=model, device=device, backend=backend, precision=precision,
                          num_threads=num_threads))
        return types.SimpleNamespace(descriptor_size=128)

    monkeypatch.setattr(feature2d, "_make_runner", make_runner)
    return built


@pytest.mark.parametrize("name", list(inspect.signature(cv2r2d2.R2D2Feature.create).parameters))
def test_every_create_argument_round_trips(name, tmp_path, built_runners):
    value = CHANGED[name]  # a new argument needs a value here
    written = cv2r2d2.R2D2Feature.create(**{name: value})
    assert f"{name}={value!r}" in repr(written)
    path = tmp_path / "r2d2.yml"
    written.write(str(path))
    reader = cv2r2d2.R2D2Feature.create()
    reader.read(str(path))
    if name == "device":  # this machine's hardware: not stored, the reader's is kept
        assert "device" not in path.read_text() and reader.getDevice() is None
        assert repr(reader) == "R2D2Feature(preset='paper')"
        return
    assert repr(reader) == repr(written)
    if name in ("model", "backend", "precision", "num_threads"):  # the network is built again
        assert built_runners[-1] == dict(built_runners[0], **{name: value})
    again = cv2r2d2.R2D2Feature.create(**{name: value})
    count = len(built_runners)
    again.read(str(path))  # the same settings: nothing to rebuild
    assert repr(again) == repr(written) and len(built_runners) == count


def test_read_refuses_bad_stored_settings_and_changes_nothing(tmp_path, built_runners):
    reader = cv2r2d2.R2D2Feature.create()
    before = repr(reader)
    for text, message in (("tile_size: 10", "tile_size"), ("subpixel: 2", "subpixel"),
                          ("num_threads: -3", "num_threads"), ("nfeatures: 2.5", "nfeatures")):
        path = tmp_path / "bad.yml"
        path.write_text(f"%YAML:1.0\n---\nname: Feature2D.R2D2\nmax_size: 900\n{text}\n")
        with pytest.raises(ValueError, match=message):
            reader.read(str(path))
        assert repr(reader) == before


def _reprojection_errors(kp1, d1, kp2, d2) -> np.ndarray:
    matches = cv2.BFMatcher(cv2.NORM_L2, crossCheck=True).match(d1, d2)
    p1 = np.float32([kp1[m.queryIdx].pt for m in matches]).reshape(-1, 1, 2)
    p2 = np.float32([kp2[m.trainIdx].pt for m in matches])
    return np.linalg.norm(cv2.perspectiveTransform(p1, H_TRUE).reshape(-1, 2) - p2, axis=1)


@pytest.mark.slow  # full-size boat
def test_subpixel_keypoints_localise_better(warped_pair, boat):
    (kp1, d1), (kp2, d2), warped = warped_pair
    refined = cv2r2d2.R2D2_create(device="cpu", subpixel=True)
    assert refined.getSubpixel()
    rk1, rd1 = refined.detectAndCompute(boat, None)
    rk2, rd2 = refined.detectAndCompute(warped, None)
    # Same keypoints (order, scores), moved by at most half a pixel of their level, and
    # described where they now are: descriptors close to the integer position's.
    assert [k.response for k in rk1] == [k.response for k in kp1]
    shift = np.array([k.pt for k in rk1]) - np.array([k.pt for k in kp1])
    assert np.abs(shift).max() < 0.5 * 2**1.5 + 0.5
    cosine = (rd1 * d1).sum(axis=1)
    assert np.median(cosine) > 0.95 and not np.array_equal(rd1, d1)
    plain, sub = _reprojection_errors(kp1, d1, kp2, d2), _reprojection_errors(rk1, rd1, rk2, rd2)
    print("median error", np.median(plain[plain < 5]), "->", np.median(sub[sub < 5]),
          "MMA@1", (plain <= 1).mean(), "->", (sub <= 1).mean(), "matches", len(plain), len(sub))
    assert len(sub) >= len(plain)
    assert np.median(sub[sub < 5]) < 0.8 * np.median(plain[plain < 5])
    assert (sub <= 1).mean() >= (plain <= 1).mean() + 0.1
    assert (sub <= 3).mean() >= (plain <= 3).mean() - 0.005
    with pytest.raises(ValueError, match="subpixel"):
        refined.setSubpixel("yes")
    with pytest.raises(TypeError, match="subpixel"):
        refined.setSubpixel(1.5)

    # Match refinement moves image 2's matched keypoints closer still.
    matches = cv2.BFMatcher(cv2.NORM_L2, crossCheck=True).match(rd1, rd2)
    moved = refined.refineMatches(warped, rd1, rk2, matches)
    assert moved.shape == (len(matches), 2) and moved.dtype == np.float32
    np.testing.assert_array_equal(
        refined.refineMatches(warped, rd1, rk2, np.array([[m.queryIdx, m.trainIdx] for m in matches])),
        moved)
    p1 = np.float32([rk1[m.queryIdx].pt for m in matches]).reshape(-1, 1, 2)
    truth = cv2.perspectiveTransform(p1, H_TRUE).reshape(-1, 2)
    before = np.linalg.norm(truth - np.float32([rk2[m.trainIdx].pt for m in matches]), axis=1)
    after = np.linalg.norm(truth - moved, axis=1)
    print("refineMatches: median error", np.median(before[before < 5]), "->",
          np.median(after[after < 5]), "MMA@1", (before <= 1).mean(), "->", (after <= 1).mean())
    assert np.median(after[after < 5]) < np.median(before[before < 5])
    assert (after <= 1).mean() > (before <= 1).mean()
    assert np.abs(after - before).max() < 4 * 1.5 * 2**1.5  # within the search radius
    assert refined.refineMatches(warped, rd1, rk2, []).shape == (0, 2)
    with pytest.raises(ValueError, match="trainIdx"):
        refined.refineMatches(warped, rd1, rk2, [cv2.DMatch(0, len(rk2), 0.0)])
    with pytest.raises(TypeError, match="descriptors1"):
        refined.refineMatches(warped, rd1.astype(np.float64), rk2, matches)
    with pytest.raises(TypeError, match="matches"):
        refined.refineMatches(warped, rd1, rk2, [(0, 1)])
    with pytest.raises(ValueError, match="radius"):
        refined.refineMatches(warped, rd1, rk2, matches, radius=0)


def test_dense_maps_shapes_and_bad_scales(r2d2, boat):
    maps = r2d2.computeDenseMaps(boat, scale=0.5)
    assert maps["descriptors"].shape == (128, 256, 256)
    assert maps["reliability"].shape == maps["repeatability"].shape == (256, 256)
    for scale in (0, 1.5, "1", 0.001):
        with pytest.raises(ValueError, match="scale"):
            r2d2.computeDenseMaps(boat, scale=scale)


def test_a_device_this_machine_lacks_is_refused_at_creation(monkeypatch, tmp_path):
    import torch

    from cv2r2d2.collection import LocalExecutor, MatchingSettings
    from cv2r2d2.matching import match_batch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.version, "cuda", None)
    for call in (lambda: cv2r2d2.R2D2Feature.create(device="cuda"),
                 lambda: cv2r2d2.load_model(device="cuda:0"),
                 lambda: match_batch([(np.ones((2, 4), np.float32),) * 2], device="cuda"),
                 lambda: LocalExecutor().match(tmp_path / "none.h5", [], tmp_path / "m.h5",
                                               MatchingSettings(device="cuda"))):
        with pytest.raises(ValueError, match=r"device 'cuda(:0)?' is not available: .*; available: cpu$"):
            call()
    assert not list(tmp_path.iterdir())  # refused before any output is opened
