"""Sharded HDF5 outputs: the master file of external links, merging, resuming."""
from __future__ import annotations

import os

import numpy as np
import pytest

from cv2r2d2.stores import H5Features, H5Matches, ImageFeatures, open_features
from cv2r2d2.shards import ShardedH5, new_run_id

h5py = pytest.importorskip("h5py")


def _features(n: int, seed: int) -> ImageFeatures:
    rng = np.random.default_rng(seed)
    return ImageFeatures(rng.uniform(0, 100, (n, 2)).astype(np.float32),
                         rng.normal(size=(n, 128)).astype(np.float32),
                         rng.uniform(size=n).astype(np.float32), (100, 80))


def _write_shard(path, entries) -> None:
    with H5Features(path, writable=True) as store:
        for name, seed in entries:
            store.write(name, _features(10 + seed, seed))


def _same(a: ImageFeatures, b: ImageFeatures) -> bool:
    return all(np.array_equal(x, y) for x, y in
               ((a.keypoints, b.keypoints), (a.descriptors, b.descriptors), (a.scores, b.scores)))


@pytest.fixture
def sharded(tmp_path) -> ShardedH5:
    """Two runs of shards; the second redid 'b.png' (seed 9 instead of 2)."""
    output = ShardedH5(tmp_path / "out" / "features.h5", "features")
    first, second = new_run_id(), new_run_id()
    _write_shard(output.shard_path(first, 1), [("a.png", 1), ("sub/b.png", 2)])
    _write_shard(output.shard_path(first, 2), [("c.png", 3)])
    _write_shard(output.shard_path(second, 1), [("sub/b.png", 9)])
    return output


def test_master_links_to_the_newest_shard_and_reads_as_usual(sharded, tmp_path):
    entries = sharded.scan()
    assert sorted(entries) == ["a.png", "c.png", "sub/b.png"]
    sharded.write_master(entries)
    assert sharded.is_master()
    # Moved elsewhere, master and shards still read (the links are relative).
    moved = tmp_path / "moved"
    os.replace(sharded.path.parent, moved)
    with open_features(moved / "features.h5") as store:
        assert store.names() == ["a.png", "c.png", "sub/b.png"]
        assert _same(store.read("sub/b.png"), _features(19, 9))
    with h5py.File(moved / "features.h5", "r") as f:  # as hloc reads it
        link = f["sub"].get("b.png", getlink=True)
        assert isinstance(link, h5py.ExternalLink) and link.filename.startswith("features.h5.shards/")
        assert f["a.png/descriptors"].shape == (128, 11)


def test_merge_writes_one_plain_file_and_removes_the_shards(sharded):
    sharded.merge(sharded.scan())
    assert not sharded.shards_dir.exists() and not sharded.is_master()
    with h5py.File(sharded.path, "r") as f:
        assert isinstance(f["sub"].get("b.png", getlink=True), h5py.HardLink)
    with open_features(sharded.path) as store:
        assert store.names() == ["a.png", "c.png", "sub/b.png"]
        assert _same(store.read("sub/b.png"), _features(19, 9))


def test_a_plain_file_becomes_the_oldest_shard(tmp_path):
    output = ShardedH5(tmp_path / "features.h5", "features")
    _write_shard(output.path, [("a.png", 1), ("b.png", 2)])  # a single-machine run
    run = new_run_id()
    output.adopt_plain_file(run)
    assert not output.path.exists()
    _write_shard(output.shard_path(run, 1), [("b.png", 5)])
    entries = output.scan()
    assert entries["a.png"][0] == output.shard_path(run, 0)
    assert entries["b.png"][0] == output.shard_path(run, 1)


def test_unreadable_shards_and_temporary_files_are_ignored(sharded):
    sharded.shards_dir.joinpath("broken.h5").write_bytes(b"not hdf5")
    sharded.shards_dir.joinpath(".x.h5.123.tmp").write_bytes(b"half")
    assert sorted(sharded.scan()) == ["a.png", "c.png", "sub/b.png"]
    sharded.remove_temporary_files()
    assert not list(sharded.shards_dir.glob(".*.tmp"))


def test_matches_are_one_entry_either_way_round(tmp_path):
    output = ShardedH5(tmp_path / "matches.h5", "matches")
    first, second = new_run_id(), new_run_id()
    with H5Matches(output.shard_path(first, 1), writable=True) as matches:
        matches.write("x/a.png", "b.png", np.array([[0, 1]]), np.array([0.5]), 3)
        matches.write("c.png", "b.png", np.array([[2, 2]]), np.array([0.9]), 3)
    with H5Matches(output.shard_path(second, 1), writable=True) as matches:
        matches.write("b.png", "x/a.png", np.array([[1, 2]]), np.array([0.7]), 3)
    entries = output.scan()
    assert len(entries) == 2 and output.identity("b.png/x-a.png") in entries
    output.write_master(entries)
    with H5Matches(output.path) as matches:
        assert matches.keys() == ["b.png/x-a.png", "c.png/b.png"]
        indices, scores = matches.read("x/a.png", "b.png")
        np.testing.assert_array_equal(indices, [[2, 1]])
        np.testing.assert_allclose(scores, [0.7])


def test_kind_is_checked(tmp_path):
    with pytest.raises(ValueError, match="kind must be"):
        ShardedH5(tmp_path / "x.h5", "pairs")
