"""Extraction and matching on a local Ray cluster of two worker nodes (this machine).

The results must be the single-machine command's, bit for bit; killed actors and an
interrupted driver must cost only unfinished work.
"""
from __future__ import annotations

import functools
import os
import pty
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import ROOT, read_image, record_progress, weights_dir
from cv2r2d2.cli import main
from cv2r2d2.collection import MatchingSettings
from cv2r2d2.config import R2D2Config
from cv2r2d2.image import list_images
from cv2r2d2.stores import H5Matches, open_features

h5py = pytest.importorskip("h5py")

# Small inputs for speed: one 160 px pyramid level.
# The configuration FAST gives on the command line.
OPTIONS = R2D2Config.from_arguments(device="cpu", nfeatures=300, min_size=160, max_size=160)
FAST = ["--device", "cpu", "--nfeatures", "300", "--min-size", "160", "--max-size", "160"]
READABLE = 13


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """13 photos of 160 x 120 or 120 x 160 px (crops of the samples, some in a subfolder)
    and a corrupt file."""
    folder = tmp_path_factory.mktemp("photos")
    (folder / "sub").mkdir()
    count = 0
    for name in ("boat.png", "peppers.png", "brooklyn.png", "test.png"):
        image = read_image(name)
        height, width = image.shape[:2]
        for k in range(4 if name == "brooklyn.png" else 3):
            y, x = (height // 2) * k // 4, (width // 2) * k // 4
            crop = cv2.resize(image[y : y + height // 2, x : x + width // 2], (160, 120),
                              interpolation=cv2.INTER_AREA)
            if k == 1:
                crop = cv2.rotate(crop, cv2.ROTATE_90_CLOCKWISE)
            cv2.imwrite(str(folder / ("sub" if count % 4 == 0 else ".") / f"{name[:-4]}{k}.png"),
                        crop)
            count += 1
    (folder / "broken.jpg").write_bytes(b"not an image")
    assert count == READABLE
    return folder


@pytest.fixture(scope="module")
def reference(photos, tmp_path_factory) -> Path:
    """The single-machine command's features.h5."""
    weights_dir()
    path = tmp_path_factory.mktemp("reference") / "features.h5"
    assert main(["extract", str(photos), "-o", str(path), "-q", *FAST]) == 0
    return path


@pytest.fixture(scope="module")
def cluster():
    """A head node without CPUs and two worker nodes of 2 CPUs, and this process
    connected to it as the driver. Actors get 2 threads, as the single-machine command
    has on this 2-core machine: with 1 thread oneDNN rounds the 1x1 heads differently
    (scores change in the last bit), with 2, 3 or 4 it does not."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    weights_dir()
    node = dict(object_store_memory=80 * 2**20)
    cluster = Cluster(initialize_head=True,
                      head_node_args=dict(num_cpus=0, include_dashboard=False, **node))
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=2, **node)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def _contents(path: Path) -> dict:
    """Every dataset of every entry of an h5 file, read through any external link."""
    with h5py.File(path, "r") as f:
        found = {}

        def walk(group, prefix):
            for key in group:
                item = group[key]
                if isinstance(item, h5py.Dataset):
                    found[prefix + key] = item[()]
                else:
                    walk(item, prefix + key + "/")

        walk(f, "")
        return found


def _assert_same_file(path: Path, expected: Path) -> None:
    got, want = _contents(path), _contents(expected)
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and np.array_equal(got[key], want[key]), key


def _names(path: Path) -> list:
    with open_features(path) as store:
        return store.names()


# These first tests run before the cluster fixture starts Ray in this process.


def test_no_cluster_at_auto_is_said_in_cv2r2d2s_words(photos, tmp_path, capsys, monkeypatch):
    ray = pytest.importorskip("ray")
    import ray._private.services as services

    if ray.is_initialized():
        pytest.skip("Ray is already initialised in this process")
    # As on a machine where no cluster runs (other users' clusters here are ignored).
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(services, "find_gcs_addresses", functools.lru_cache(lambda: []))
    monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir: None)
    output = tmp_path / "out" / "features.h5"
    assert main(["extract", str(photos), "-o", str(output), "--ray", "auto", *FAST]) == 1
    err = capsys.readouterr().err
    assert err.startswith('cv2r2d2 extract: error: no Ray cluster found at "auto"')
    assert "ray start --head" in err and "--ray alone" in err and "--address" not in err
    assert not (tmp_path / "out").exists() and not ray.is_initialized()


def test_cuda_on_a_cluster_without_gpus_is_refused():
    from cv2r2d2.distributed import _cluster_gpus

    cpus_only = types.SimpleNamespace(cluster_resources=lambda: {"CPU": 8.0})
    assert _cluster_gpus(cpus_only, "cpu") == _cluster_gpus(cpus_only, None) == 0
    with pytest.raises(ValueError, match="'cuda:0' asks for GPUs, but the Ray cluster has none"):
        _cluster_gpus(cpus_only, "cuda:0")


def test_the_executor_is_checked_when_made():
    pytest.importorskip("ray")
    from cv2r2d2.distributed import RayExecutor

    for name in ("actors", "threads", "block_size"):
        for value in (0, True, 2.0):
            with pytest.raises(ValueError, match=f"{name} must be an integer >= 1"):
                RayExecutor(**{name: value})
    with pytest.raises(TypeError, match="merge must be True or False"):
        RayExecutor(merge="yes")
    assert RayExecutor(actors=2, merge=True) == RayExecutor(None, 2, merge=True)


@pytest.mark.slow  # starts a local Ray
def test_a_local_ray_prints_nothing_of_its_own(tmp_path):
    """No token-authentication notice at start, no escape sequence at exit (on a terminal)."""
    pytest.importorskip("ray")
    code = ("from cv2r2d2.distributed import _ray_session\n"
            "with _ray_session(None) as ray:\n"
            "    print('connected', ray.is_initialized())\n")
    leader, follower = pty.openpty()
    try:
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, stdout=follower,
                              stderr=follower, timeout=180)
        os.close(follower)
        follower = None
        output = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the terminal closed
                break
            if not chunk:
                break
            output += chunk
    finally:
        os.close(leader)
        if follower is not None:
            os.close(follower)
    assert done.returncode == 0, output
    assert output.decode().strip() == "connected True", output


@pytest.mark.slow  # the Ray cluster
def test_extraction_and_matching_give_the_single_machine_files(
        cluster, photos, reference, tmp_path, capsys, monkeypatch):
    import cv2r2d2.distributed

    output = tmp_path / "features.h5"
    argv = ["extract", str(photos), "-o", str(output), "--ray", cluster.address, "-q", *FAST]
    bars = record_progress(monkeypatch, cv2r2d2.distributed)
    assert main(argv) == 0
    assert bars == [["extract", "image", READABLE + 1, READABLE + 1]]  # broken.jpg too
    captured = capsys.readouterr()
    assert f"extracted {READABLE} image(s), 0 already done" in captured.out
    assert "images/s on 2 actor(s)" in captured.out
    assert "broken.jpg" in captured.err
    _assert_same_file(output, reference)
    with h5py.File(output, "r") as f:  # a master of links to per-block shards
        link = f["sub"].get("boat0.png", getlink=True)
        assert isinstance(link, h5py.ExternalLink)
        assert link.filename.startswith("features.h5.shards/")
    assert len(list((tmp_path / "features.h5.shards").glob("*.h5"))) >= 2

    assert main(argv) == 0  # resumed: nothing left to do
    assert f"extracted 0 image(s), {READABLE} already done" in capsys.readouterr().out

    single = tmp_path / "single-matches.h5"
    assert main(["match", str(reference), "--pairs", "exhaustive", "-o", str(single),
                 "--device", "cpu", "-q"]) == 0
    matches = tmp_path / "matches.h5"
    assert main(["match", str(output), "--pairs", "exhaustive", "-o", str(matches),
                 "--device", "cpu", "--ray", cluster.address, "--block-size", "20",
                 "-q"]) == 0
    pairs = READABLE * (READABLE - 1) // 2
    assert f"matched {pairs} pair(s)" in capsys.readouterr().out
    _assert_same_file(matches, single)
    with H5Matches(matches) as stored:
        assert len(stored.keys()) == pairs
    assert len(list((tmp_path / "matches.h5.shards").glob("*.h5"))) == -(-pairs // 20)

    assert main(["extract", str(photos), "-o", str(output), "--ray", cluster.address,
                 "--merge", "-q", *FAST]) == 0
    assert not (tmp_path / "features.h5.shards").exists()
    with h5py.File(output, "r") as f:
        assert isinstance(f["sub"].get("boat0.png", getlink=True), h5py.HardLink)
    _assert_same_file(output, reference)


@pytest.mark.slow  # the Ray cluster
def test_other_settings_are_refused_and_overwrite_redoes_on_ray(cluster, photos, tmp_path,
                                                                capsys):
    output = tmp_path / "features.h5"
    ray = ["--ray", cluster.address, "-q"]
    assert main(["extract", str(photos), "-o", str(output), *ray, *FAST]) == 0
    with open_features(output) as store:
        assert store.settings()["settings"]["nfeatures"] == 300
    capsys.readouterr()
    assert main(["extract", str(photos), "-o", str(output), *ray, *FAST,
                 "--nfeatures", "100"]) == 1
    assert "nfeatures: stored 300, now 100" in capsys.readouterr().err
    assert len(_names(output)) == READABLE
    assert main(["extract", str(photos), "-o", str(output), *ray, *FAST, "--nfeatures", "100",
                 "--overwrite"]) == 0
    with open_features(output) as store:
        assert store.settings()["settings"]["nfeatures"] == 100
        assert len(store.names()) == READABLE
        assert max(len(store.read(name)) for name in store.names()) <= 100
    matches = tmp_path / "matches.h5"
    match = ["match", str(output), "--pairs", "sequential:1", "-o", str(matches),
             "--device", "cpu", *ray]
    assert main(match) == 0
    assert main([*match, "--ratio", "0.9"]) == 1
    assert "ratio: stored None, now 0.9" in capsys.readouterr().err
    with H5Matches(matches) as stored:
        assert stored.settings()["settings"]["ratio"] is None


def _actor_processes() -> list:
    """Process ids of the extraction actors this test process started (through its
    cluster's raylets), from /proc: Ray titles actor processes ray::<class>."""
    parents, titles = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            titles[int(stat.parent.name)] = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        parents[int(stat.parent.name)] = int(fields[1])

    def descends_from_us(pid: int) -> bool:
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == os.getpid():
                return True
        return False

    return [pid for pid, title in titles.items()
            if b"ray::_Extractor" in title and descends_from_us(pid)]


@pytest.mark.slow  # the Ray cluster
def test_a_killed_actor_costs_only_its_block(cluster, photos, reference, tmp_path):
    from cv2r2d2.distributed import RayExecutor

    output = tmp_path / "features.h5"
    shards = tmp_path / "features.h5.shards"
    killed = []

    def kill_an_actor_mid_run():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not list(shards.glob("*.h5")):
            time.sleep(0.01)
        for pid in _actor_processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # an actor of an earlier run, gone since
                continue
            killed.append(pid)
            break

    killer = threading.Thread(target=kill_an_actor_mid_run)
    killer.start()
    report = RayExecutor(block_size=1).extract(list_images([photos]), output, OPTIONS)
    killer.join()
    assert killed, "no actor was killed"
    assert len(report.extracted) == READABLE and [n for n, _ in report.failed] == ["broken.jpg"]
    assert len(list(shards.glob("*.h5"))) == READABLE
    for shard in shards.glob("*.h5"):  # every shard whole
        assert len(_names(shard)) == 1
    assert not list(shards.glob(".*"))
    _assert_same_file(output, reference)


@pytest.mark.slow  # the Ray cluster
def test_an_interrupted_driver_resumes_with_the_missing_images(
        cluster, photos, reference, tmp_path):
    from cv2r2d2.distributed import RayExecutor

    output = tmp_path / "features.h5"
    shards = tmp_path / "features.h5.shards"
    env = dict(os.environ, CV2R2D2_WEIGHTS_DIR=str(weights_dir()))
    driver = subprocess.Popen(
        [sys.executable, "-m", "cv2r2d2", "extract", str(photos), "-o", str(output), "-q",
         "--ray", cluster.address, "--block-size", "1", "--actors", "1", *FAST],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and len(list(shards.glob("*.h5"))) < 2 \
                and driver.poll() is None:
            time.sleep(0.01)
        driver.send_signal(signal.SIGINT)
        out, _ = driver.communicate(timeout=60)
    finally:
        driver.kill()
    # On a quiet machine the 13 tiny blocks can all finish before the signal lands.
    assert driver.returncode in (130, 0), out
    finished = _names(output)  # the master file lists what the run finished
    assert len(finished) < READABLE if driver.returncode == 130 else len(finished) == READABLE
    # Keep the first two blocks' shards, as if the driver had died there; the rerun must
    # skip exactly their images and redo the others.
    kept = sorted(shards.glob("*.h5"))[:2]
    for shard in sorted(shards.glob("*.h5"))[2:]:
        shard.unlink()
    done = [name for shard in kept for name in _names(shard)]
    assert len(done) == 2
    report = RayExecutor().extract(list_images([photos]), output, OPTIONS)
    assert sorted(report.skipped) == sorted(done)
    assert sorted(report.skipped + report.extracted) == _names(reference)
    _assert_same_file(output, reference)


def test_without_ray_only_the_ray_option_asks_for_it(photos, tmp_path):
    code = f"""
import importlib.abc, sys

class NoRay(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("ray is blocked")

sys.meta_path.insert(0, NoRay())
import numpy as np
import cv2r2d2, cv2r2d2.collection, cv2r2d2.stores, cv2r2d2.matching, cv2r2d2.shards, cv2r2d2.distributed
from cv2r2d2.cli import main
from cv2r2d2.stores import H5Features, ImageFeatures

assert main(["extract", "--help"]) == 0
assert main(["extract", {str(photos)!r}, "-o", {str(tmp_path / "f.h5")!r}, "--ray"]) == 1
assert main(["extract", {str(photos)!r}, "-o", {str(tmp_path / "f.h5")!r}, "--merge"]) == 1
with H5Features({str(tmp_path / "g.h5")!r}, writable=True) as store:
    for name in ("a.png", "b.png"):
        store.write(name, ImageFeatures(np.zeros((1, 2), np.float32),
                                        np.ones((1, 128), np.float32), np.ones(1, np.float32),
                                        (8, 8)))
assert main(["match", {str(tmp_path / "g.h5")!r}, "--pairs", "exhaustive", "-o",
             {str(tmp_path / "m.h5")!r}, "--ray", "auto"]) == 1
assert not any(name == "ray" or name.startswith("ray.") for name in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--ray [ADDRESS]" in done.stdout
    assert done.stderr.count("pip install ray (or pip install 'cv2r2d2[ray]')") == 2
    assert "--merge goes with --ray" in done.stderr
    assert sorted(os.listdir(tmp_path)) == ["g.h5"]  # nothing written


@pytest.mark.slow  # the Ray cluster
def test_matching_with_rotations_gives_the_single_machine_file(cluster, reference,
                                                               quarter_steerers, tmp_path):
    from cv2r2d2.collection import match_collection
    from cv2r2d2.distributed import RayExecutor
    from cv2r2d2.matching import estimate_rotation
    from cv2r2d2.pairs import parse_pairs

    settings = MatchingSettings(rotations=4, device="cpu")
    single = tmp_path / "single.h5"
    with open_features(reference) as store, H5Matches(single, writable=True) as matches:
        pairs = parse_pairs("exhaustive", store.names())
        match_collection(store, pairs, matches, settings, quarter_steerers)
        descriptors = {name: store.read(name).descriptors for name in store.names()}
    # Some photos are rotated by 90 degrees: their pairs are matched under a steerer.
    assert any(estimate_rotation([(descriptors[a], descriptors[b]) for a, b in pairs],
                                 quarter_steerers.for_rotations(4), device="cpu"))
    output = tmp_path / "matches.h5"
    report = RayExecutor(block_size=40).match(reference, pairs, output, settings,
                                              quarter_steerers)
    assert len(report.matched) == len(pairs) and not report.failed
    _assert_same_file(output, single)
