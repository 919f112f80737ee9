"""Atomic outputs: whole or absent, and with the mode a plain open() gives under the umask."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import read_image, weights_dir, weights_file
from cv2r2d2.config import R2D2Config
from cv2r2d2.utils import atomic_dir, atomic_path


@pytest.fixture
def umask(request):
    """A real process umask for the test (0o027 unless parametrised), restored after it."""
    mask = getattr(request, "param", 0o027)
    previous = os.umask(mask)
    try:
        yield mask
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _assert_plain_modes(root: Path, umask: int) -> None:
    """Every file and folder under root has the mode open() / os.mkdir give."""
    found = sorted(root.rglob("*"))
    assert found
    for path in found:
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        assert _mode(path) == expected, f"{path}: {oct(_mode(path))}, expected {oct(expected)}"
    assert not [p for p in found if p.name.endswith(".tmp")]


@pytest.mark.parametrize("umask", [0o022, 0o027], indirect=True)
def test_atomic_path_and_dir_give_open_and_mkdir_modes(tmp_path, umask):
    with atomic_path(tmp_path / "new" / "a.txt") as tmp:
        assert tmp.parent == tmp_path / "new" and tmp.name.endswith(".tmp")
        tmp.write_text("a")
    with atomic_path(tmp_path / "new" / "a.txt") as tmp, open(tmp, "wb") as f:
        f.write(b"b")  # truncated and rewritten: the mode stays
    assert (tmp_path / "new" / "a.txt").read_text() == "b"
    target = tmp_path / "sparse"
    for content in ("first", "second"):
        with atomic_dir(target) as work:
            (work / "0").mkdir()
            (work / "0" / "model.txt").write_text(content)
    assert (target / "0" / "model.txt").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "sparse"]
    _assert_plain_modes(tmp_path, umask)


def test_atomic_dir_keeps_the_old_folder_on_failure(tmp_path):
    target = tmp_path / "sparse"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as work:
            (work / "half.txt").write_text("half")
            raise RuntimeError("killed")
    assert os.listdir(tmp_path) == ["sparse"] and os.listdir(target) == ["old.txt"]


@pytest.mark.slow  # every kind of output, an ONNX export among them
def test_package_outputs_have_plain_modes(tmp_path, umask, monkeypatch):
    """The feature, match, image, checkpoint, weight and shard files of the package."""
    h5py = pytest.importorskip("h5py")
    import torch

    from cv2r2d2 import weights
    from cv2r2d2.collection import MatchingSettings
    from cv2r2d2.distributed import _Extractor, _match_block
    from cv2r2d2.image import write_image
    from cv2r2d2.pairs import write_pairs
    from cv2r2d2.stores import ImageFeatures, R2D2Folder
    from cv2r2d2.nets import Quad_L2Net_ConfCFS
    from cv2r2d2.shards import ShardedH5, new_run_id
    from cv2r2d2.train.trainer import save_model

    weights_dir()
    out = tmp_path / "out"
    features = ImageFeatures(np.zeros((3, 2), np.float32), np.ones((3, 128), np.float32),
                             np.ones(3, np.float32), (64, 48), np.full(3, 32, np.float32))
    R2D2Folder(out / "r2d2").write("sub/a.png", features)
    write_pairs(out / "pairs.txt", [("a.png", "b.png")])
    write_image(out / "heat.png", np.zeros((8, 8, 3), np.uint8))
    save_model(Quad_L2Net_ConfCFS(mchan=1, dim=8), "Quad_L2Net_ConfCFS(mchan=1, dim=8)",
               out / "trained.pt")
    source = weights_file("r2d2_WAF_N16")
    monkeypatch.setitem(weights.MODELS, "r2d2_WAF_N16", weights.ModelInfo(
        **{**weights.MODELS["r2d2_WAF_N16"].__dict__, "url": source.resolve().as_uri()}))
    weights.download_weights(weights.MODELS["r2d2_WAF_N16"], out / "cache" / "w.pt", progress=False)

    # The Ray workers' shards (the actor and task code, run here without Ray) and the
    # master and merged files.
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "b.png"):
        cv2.imwrite(str(images / name), read_image("boat.png")[:96, :128])
    sharded = ShardedH5(out / "features.h5", "features")
    run = new_run_id()
    threads = torch.get_num_threads()
    try:
        extractor = _Extractor(R2D2Config.from_arguments(device="cpu", nfeatures=50, min_size=0,
                                                         max_size=128), threads)
    finally:
        torch.set_num_threads(threads)
    listed = [(name, str(images / name)) for name in ("a.png", "b.png")]
    assert extractor.extract(listed, str(sharded.path), str(sharded.shard_path(run, 1)), False
                             ).extracted == ["a.png", "b.png"]
    sharded.write_master(sharded.scan())
    matches = ShardedH5(out / "matches.h5", "matches")
    _match_block(str(sharded.path), [("a.png", "b.png")], str(matches.shard_path(run, 1)),
                 MatchingSettings(device="cpu"), None)
    matches.merge(matches.scan())
    with h5py.File(matches.path, "r") as f:
        assert "a.png" in f
    _assert_plain_modes(out, umask)
