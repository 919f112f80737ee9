"""Model registry, weight resolution, download (local server) and safe loading."""
from __future__ import annotations

import dataclasses
import functools
import http.server
import pickle
import shutil
import threading
from pathlib import Path

import pytest
import torch

from cv2r2d2 import weights
from cv2r2d2.nets import Quad_L2Net_ConfCFS
from conftest import weights_dir, weights_file


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty torch hub cache and no weights folder (the official files stay readable)."""
    source = weights_dir()
    monkeypatch.setattr("conftest.weights_dir", lambda: source)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.delenv(weights.WEIGHTS_DIR_ENV, raising=False)
    return tmp_path / "torch" / "hub" / "checkpoints"


@pytest.fixture
def server(tmp_path):
    """A local HTTP server on 127.0.0.1 serving tmp_path/www."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


def _point_at(monkeypatch, name: str, url: str) -> None:
    monkeypatch.setitem(weights.MODELS, name, dataclasses.replace(weights.MODELS[name], url=url))


def test_registry_matches_the_official_files():
    for name, info in weights.MODELS.items():
        assert weights.sha256sum(weights_file(name)) == info.sha256
        assert info.url.endswith(f"/{name}.pt") and "NC-SA" in info.licence


def test_weights_dir_is_used_and_verified(tmp_path, monkeypatch):
    monkeypatch.setenv(weights.WEIGHTS_DIR_ENV, str(weights_dir()))
    assert weights.resolve_weights("r2d2_WASF_N16") == weights_dir() / "r2d2_WASF_N16.pt"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "r2d2_WASF_N16.pt").write_bytes(weights_file("r2d2_WASF_N16").read_bytes()[:1000])
    monkeypatch.setenv(weights.WEIGHTS_DIR_ENV, str(bad))
    with pytest.raises(weights.WeightsError, match="sha256.*corrupted, truncated"):
        weights.resolve_weights("r2d2_WASF_N16")


def test_explicit_path_and_unknown_name(tmp_path):
    path = weights_file("r2d2_WAF_N16")
    assert weights.resolve_weights(path) == path
    with pytest.raises(weights.WeightsNotFoundError, match="no such checkpoint file"):
        weights.resolve_weights(tmp_path / "nothing.pt")
    with pytest.raises(weights.UnknownModelError, match="neither an existing file nor a known"):
        weights.resolve_weights("r2d2_nothing")
    with pytest.raises(TypeError):
        weights.resolve_weights(3)


def test_download_into_cache_with_checksum(cache, server, monkeypatch):
    root, url = server
    shutil.copy(weights_file("r2d2_WASF_N16"), root / "r2d2_WASF_N16.pt")
    _point_at(monkeypatch, "r2d2_WASF_N16", url + "r2d2_WASF_N16.pt")
    path = weights.resolve_weights("r2d2_WASF_N16", progress=False)
    assert path == cache / "r2d2_WASF_N16.pt"
    assert weights.sha256sum(path) == weights.MODELS["r2d2_WASF_N16"].sha256
    assert sorted(p.name for p in cache.iterdir()) == ["r2d2_WASF_N16.pt"]
    # Second time: from the cache, no server needed.
    _point_at(monkeypatch, "r2d2_WASF_N16", url + "gone.pt")
    assert weights.resolve_weights("r2d2_WASF_N16") == path


def test_download_from_file_url(cache, monkeypatch):
    source = weights_file("r2d2_WAF_N16")
    _point_at(monkeypatch, "r2d2_WAF_N16", source.resolve().as_uri())
    net = weights.load_model("r2d2_WAF_N16", device="cpu")
    assert (cache / "r2d2_WAF_N16.pt").is_file() and not net.training


def test_failed_downloads_leave_nothing(cache, server, monkeypatch):
    root, url = server
    shutil.copy(weights_file("r2d2_WAF_N16"), root / "wrong.pt")
    _point_at(monkeypatch, "r2d2_WASF_N16", url + "wrong.pt")
    with pytest.raises(weights.WeightsError, match="failed its sha256 check"):
        weights.resolve_weights("r2d2_WASF_N16", progress=False)
    _point_at(monkeypatch, "r2d2_WASF_N16", url + "missing.pt")
    with pytest.raises(weights.WeightsError, match=f"could not download.*{weights.WEIGHTS_DIR_ENV}"):
        weights.resolve_weights("r2d2_WASF_N16", progress=False)
    _point_at(monkeypatch, "r2d2_WASF_N16", "http://127.0.0.1:9/r2d2_WASF_N16.pt")
    with pytest.raises(weights.WeightsError, match="could not download"):
        weights.resolve_weights("r2d2_WASF_N16", progress=False)
    assert not cache.exists() or not any(cache.iterdir())
    with pytest.raises(weights.WeightsError, match="not available locally"):
        weights.resolve_weights("r2d2_WASF_N16", download=False)


def test_corrupted_cache_file_is_reported(cache):
    cache.mkdir(parents=True)
    (cache / "r2d2_WASF_N16.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(weights.WeightsError, match="Delete it"):
        weights.resolve_weights("r2d2_WASF_N16")


@pytest.mark.parametrize("name", list(weights.MODELS))
def test_official_checkpoints_load_safely(name):
    checkpoint = weights.load_checkpoint(weights_file(name))
    assert checkpoint["net"] == weights.MODELS[name].net
    assert not any(key.startswith("module.") for key in checkpoint["state_dict"])


def test_loading_logs_the_licence(monkeypatch, caplog, tmp_path):
    monkeypatch.setenv(weights.WEIGHTS_DIR_ENV, str(weights_dir()))
    monkeypatch.setenv(weights.CACHE_DIR_ENV, str(tmp_path))
    weights._tell_licence.cache_clear()
    with caplog.at_level("WARNING", logger=weights.LICENCE_LOGGER):
        weights.load_model("r2d2_WASF_N16", device="cpu")
        weights.load_model("r2d2_WASF_N16", device="cpu")
        weights.load_model("r2d2_WAF_N16", device="cpu")  # once per cache, any model
    assert sum("CC BY-NC-SA 3.0" in r.message for r in caplog.records) == 1
    assert (tmp_path / weights.LICENCE_MARKER).is_file()


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_untrusted_pickles_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"net": "Quad_L2Net_ConfCFS()", "state_dict": {}, "x": _Evil()}, f)
    with pytest.raises(weights.WeightsError, match="not a loadable R2D2 checkpoint"):
        weights.load_checkpoint(path)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(weights_file("r2d2_WASF_N16").read_bytes()[:5000])
    with pytest.raises(weights.WeightsError, match="not a loadable"):
        weights.load_model(truncated)


def test_own_checkpoints_load_the_same_way(tmp_path):
    torch.manual_seed(0)
    net = Quad_L2Net_ConfCFS(mchan=2, dim=32)
    path = tmp_path / "mine.pt"
    torch.save({"net": "Quad_L2Net_ConfCFS(mchan=2, dim=32)", "state_dict": net.state_dict()}, path)
    loaded = weights.load_model(path, device="cpu")
    torch.testing.assert_close(loaded.ops[0].weight, net.ops[0].weight)
    torch.save({"net": "Quad_L2Net_ConfCFS()", "state_dict": net.state_dict()}, path)
    with pytest.raises(weights.WeightsError, match="do not fit the architecture"):
        weights.load_model(path)
    torch.save({"net": "os.system('true')", "state_dict": net.state_dict()}, path)
    with pytest.raises(weights.WeightsError, match="must be a call"):
        weights.load_model(path)
    torch.save([1, 2], path)
    with pytest.raises(weights.WeightsError, match="expected a dict"):
        weights.load_model(path)


def test_errors_are_value_and_file_not_found_errors(tmp_path, cache):
    """OpenCV/NumPy-style callers catch ValueError for a bad argument or file content and
    FileNotFoundError for a missing file; all stay WeightsError."""
    refused = tmp_path / "refused.pt"
    torch.save({"net": "os.system('true')", "state_dict": {}}, refused)
    cache.mkdir(parents=True)
    (cache / "r2d2_WAF_N16.pt").write_bytes(b"not the official file")
    cases = [
        (lambda: weights.resolve_weights("no_such_model"), weights.UnknownModelError,
         ValueError, "neither an existing file nor a known model name"),
        (lambda: weights.load_model(refused), weights.CheckpointError, ValueError,
         "must be a call"),
        (lambda: weights.resolve_weights("r2d2_WAF_N16"), weights.CheckpointError, ValueError,
         "does not hold the official r2d2_WAF_N16 weights"),
        (lambda: weights.resolve_weights("r2d2_WASF_N16", download=False),
         weights.WeightsNotFoundError, FileNotFoundError, "not available locally"),
        (lambda: weights.load_model(str(tmp_path / "some" / "x.pt")),
         weights.WeightsNotFoundError, FileNotFoundError, "no such checkpoint file"),
        (lambda: weights.resolve_weights("x.pt"), weights.WeightsNotFoundError,
         FileNotFoundError, "no such checkpoint file"),
    ]
    for call, specific, builtin, message in cases:
        with pytest.raises(specific, match=message) as caught:
            call()
        assert isinstance(caught.value, builtin) and isinstance(caught.value, weights.WeightsError)
        assert isinstance(caught.value, RuntimeError)  # as before: WeightsError's base
