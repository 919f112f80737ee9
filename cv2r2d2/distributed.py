"""Extraction and matching of photo collections on a Ray cluster (``pip install ray``).

:class:`RayExecutor` has the methods of :class:`cv2r2d2.collection.LocalExecutor`, with
the same arguments and files. The driver (this process) lists the work, splits it into
blocks and hands them to Ray; it never receives descriptors, only the names of what
each block wrote. The extractor's :class:`~cv2r2d2.config.R2D2Config` and the
:class:`~cv2r2d2.collection.MatchingSettings` reach the workers as they are.

- Extraction: a pool of actors, each holding one R2D2 model (one GPU per actor when the
  cluster has GPUs, else ``threads`` CPU threads), extracts blocks of images with
  :func:`cv2r2d2.collection.extract_collection`. An ``.h5`` output gets one shard per
  block, written whole and renamed into place, and a master file of external links
  (:mod:`cv2r2d2.shards`); ``.r2d2`` files are written per image, each atomically.
- Matching: Ray tasks match blocks of pairs with
  :func:`cv2r2d2.collection.match_collection`, each block into its own shard, read
  through a master ``matches.h5`` likewise.

Runs resume: entries already in any shard (or in the ``.r2d2`` folder) are skipped. The
driver checks the output's settings record first, as the single-machine functions do:
results of other settings are refused, or deleted first with ``overwrite``
(:mod:`cv2r2d2.provenance`); every shard and the master record the run's settings. An
actor or task killed mid-block is restarted by Ray and its block done again, up to
``RETRIES`` times; the shards it had finished are kept. Images, features and outputs
must be on a file system that every node of the cluster sees under the same paths.

Ray is imported only here, and only when a :class:`RayExecutor` is made.
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import (
    Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Set, Tuple,
)

import numpy as np

from .collection import (
    ExtractionReport, MatchingReport, MatchingSettings, extract_collection, match_collection,
    prepare_output,
)
from .config import TORCH_BACKENDS, R2D2Config
from .provenance import check_reuse, features_record
from .stores import H5Features, H5Matches, R2D2Folder, feature_format, open_features, pair_key
from .utils import PathLike, atomic_path, import_optional, progress, progress_bar
from .shards import ShardedH5, new_run_id
from .steerers import as_steerers

__all__ = [
    "RayExecutor",
    "RayExtractionReport",
]

logger = logging.getLogger(__name__)

# Times Ray runs a block again after the process running it died.
RETRIES = 3
# Blocks queued per actor (or per CPU for matching tasks): one running, one waiting.
QUEUE_DEPTH = 2
MAX_BLOCK_SIZE = 64
DEFAULT_THREADS = 4
# Environment variables the workers need as the driver has them.
FORWARDED_ENV = ("CV2R2D2_WEIGHTS_DIR", "CV2R2D2_NUM_THREADS")


# Ray's notice, on every start, that a cluster has token authentication on (or off): not
# something a user of these functions can act on. Its other warnings are kept.
_RAY_TOKEN_LOGGER = "ray._private.authentication.authentication_token_setup"


def _import_ray() -> ModuleType:
    return import_optional("ray", "--ray (extraction and matching on a Ray cluster)",
                           extra="ray")


def _colorama_exit_handler() -> Optional[Callable[[], None]]:
    """colorama's exit handler, if its init() has registered it (colorama as Ray has it)."""
    initialise = getattr(sys.modules.get("colorama"), "initialise", None)
    return initialise.reset_all if getattr(initialise, "atexit_done", False) else None


@contextlib.contextmanager
def _ray_session(address: Optional[str]) -> Iterator[ModuleType]:
    """Ray, connected: the caller's session if there is one; else a new local Ray
    (``address`` None or ``"local"``) or the cluster at ``address`` (``"auto"``,
    ``"host:port"``, ``"ray://host:port"``), shut down on exit.

    Raises:
        ConnectionError: no cluster runs at ``"auto"``.
    """
    ray = _import_ray()
    if ray.is_initialized():
        yield ray
        return
    env = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
    options: Dict[str, Any] = dict(
        log_to_driver=logger.isEnabledFor(logging.DEBUG), logging_level=logging.WARNING,
        runtime_env={"env_vars": env} if env else None,
    )
    token_logger = logging.getLogger(_RAY_TOKEN_LOGGER)
    level = token_logger.level
    token_logger.setLevel(logging.ERROR)
    exit_handler = _colorama_exit_handler()
    try:
        if address in (None, "local"):
            ray.init(address="local", include_dashboard=False, **options)
        else:
            ray.init(address=address, **options)
    except ConnectionError as exc:
        if address != "auto":
            raise
        raise ConnectionError(
            'no Ray cluster found at "auto" (none runs on this machine and RAY_ADDRESS is '
            "not set): start one with `ray start --head`, or use --ray alone (address=None) "
            "for a local Ray started for this run") from exc
    finally:
        token_logger.setLevel(level)
        if exit_handler is None and _colorama_exit_handler() is not None:
            # ray.init ran colorama.init(), whose exit handler writes an escape sequence
            # ("\x1b[0m") on a terminal after the program's last line.
            atexit.unregister(_colorama_exit_handler())
    try:
        yield ray
    finally:
        ray.shutdown()


def _blocks(items: Sequence[Any], block_size: Optional[int], workers: int) -> List[List[Any]]:
    """Consecutive blocks of ``items``; by default about 4 per worker, at most
    ``MAX_BLOCK_SIZE`` items each (what a killed worker costs)."""
    if block_size is None:
        block_size = min(MAX_BLOCK_SIZE, math.ceil(len(items) / (2 * QUEUE_DEPTH * workers)))
    return [list(items[i : i + block_size]) for i in range(0, len(items), block_size)]


def _stream(ray: ModuleType, slots: Sequence[Callable[[Any], Any]],
            blocks: Iterable[Any]) -> Iterator[Tuple[Any, Any]]:
    """Run blocks, one in flight per slot (a function submitting a block to Ray), and
    yield (block, result) as they finish; the result is the exception when the worker
    died more often than retried."""
    pending = iter(blocks)
    running: Dict[Any, Tuple[Callable[[Any], Any], Any]] = {}

    def submit(slot: Callable[[Any], Any]) -> None:
        block = next(pending, None)
        if block is not None:
            running[slot(block)] = (slot, block)

    for slot in slots:
        submit(slot)
    while running:
        (ref,), _ = ray.wait(list(running), num_returns=1)
        slot, block = running.pop(ref)
        try:
            result = ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as exc:
            result = exc
        yield block, result
        submit(slot)


def _cluster_gpus(ray: ModuleType, device: Optional[str]) -> int:
    """GPUs to use: the cluster's, unless the device asked for is the CPU.

    Raises:
        ValueError: a CUDA device asked for on a cluster without GPUs.
    """
    if device is not None and not str(device).startswith("cuda"):
        return 0
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if device is not None and not gpus:
        raise ValueError(f"device {device!r} asks for GPUs, but the Ray cluster has none "
                         "(use --device cpu, or leave --device out)")
    return gpus


def _largest_node_cpus(ray: ModuleType) -> int:
    return int(max((node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]),
                   default=1)) or 1


# --- the executor ----------------------------------------------------------------------


@dataclass(frozen=True)
class RayExecutor:
    """Extraction and matching of a collection on a Ray cluster: the methods, arguments
    and files of :class:`cv2r2d2.collection.LocalExecutor` (bit for bit on the CPU).

    Made, Ray is imported (a missing Ray is an ImportError saying how to install it,
    before anything is written); each call connects to the cluster and leaves it.

    Attributes:
        address: None or ``"local"``: a local Ray started for each run; ``"auto"``,
            ``"host:port"`` or ``"ray://host:port"``: that cluster. Ignored when Ray is
            already initialised in this process.
        actors: extraction actors (models) to run; default: one per GPU of the cluster,
            else its CPUs divided by ``threads``.
        threads: CPU threads per actor without GPUs (default: 4, at most a node's CPUs).
        block_size: images or pairs per block, the unit of work, of shards and of loss
            when a worker dies (default: about 4 blocks per worker, at most 64).
        merge: end with one plain ``.h5`` file instead of a master over shards.
    """

    address: Optional[str] = None
    actors: Optional[int] = None
    threads: Optional[int] = None
    block_size: Optional[int] = None
    merge: bool = False

    def __post_init__(self) -> None:
        if self.address is not None and not isinstance(self.address, str):
            raise TypeError(f"address must be None or a string such as 'auto' or "
                            f"'ray://host:10001', got {self.address!r}")
        for name in ("actors", "threads", "block_size"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1 (None: the default), got {value!r}")
            object.__setattr__(self, name, int(value))
        if not isinstance(self.merge, (bool, np.bool_)):
            raise TypeError(f"merge must be True or False, got {self.merge!r}")
        _import_ray()

    def extract(
        self,
        images: Sequence[Tuple[str, PathLike]],
        output: PathLike,
        config: Optional[R2D2Config] = None,
        format: str = "auto",
        overwrite: bool = False,
        show_progress: bool = False,
    ) -> RayExtractionReport:
        """Extract the features of ``images`` on the cluster, resuming a previous run,
        as :meth:`cv2r2d2.collection.LocalExecutor.extract` does.

        Images already done are skipped unless ``overwrite``, unreadable ones (and those
        of blocks whose worker died more often than retried) are listed in the report's
        ``failed``.

        Args:
            images: (name, path) pairs, e.g. from :func:`cv2r2d2.image.list_images`.
            output: an ``.h5`` file (a master file over a ``<output>.shards`` folder) or
                a folder of ``.r2d2`` files, as :func:`cv2r2d2.stores.open_features` takes.
            config: the extractor's configuration, sent to the actors as it is (None:
                the paper's settings); ``R2D2Feature.getConfig()`` gives an extractor's.
            format: ``"auto"`` (by the suffix), ``"h5"`` or ``"r2d2"``.
        """
        if config is None:
            config = R2D2Config()
        if not isinstance(config, R2D2Config):
            raise TypeError(f"config must be an R2D2Config, got {type(config).__name__}")
        record = features_record(config)
        output = Path(output)
        is_h5 = feature_format(output, format) == "h5"
        if self.merge and not is_h5:
            raise ValueError("merge applies to .h5 outputs; .r2d2 files are one per image")
        if not is_h5 and output.is_file():
            raise ValueError(f"{output} is a file; .r2d2 features go in a folder")
        sharded = ShardedH5(output, "features") if is_h5 else None
        run_id = new_run_id()
        report = RayExtractionReport()
        if sharded is not None:
            done = _resumed(sharded, run_id, record, output, overwrite)
        else:
            folder = R2D2Folder(output)
            prepare_output(folder, record, overwrite)
            done = set(folder.names())
        todo: List[Tuple[str, str]] = []
        for name, path in images:
            if name in done and not overwrite:
                report.skipped.append(name)
            else:
                todo.append((name, os.fspath(path)))
        # Largest files first, in blocks of similar sizes: blocks cost about the same, the
        # longest ones start first, and an actor sees images of similar shapes in a row.
        todo.sort(key=lambda item: -_file_size(item[1]))
        try:
            if todo:
                _extract_on_ray(self, todo, output, sharded, run_id, config, overwrite,
                                show_progress, report)
        finally:
            if sharded is not None:
                _finish(sharded, self.merge, rewrite=bool(todo), record=record)
        return report

    def match(
        self,
        features: PathLike,
        pairs: Sequence[Tuple[str, str]],
        output: PathLike,
        settings: Optional[MatchingSettings] = None,
        steerers: Any = None,
        overwrite: bool = False,
        show_progress: bool = False,
    ) -> MatchingReport:
        """Match ``pairs`` on the cluster into a sharded ``matches.h5``, resuming, as
        :meth:`cv2r2d2.collection.LocalExecutor.match` does.

        Pairs already in a shard (either way round) are skipped unless ``overwrite``;
        pairs of blocks whose worker died more often than retried are listed in the
        report's ``failed``.

        Args:
            features: the feature file (a master file too) or ``.r2d2`` folder, which
                every node reads.
            pairs: (name0, name1) pairs, e.g. from :func:`cv2r2d2.pairs.parse_pairs`.
            output: the matches ``.h5`` file (a master over ``<output>.shards``).
            settings: as :func:`cv2r2d2.collection.match_collection`, sent to the tasks
                as it is; tasks take one GPU each when the cluster has GPUs and the
                device allows (a CUDA device on a cluster without GPUs is a ValueError).
            steerers: as :func:`cv2r2d2.collection.match_collection`; fitted (if
                needed) here, once, and sent to the tasks.
        """
        if settings is None:
            settings = MatchingSettings()
        if not isinstance(settings, MatchingSettings):
            raise TypeError(f"settings must be a MatchingSettings, got {type(settings).__name__}")
        if settings.rotations > 1:
            steerers = as_steerers(steerers, settings.rotations)
        with open_features(features) as store:
            record = settings.record(store.settings())
        sharded = ShardedH5(output, "matches")
        run_id = new_run_id()
        report = MatchingReport()
        done = _resumed(sharded, run_id, record, output, overwrite)
        todo = []
        for a, b in pairs:
            if not overwrite and sharded.identity(pair_key(a, b)) in done:
                report.skipped.append((a, b))
            else:
                todo.append((a, b))
        try:
            if todo:
                _match_on_ray(self, todo, os.fspath(features), sharded, run_id, settings,
                              steerers, show_progress, report)
        finally:
            _finish(sharded, self.merge, rewrite=bool(todo), record=record)
        return report

    def map_blocks(self, worker: Callable[[], Any], work: Callable[[Any, List[Any]], List[Any]],
                   items: Sequence[Any], show_progress: bool = False, desc: str = "",
                   unit: str = "it", device: Optional[str] = None) -> List[Any]:
        """``work(state, block)`` over blocks of ``items`` on the cluster's actors, each
        with its own ``state = worker()`` (a model, an open file...), as
        :meth:`cv2r2d2.collection.LocalExecutor.map_blocks` does: the results in the order
        of ``items``. ``worker`` and ``work`` are pickled to the actors; the files they
        open must be readable on every node. ``device``: the torch device the work runs
        on (actors take one GPU each when the cluster has GPUs and it allows).

        Raises:
            RuntimeError: a block's worker died more often than retried (no partial
                results are returned).
        """
        items = list(items)
        if not items:
            return []
        callers_session = _import_ray().is_initialized()
        with _ray_session(self.address) as ray:
            gpus, threads, actors = _pool_size(ray, self, device)
            resources = dict(num_gpus=1, num_cpus=1) if gpus else dict(num_cpus=threads)
            actor_class = ray.remote(max_restarts=-1, max_task_retries=RETRIES,
                                     **resources)(_BlockWorker)
            pool = [actor_class.remote(worker, threads) for _ in range(actors)]
            blocks = list(enumerate(_blocks(items, self.block_size, actors)))

            def slot(actor: Any) -> Callable[[Any], Any]:
                return lambda numbered: actor.run.remote(work, numbered[1])

            results: Dict[int, List[Any]] = {}
            try:
                finished = _stream(ray, [slot(a) for a in pool for _ in range(QUEUE_DEPTH)],
                                   blocks)
                bar = progress_bar(len(items), show_progress, desc, unit, leave=False)
                for (number, block), result in finished:
                    if isinstance(result, Exception):
                        raise RuntimeError(f"{len(block)} {unit}(s) were lost, their worker "
                                           f"died: {result}") from result
                    results[number] = result
                    if bar is not None:
                        bar.update(len(block))
                if bar is not None:
                    bar.close()
            finally:
                if callers_session:
                    for actor in pool:
                        ray.kill(actor)
        return [result for number in sorted(results) for result in results[number]]


def _resumed(sharded: ShardedH5, run_id: str, record: Mapping[str, Any], output: PathLike,
             overwrite: bool) -> Set[str]:
    """What earlier runs left in a sharded output: the names done (none once a run with
    other settings is cleared, as ``check_reuse`` decides), its temporary files removed."""
    sharded.adopt_plain_file(run_id)
    sharded.remove_temporary_files()
    done = set(sharded.scan())
    if check_reuse(sharded.settings(), record, bool(done), output, overwrite):
        sharded.clear()
        return set()
    return done


def _finish(sharded: ShardedH5, merge: bool, rewrite: bool, record: Mapping[str, Any]) -> None:
    """Write the master file (or the merged file) when the run changed the shards or
    the output is not what was asked; nothing when there is nothing to point at (a run
    that failed before its first block, with no earlier output)."""
    is_master = sharded.is_master()
    if rewrite or (merge and is_master) or (not merge and not is_master) \
            or sharded.settings() != record:
        sharded.remove_temporary_files()
        entries = sharded.scan()
        if not entries and not sharded.path.exists():
            return
        if merge:
            sharded.merge(entries, record)
        else:
            sharded.write_master(entries, record)




# --- extraction ------------------------------------------------------------------------


@dataclass
class RayExtractionReport(ExtractionReport):
    """What :meth:`RayExecutor.extract` did, as
    :class:`~cv2r2d2.collection.ExtractionReport` (its seconds counted once the actors
    started), with the number of actors."""

    actors: int = 0

    def throughput(self) -> str:
        """One line: images extracted, seconds, images per second, actors."""
        return f"{super().throughput()} on {self.actors} actor(s)"



class _BlockWorker:
    """A Ray actor of :meth:`RayExecutor.map_blocks`: a state of its own, blocks of work."""

    def __init__(self, worker: Callable[[], Any], threads: int) -> None:
        self._state = worker()
        # This process is the actor's own; its thread count is its share of the node. Torch
        # only where the worker's state needs it (describing retrieval vectors does not).
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(threads)

    def run(self, work: Callable[[Any, List[Any]], List[Any]], block: List[Any]) -> List[Any]:
        """``work(state, block)``."""
        return list(work(self._state, block))


class _Extractor:
    """A Ray actor: one R2D2 model, extracting blocks of images."""

    def __init__(self, config: R2D2Config, threads: int) -> None:
        from .feature2d import R2D2Feature

        if config.backend in TORCH_BACKENDS:
            import torch

            # This process is the actor's own; its thread count is its share of the node.
            torch.set_num_threads(threads)
        self._feature = R2D2Feature(config)

    def ready(self) -> bool:
        """True once the model is loaded."""
        return True

    def extract(self, images: List[Tuple[str, str]], output: str, shard: Optional[str],
                overwrite: bool) -> ExtractionReport:
        """Extract ``images`` into ``shard`` (an h5 file written whole), or into the
        ``.r2d2`` folder ``output`` when ``shard`` is None. Returns names only."""
        if shard is None:
            return extract_collection(images, R2D2Folder(output), self._feature, overwrite)
        with atomic_path(shard) as tmp, H5Features(tmp, writable=True) as store:
            report = extract_collection(images, store, self._feature, overwrite=True)
        if not report.extracted:  # only unreadable images: no shard to keep
            os.remove(shard)
        return report


def _file_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0  # reported as unreadable by the actor that gets it


def _pool_size(ray: ModuleType, executor: "RayExecutor", device: Optional[str]
               ) -> Tuple[int, int, int]:
    """(GPUs per actor's share: the cluster's usable GPUs, CPU threads per actor, actors)
    of a run of ``executor`` whose models run on ``device``."""
    gpus = _cluster_gpus(ray, device)
    threads = executor.threads or min(DEFAULT_THREADS, _largest_node_cpus(ray))
    actors = executor.actors or gpus or max(
        1, int(ray.cluster_resources().get("CPU", 1)) // threads)
    return gpus, threads, actors


def _extract_on_ray(executor: RayExecutor, todo: List[Tuple[str, str]], output: Path,
                    sharded: Optional[ShardedH5], run_id: str, config: R2D2Config,
                    overwrite: bool, show_progress: bool, report: RayExtractionReport) -> None:
    callers_session = _import_ray().is_initialized()
    with _ray_session(executor.address) as ray:
        gpus, threads, actors = _pool_size(ray, executor, config.device)
        logger.info("extracting %d image(s) on %d actor(s), %s", len(todo), actors,
                    "one GPU each" if gpus else f"{threads} CPU thread(s) each")
        resources = dict(num_gpus=1, num_cpus=1) if gpus else dict(num_cpus=threads)
        actor_class = ray.remote(max_restarts=-1, max_task_retries=RETRIES,
                                 **resources)(_Extractor)
        pool = [actor_class.remote(config, threads) for _ in range(actors)]

        def slot(actor: Any) -> Callable[[Any], Any]:
            def submit(numbered: Tuple[int, List[Tuple[str, str]]]) -> Any:
                number, block = numbered
                shard = None if sharded is None else sharded.shard_path(run_id, number)
                return actor.extract.remote(block, os.fspath(output),
                                            shard and os.fspath(shard), overwrite)
            return submit

        try:
            try:
                ray.get([actor.ready.remote() for actor in pool])
            except ray.exceptions.RayActorError as exc:
                raise RuntimeError(f"the extraction actors could not start: {exc}") from exc
            blocks = list(enumerate(_blocks(todo, executor.block_size, actors), 1))
            report.actors = actors
            start = time.perf_counter()
            results = _stream(ray, [slot(a) for a in pool for _ in range(QUEUE_DEPTH)], blocks)
            try:
                for _ in progress(_finished_images(results, report), len(todo),
                                  show_progress, "extract", unit="image"):
                    pass
            finally:
                report.seconds = time.perf_counter() - start
        finally:
            # The caller's session goes on: free the actors' resources for its next run. A
            # session of this run ends with it, and its actors (ray.kill would log the
            # blocks they had not finished, after Ctrl-C, as failed tasks to be retried).
            if callers_session:
                for actor in pool:
                    ray.kill(actor)


def _finished_images(results: Iterable[Tuple[Any, Any]],
                     report: RayExtractionReport) -> Iterator[str]:
    """Add each block's outcome to the report; yield its images one by one."""
    for (_, block), result in results:
        if isinstance(result, BaseException):
            reason = f"the worker died {RETRIES + 1} times on this block: {result}"
            done = []
            failed = [(name, reason) for name, _ in block]
        else:
            # Images a killed attempt had written (.r2d2) were done by this run too.
            done = result.extracted + result.skipped
            failed = result.failed
        report.extracted += done
        report.failed += failed
        yield from done + [name for name, _ in failed]


# --- matching --------------------------------------------------------------------------


def _match_block(features: str, pairs: List[Tuple[str, str]], shard: str,
                 settings: MatchingSettings, steerers: Any) -> Tuple[List[Tuple[str, str]], List[int]]:
    """A Ray task: match ``pairs`` into the h5 file ``shard``, written whole."""
    with open_features(features) as store, atomic_path(shard) as tmp, \
            H5Matches(tmp, writable=True) as matches:
        report = match_collection(store, pairs, matches, settings, steerers, overwrite=True)
    return report.matched, report.num_matches


def _match_on_ray(executor: RayExecutor, todo: List[Tuple[str, str]], features: str,
                  sharded: ShardedH5, run_id: str, settings: MatchingSettings, steerers: Any,
                  show_progress: bool, report: MatchingReport) -> None:
    with _ray_session(executor.address) as ray:
        gpus = _cluster_gpus(ray, settings.device)
        workers = gpus or max(1, int(ray.cluster_resources().get("CPU", 1)))
        task = ray.remote(num_cpus=1, num_gpus=1 if gpus else 0,
                          max_retries=RETRIES)(_match_block)

        def submit(numbered: Tuple[int, List[Tuple[str, str]]]) -> Any:
            number, block = numbered
            shard = os.fspath(sharded.shard_path(run_id, number))
            return task.remote(features, block, shard, settings, steerers)

        blocks = list(enumerate(_blocks(todo, executor.block_size, workers), 1))
        start = time.perf_counter()
        results = _stream(ray, [submit] * (QUEUE_DEPTH * workers), blocks)
        try:
            for _ in progress(_finished_pairs(results, report), len(todo), show_progress,
                              "match", unit="pair"):
                pass
        finally:
            report.seconds = time.perf_counter() - start


def _finished_pairs(results: Iterable[Tuple[Any, Any]],
                    report: MatchingReport) -> Iterator[Tuple[str, str]]:
    """Add each block's outcome to the report; yield its pairs one by one."""
    for (_, block), result in results:
        if isinstance(result, BaseException):
            reason = f"the worker died {RETRIES + 1} times on this block: {result}"
            report.failed += [(tuple(pair), reason) for pair in block]
            yield from block
        else:
            matched, num_matches = result
            report.matched += [tuple(pair) for pair in matched]
            report.num_matches += num_matches
            yield from matched
