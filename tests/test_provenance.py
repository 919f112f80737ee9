"""Outputs remember how they were made: feature and match files record their settings,
the same settings are reused, others are refused (naming them) or redone with
``overwrite``, and files without a record are never reused silently."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import pytest

from conftest import read_image, weights_dir
from cv2r2d2.cli import main
from cv2r2d2.collection import MatchingSettings, extract_collection, match_collection
from cv2r2d2.config import R2D2Config
from cv2r2d2.provenance import (
    SettingsMismatchError, check_reuse, differences, features_record, matches_record,
)
from cv2r2d2.stores import H5Features, H5Matches, R2D2Folder, open_features

h5py = pytest.importorskip("h5py")

SMALL = dict(device="cpu", nfeatures=200, min_size=160, max_size=160)
FAST = ["--device", "cpu", "--nfeatures", "200", "--min-size", "160", "--max-size", "160"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Three 200 x 150 crops of brooklyn."""
    folder = tmp_path_factory.mktemp("photos")
    brooklyn = read_image("brooklyn.png")
    for i, x in enumerate((400, 440, 480)):
        cv2.imwrite(str(folder / f"crop{i}.png"), brooklyn[300:450, x:x + 200])
    return folder


@pytest.fixture(scope="module")
def feature():
    weights_dir()
    import cv2r2d2

    return cv2r2d2.R2D2Feature.create(**SMALL)


def _images(photos: Path) -> list:
    return [(p.name, p) for p in sorted(photos.glob("*.png"))]


def test_the_record_names_model_weights_and_every_setting():
    weights_dir()
    record = features_record(R2D2Config.from_arguments(preset="ratio", nfeatures=10))
    assert record["kind"] == "features" and record["preset"] == "ratio"
    assert record["model"] == "r2d2_WASF_N16" and len(record["weights_sha256"]) == 64
    assert record["settings"]["nfeatures"] == 10 and record["settings"]["unique_radius"] == 2.0
    assert "device" not in record["settings"] and record["cv2r2d2"]
    json.dumps(record)
    # Settings that do not change the output are not compared.
    same = features_record(R2D2Config.from_arguments(preset="ratio", nfeatures=10, tile_size=0,
                                                     num_threads=1, device="cpu"))
    assert differences(record, same) == []
    other = features_record(R2D2Config.from_arguments(nfeatures=10, model="faster2d2_WASF_N16"))
    found = differences(record, other)
    assert "unique_radius: stored 2.0, now 0.0" in found
    assert any(d.startswith("model: stored 'r2d2_WASF_N16'") and "'faster2d2_WASF_N16'" in d
               for d in found)


@pytest.mark.parametrize("kind", ["h5", "r2d2"])
def test_same_settings_reused_others_refused_overwrite_redoes(feature, photos, tmp_path, kind):
    import cv2r2d2

    path = tmp_path / ("features.h5" if kind == "h5" else "features")
    images = _images(photos)
    with open_features(path, writable=True) as store:
        assert len(extract_collection(images[:2], store, feature).extracted) == 2
        assert store.settings() == features_record(feature.getConfig())
    with open_features(path, writable=True) as store:  # same settings: resumed
        report = extract_collection(images, store, feature)
        assert (len(report.skipped), len(report.extracted)) == (2, 1)
    other = cv2r2d2.R2D2Feature.create(**dict(SMALL, nfeatures=50))
    with open_features(path, writable=True) as store:
        with pytest.raises(SettingsMismatchError, match="nfeatures: stored 200, now 50") as error:
            extract_collection(images, store, other)
        assert "--overwrite" in str(error.value)
        assert store.names() == [name for name, _ in images]  # nothing changed
        assert store.settings()["settings"]["nfeatures"] == 200
    with open_features(path, writable=True) as store:  # only one image asked: all go
        report = extract_collection(images[:1], store, other, overwrite=True)
        assert report.extracted == [images[0][0]] and store.names() == [images[0][0]]
        assert store.settings()["settings"]["nfeatures"] == 50
        assert len(store.read(images[0][0])) <= 50


def test_files_without_a_record_are_not_reused_silently(feature, photos, tmp_path):
    path = tmp_path / "old.h5"
    images = _images(photos)
    with H5Features(path, writable=True) as store:
        extract_collection(images[:1], store, feature)
    with h5py.File(path, "a") as f:  # as written before records were kept, or by hloc
        del f.attrs["cv2r2d2_settings"]
    with H5Features(path, writable=True) as store:
        with pytest.raises(SettingsMismatchError, match="without a record of their settings"):
            extract_collection(images, store, feature)
        extract_collection(images, store, feature, overwrite=True)
        assert store.settings() is not None and len(store.names()) == 3
    # An empty output is simply used; a broken record counts as none.
    with h5py.File(path, "a") as f:
        f.attrs["cv2r2d2_settings"] = "{not json"
    with H5Features(path) as store:
        assert store.settings() is None


def test_matches_record_their_features_and_options(feature, photos, tmp_path):
    features_path, matches_path = tmp_path / "features.h5", tmp_path / "matches.h5"
    images = _images(photos)
    pairs = [(images[0][0], images[1][0]), (images[1][0], images[2][0])]
    with H5Features(features_path, writable=True) as store:
        extract_collection(images, store, feature)
        with H5Matches(matches_path, writable=True) as matches:
            cpu = MatchingSettings(device="cpu")
            match_collection(store, pairs, matches, cpu)
            record = matches.settings()
            assert record["kind"] == "matches" and record["settings"]["ratio"] is None
            assert len(record["features"]["weights_sha256"]) == 64
            again = match_collection(store, pairs, matches, cpu)
            assert len(again.skipped) == 2
            ratio = MatchingSettings(ratio=0.9, device="cpu")
            with pytest.raises(SettingsMismatchError, match="ratio: stored None, now 0.9"):
                match_collection(store, pairs, matches, ratio)
            redone = match_collection(store, pairs[:1], matches, ratio, overwrite=True)
            assert len(redone.matched) == 1 and len(matches.keys()) == 1
    assert check_reuse(None, matches_record(None, {}), False, "x", False) is False


@pytest.mark.slow  # several extractions
def test_cli_names_the_differing_settings_and_the_ways_out(photos, tmp_path, capsys):
    weights_dir()
    output = tmp_path / "features.h5"
    assert main(["extract", str(photos), "-o", str(output), "-q", *FAST]) == 0
    assert main(["extract", str(photos), "-o", str(output), "-q", *FAST]) == 0
    assert "3 already done" in capsys.readouterr().out
    assert main(["extract", str(photos), "-o", str(output), "-q", *FAST,
                 "--preset", "accurate"]) == 1
    err = capsys.readouterr().err
    assert "subpixel: stored False, now 'descriptor'" in err and "--overwrite" in err
    assert main(["extract", str(photos), "-o", str(output), "-q", *FAST,
                 "--preset", "accurate", "--overwrite"]) == 0
    with H5Features(output) as store:
        assert store.settings()["preset"] == "accurate"
    # match reads the preset the features record: accurate matches as paper does.
    matches = tmp_path / "matches.h5"
    assert main(["match", str(output), "--pairs", "exhaustive", "-o", str(matches),
                 "--device", "cpu", "-q"]) == 0
    assert main(["match", str(output), "--pairs", "exhaustive", "-o", str(matches),
                 "--device", "cpu", "-q", "--preset", "ratio"]) == 1
    assert "ratio: stored None, now 0.75" in capsys.readouterr().err


def test_every_image_failing_leaves_no_output(tmp_path, capsys):
    weights_dir()
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    for output in (tmp_path / "f.h5", tmp_path / "folder"):
        assert main(["extract", str(tmp_path / "broken.jpg"), "-o", str(output), "-q",
                     *FAST]) == 1
        err = capsys.readouterr().err
        assert "broken.jpg" in err and "nothing was written" in err
        assert not output.exists()
