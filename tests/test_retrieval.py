"""Image retrieval (cv2r2d2.retrieval), retrieval pairs and the ``pairs`` command, on
three photos of each of the three scenes of ../shared/images, downscaled."""
from __future__ import annotations

import logging

import cv2
import numpy as np
import pytest

from conftest import image_path, weights_dir
from cv2r2d2.cli import main
from cv2r2d2.pairs import exhaustive_pairs, parse_pairs, read_pairs
from cv2r2d2.neighbours import top_k_neighbours
from cv2r2d2.retrieval import RetrievalIndex, RetrievalSettings, index_path, retrieval_pairs
from cv2r2d2.stores import H5Features, ImageFeatures, open_features

h5py = pytest.importorskip("h5py")

# Three photos of each scene that overlap (verified with 460-2100 inliers at full size).
SCENES = {
    "sacre_coeur": ["51091044_3486849416.jpg", "71295362_4051449754.jpg",
                    "93341989_396310999.jpg"],
    "sceaux_castle": ["100_7101.JPG", "100_7102.JPG", "100_7103.JPG"],
    "monstree": ["IMG_1027.JPG", "IMG_1028.JPG", "IMG_1056.JPG"],
}
SIZE = 320  # longer side, pixels: one pyramid level


def _scene(name: str) -> str:
    return name.split("-")[0]


@pytest.fixture(scope="module")
def image_features():
    """name -> ImageFeatures of the nine photos at 320 px (one pyramid level)."""
    weights_dir()
    import cv2r2d2

    feature = cv2r2d2.R2D2Feature.create(device="cpu", min_size=SIZE, max_size=SIZE,
                                         nfeatures=1000)
    found = {}
    for scene, files in SCENES.items():
        for file in files:
            image = cv2.imread(str(image_path(f"{scene}/{file}")), cv2.IMREAD_REDUCED_COLOR_2)
            scale = SIZE / max(image.shape[:2])
            image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
            features = feature.detectFeatures(image)
            found[f"{scene}-{file}"] = ImageFeatures.from_features(
                features, (image.shape[1], image.shape[0]))
    return found


def _store(folder, image_features, names=None):
    path = folder / "features.h5"
    with H5Features(path, writable=True) as store:
        for name in names or sorted(image_features):
            store.write(name, image_features[name])
    return path


@pytest.fixture(scope="module")
def features_file(image_features, tmp_path_factory):
    return _store(tmp_path_factory.mktemp("mixed"), image_features)


@pytest.fixture(scope="module")
def index(features_file):
    with open_features(features_file) as store:
        return RetrievalIndex.build(store)


def test_same_scene_images_rank_first(index, image_features):
    assert index.path == index_path(index.path.parent / "features.h5")
    assert index.path.name == "features.retrieval.h5"
    assert sorted(index.names) == sorted(image_features) and index.codebook.shape == (1024, 128)
    for name, features in image_features.items():
        ranked = index.query(features.descriptors, 3)
        assert ranked[0][0] == name and ranked[0][1] == pytest.approx(1.0, abs=1e-2)
        assert [_scene(other) for other, _ in ranked] == [_scene(name)] * 3, ranked
        scores = [score for _, score in index.query(features.descriptors, len(index))]
        assert scores == sorted(scores, reverse=True)
    pairs = index.pairs(2)
    assert all(_scene(a) == _scene(b) for a, b in pairs)
    assert len(pairs) == 9  # the three pairs of each scene, each once


def test_pairs_file_round_trip(features_file, index, tmp_path, capsys):
    output = tmp_path / "pairs.txt"
    assert main(["pairs", str(features_file), "-o", str(output), "--retrieval", "3", "-q"]) == 0
    assert "wrote" in capsys.readouterr().out
    written = read_pairs(output)
    assert written == index.pairs(3)
    assert all(a != b for a, b in written)
    assert len({frozenset(pair) for pair in written}) == len(written)
    assert all(sum(name in pair for pair in written) >= 3 for name in index.names)
    with open_features(features_file) as store:
        names = store.names()
        assert parse_pairs("retrieval:3", names, store) == written
        subset = [n for n in names if _scene(n) != "monstree"]
        among = parse_pairs("retrieval:2", subset, store)
    assert len(among) == 6 and all(_scene(a) == _scene(b) and {a, b} <= set(subset)
                                   for a, b in among)


def test_match_with_retrieval_pairs(features_file, tmp_path):
    matches = tmp_path / "matches.h5"
    assert main(["match", str(features_file), "-o", str(matches), "--pairs", "retrieval:2",
                 "--device", "cpu", "-q"]) == 0
    with h5py.File(matches) as f:
        stored = {frozenset(key.split("/")) for key in
                  (f"{a}/{b}" for a in f for b in f[a])}
    assert len(stored) == 9 and all(len({_scene(n) for n in pair}) == 1 for pair in stored)


def test_k_larger_than_the_collection(index, image_features):
    pairs = index.pairs(100)
    assert {frozenset(p) for p in pairs} == {frozenset(p) for p in exhaustive_pairs(index.names)}
    assert len(pairs) == 36
    name = index.names[0]
    assert len(index.query(image_features[name].descriptors, 100)) == 9


def test_a_collection_of_one_image(image_features, tmp_path):
    name = sorted(image_features)[0]
    path = _store(tmp_path, image_features, [name])
    with open_features(path) as store:
        assert retrieval_pairs(store, 5) == []
        index = RetrievalIndex.build(store)
    assert index.names == [name]
    best = index.query(image_features[name].descriptors, 5)
    assert best == [(name, pytest.approx(1.0, abs=1e-2))]
    assert index.query(np.zeros((0, 128), np.float32), 5) == []


def test_deterministic_resumed_and_rebuilt_when_features_change(image_features, tmp_path, caplog):
    names = sorted(image_features)
    first = _store(tmp_path / "a", image_features, names)
    with open_features(first) as store:
        whole = RetrievalIndex.build(store)
    with h5py.File(whole.path) as f:
        vectors = f["frequencies"][()]
    # Same seed, same index; images added later are appended under the same codebook.
    second = _store(tmp_path / "b", image_features, names[:5])
    with open_features(second) as store:
        part = RetrievalIndex.build(store)
        again = RetrievalIndex.build(store, path=tmp_path / "again.h5")
    np.testing.assert_array_equal(part.codebook, again.codebook)
    with H5Features(second, writable=True) as store:
        for name in names[5:]:
            store.write(name, image_features[name])
        caplog.clear()
        grown = RetrievalIndex.build(store)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert grown.names == names and np.array_equal(grown.codebook, part.codebook)
    # Changed features are never reused: the index is built again, with a warning.
    with H5Features(second, writable=True) as store:
        changed = image_features[names[0]]
        store.write(names[0], ImageFeatures(changed.keypoints + 1, changed.descriptors,
                                            changed.scores, changed.image_size, changed.sizes))
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            rebuilt = RetrievalIndex.build(store)
    assert "changed" in caplog.text and rebuilt.names == names
    with h5py.File(rebuilt.path) as f:
        np.testing.assert_array_equal(f["frequencies"][()], vectors)  # as if built at once
    np.testing.assert_array_equal(rebuilt.codebook, whole.codebook)
    # Other settings rebuild too.
    with open_features(second) as store, caplog.at_level(logging.WARNING):
        caplog.clear()
        other = RetrievalIndex.build(store, settings=RetrievalSettings(num_words=8))
    assert "made with" in caplog.text and len(other.codebook) == 8


def test_top_k_in_blocks_equals_brute_force():
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((50, 16)).astype(np.float32)
    similarity = vectors @ vectors.T
    np.fill_diagonal(similarity, -np.inf)
    expected = np.argsort(-similarity, axis=1, kind="stable")[:, :4]
    for block_size in (7, 50, 4096):
        indices, scores = top_k_neighbours(vectors, 4, block_size=block_size)
        np.testing.assert_array_equal(indices, expected)
        np.testing.assert_allclose(scores, np.take_along_axis(similarity, expected, 1), rtol=1e-5)
    rows = np.array([3, 10, 11, 40])
    indices, _ = top_k_neighbours(vectors, 10, rows=rows, block_size=7)
    assert indices.shape == (4, 3) and set(indices.ravel()) <= set(rows)


def test_bad_input(features_file, index, image_features, tmp_path, capsys):
    missing = tmp_path / "missing.h5"
    assert main(["pairs", str(missing), "-o", str(tmp_path / "p.txt"), "--retrieval", "3"]) == 1
    assert "no such file" in capsys.readouterr().err and not (tmp_path / "p.txt").exists()
    assert main(["pairs", str(features_file), "-o", str(tmp_path / "p.txt"),
                 "--retrieval", "0"]) == 1
    assert "--retrieval must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "p.txt").exists()
    with open_features(features_file) as store:
        names = store.names()
        for spec in ("retrieval", "retrieval:0", "retrieval:x"):
            with pytest.raises(ValueError, match="retrieval:k with an integer k >= 1"):
                parse_pairs(spec, names, store)
    with pytest.raises(ValueError, match="need the features store"):
        parse_pairs("retrieval:3", names)
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        index.pairs(0)
    with pytest.raises(KeyError, match="no vector for 'nope.jpg'"):
        index.pairs(2, ["nope.jpg"])
    descriptors = image_features[index.names[0]].descriptors
    with pytest.raises(ValueError, match=r"\(N, 128\)"):
        index.query(descriptors[:, :64], 3)
    with pytest.raises(TypeError, match="float32"):
        index.query(descriptors.astype(np.int32), 3)
    with pytest.raises(ValueError, match="NaN"):
        index.query(np.full((2, 128), np.nan, np.float32), 3)
    with pytest.raises(ValueError, match="num_words must be an integer >= 1"):
        RetrievalSettings(num_words=0)
    with pytest.raises(ValueError, match="is not a retrieval index"):
        RetrievalIndex.load(features_file)
    with pytest.raises(FileNotFoundError, match="no such retrieval index"):
        RetrievalIndex.load(missing)
    with H5Features(tmp_path / "empty.h5", writable=True) as store, \
            pytest.raises(ValueError, match="holds no features"):
        RetrievalIndex.build(store)
    assert not (tmp_path / "empty.retrieval.h5").exists()


@pytest.mark.slow
def test_images_described_on_ray_give_the_same_index(features_file, index, tmp_path):
    """The image vectors computed by Ray actors (which open the features file themselves)
    are the ones of this process."""
    pytest.importorskip("ray")
    from cv2r2d2.distributed import RayExecutor
    from cv2r2d2.stores import open_features

    with open_features(features_file) as store:
        on_ray = RetrievalIndex.build(store, tmp_path / "ray.retrieval.h5",
                                      executor=RayExecutor(actors=2, threads=1, block_size=3))
    assert on_ray.names == index.names
    np.testing.assert_array_equal(on_ray.codebook, index.codebook)
    np.testing.assert_array_equal(on_ray.idf, index.idf)
    h5py = pytest.importorskip("h5py")
    with h5py.File(index.path) as here, h5py.File(on_ray.path) as there:
        for key in ("frequencies", "digests"):
            np.testing.assert_array_equal(there[key][()], here[key][()])
    assert on_ray.pairs(3) == index.pairs(3)


def test_an_executor_of_another_type_is_refused(features_file, tmp_path):
    with open_features(features_file) as store:
        with pytest.raises(TypeError, match="got str"):
            RetrievalIndex.build(store, tmp_path / "x.retrieval.h5", executor="ray")
    assert not (tmp_path / "x.retrieval.h5").exists()
