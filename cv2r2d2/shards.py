"""HDF5 outputs written in shards by many processes and read through one master file.

For an output ``features.h5`` (or ``matches.h5``):

- ``features.h5.shards/<run>-<block>.h5``: shards in the usual hloc layout, each written
  whole by one process to a temporary file and renamed into place, so that a killed
  process leaves no partial shard;
- ``features.h5``: the master, whose entries (a group per image, or per pair of images)
  are HDF5 external links to the shard that holds them. h5py, hloc and
  :func:`cv2r2d2.stores.open_features` open it as a usual file; the links are relative, so
  the file and its shards folder move together.

An entry found in several shards (an ``overwrite`` run) is read from the newest: shard
names start with the run's start time. :meth:`ShardedH5.merge` instead copies every entry
into one plain file and removes the shards. A plain file already at the output (a
single-machine run or a merge) is moved into the shards folder, as the oldest shard, so
that its entries count as done and stay readable.

The master (or merged) file carries the settings record of its entries as the plain
files do (:mod:`cv2r2d2.stores`), and so does each shard.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from .stores import SETTINGS_ATTRIBUTE, H5Features, H5Matches
from .utils import TEMPORARY_GLOB, PathLike, atomic_path, import_optional

__all__ = ["SHARDS_SUFFIX", "ShardedH5", "new_run_id"]

logger = logging.getLogger(__name__)

SHARDS_SUFFIX = ".shards"
"""The shards of ``out.h5`` are in the folder ``out.h5.shards``."""
# Root attribute of a master file: the shards folder, relative to the master.
MASTER_ATTRIBUTE = "cv2r2d2_shards"


def new_run_id() -> str:
    """A name prefix for the shards of one run that sorts after earlier runs' prefixes."""
    return f"{time.time_ns():020d}"


def _feature_entries(path: Path) -> List[str]:
    with H5Features(path) as store:
        return store.names()


def _match_entries(path: Path) -> List[str]:
    with H5Matches(path) as matches:
        return matches.keys()


def _settings(path: Path, kind: str) -> Optional[Dict[str, Any]]:
    with (H5Features(path) if kind == "features" else H5Matches(path)) as store:
        return store.settings()


def _unordered(entry: str) -> str:
    # A pair is one entry whichever way round a shard stores it.
    return "/".join(sorted(entry.split("/")))


# kind -> (complete entries of a file, the identity of an entry)
_KINDS: Dict[str, Tuple[Callable[[Path], List[str]], Callable[[str], str]]] = {
    "features": (_feature_entries, lambda entry: entry),
    "matches": (_match_entries, _unordered),
}


class ShardedH5:
    """An hloc ``features.h5`` or ``matches.h5`` written as shards, read through a master.

    Args:
        path: the output file (the master, or the merged file).
        kind: ``"features"`` (entries are image names) or ``"matches"`` (entries are
            ``name0/name1`` pair keys, either way round).
    """

    def __init__(self, path: PathLike, kind: str) -> None:
        if kind not in _KINDS:
            raise ValueError(f"kind must be 'features' or 'matches', got {kind!r}")
        self.path = Path(path)
        self.kind = kind
        self.shards_dir = self.path.with_name(self.path.name + SHARDS_SUFFIX)
        self._h5py = import_optional("h5py", "HDF5 feature and match files")

    def is_master(self) -> bool:
        """Whether the output exists and is a master file (rather than a plain one)."""
        if not self.path.is_file():
            return False
        with self._h5py.File(self.path, "r") as f:
            return MASTER_ATTRIBUTE in f.attrs

    def identity(self, entry: str) -> str:
        """What makes an entry the same in any shard: the image name, or the unordered
        pair of a ``name0/name1`` pair key."""
        return _KINDS[self.kind][1](entry)

    def shard_path(self, run_id: str, block: int) -> Path:
        """Where block ``block`` (>= 1) of run ``run_id`` goes."""
        return self.shards_dir / f"{run_id}-{block:06d}.h5"

    def adopt_plain_file(self, run_id: str) -> None:
        """Move a plain (not master) output file into the shards folder, as the oldest
        shard of run ``run_id``, so that its entries count as done."""
        if not self.path.is_file() or self.is_master():
            return
        _KINDS[self.kind][0](self.path)  # refuse an unreadable file before moving it
        self.shards_dir.mkdir(parents=True, exist_ok=True)
        target = self.shard_path(run_id, 0)
        logger.info("moving %s into %s: its entries are kept as a shard", self.path, target)
        os.replace(self.path, target)

    def scan(self) -> Dict[str, Tuple[Path, str]]:
        """The complete entries of all shards: identity -> (shard, entry path), from the
        newest shard holding each. A shard that cannot be read is logged and ignored
        (its entries are then done again)."""
        entries_of, identity = _KINDS[self.kind]
        found: Dict[str, Tuple[Path, str]] = {}
        shards = sorted(self.shards_dir.glob("*.h5")) if self.shards_dir.is_dir() else []
        for shard in shards:
            try:
                entries = entries_of(shard)
            except (OSError, ValueError) as exc:
                logger.warning("ignoring unreadable shard %s: %s", shard, exc)
                continue
            for entry in entries:
                found[identity(entry)] = (shard, entry)
        return found

    def settings(self) -> Optional[Dict[str, Any]]:
        """The settings record of the output: the master's (or plain file's), else the
        shards' when they all hold the same one; None when there is none or the shards
        disagree (their settings are then unknown)."""
        if self.path.is_file():
            return _settings(self.path, self.kind)
        shards = sorted(self.shards_dir.glob("*.h5")) if self.shards_dir.is_dir() else []
        records = []
        for shard in shards:
            try:
                records.append(_settings(shard, self.kind))
            except (OSError, ValueError):
                continue  # scan() reports it
        if not records or any(record != records[0] for record in records):
            return None
        return records[0]

    def clear(self) -> None:
        """Delete the output and all its shards."""
        if self.shards_dir.is_dir():
            shutil.rmtree(self.shards_dir)
        self.path.unlink(missing_ok=True)

    def remove_temporary_files(self) -> None:
        """Delete shards left half-written by killed processes (run when none writes)."""
        if self.shards_dir.is_dir():
            for tmp in self.shards_dir.glob(TEMPORARY_GLOB):
                tmp.unlink(missing_ok=True)

    def write_master(self, entries: Dict[str, Tuple[Path, str]],
                     record: Optional[Mapping[str, Any]] = None) -> None:
        """Write the master file (atomically): one external link per entry.

        Args:
            entries: as :meth:`scan` returns.
            record: the settings record of the entries.
        """
        with atomic_path(self.path) as tmp, self._h5py.File(tmp, "w") as f:
            f.attrs[MASTER_ATTRIBUTE] = self.shards_dir.name
            _write_record(f, record)
            for shard, entry in sorted(entries.values(), key=lambda item: item[1]):
                parent, _, leaf = entry.rpartition("/")
                group = f.require_group(parent) if parent else f
                relative = Path(os.path.relpath(shard, self.path.parent)).as_posix()
                group[leaf] = self._h5py.ExternalLink(relative, "/" + entry)

    def merge(self, entries: Dict[str, Tuple[Path, str]],
              record: Optional[Mapping[str, Any]] = None) -> None:
        """Copy every entry into one plain output file (atomically), then delete the
        shards. HDF5 copies dataset by dataset: no entry set is held in memory.

        Args:
            entries: as :meth:`scan` returns.
            record: the settings record of the entries.
        """
        by_shard: Dict[Path, List[str]] = {}
        for shard, entry in entries.values():
            by_shard.setdefault(shard, []).append(entry)
        with atomic_path(self.path) as tmp, self._h5py.File(tmp, "w") as f:
            _write_record(f, record)
            for shard in sorted(by_shard):
                with self._h5py.File(shard, "r") as source:
                    for entry in by_shard[shard]:
                        parent, _, leaf = entry.rpartition("/")
                        source.copy(source[entry], f.require_group(parent) if parent else f,
                                    name=leaf)
        if self.shards_dir.is_dir():
            shutil.rmtree(self.shards_dir)


def _write_record(f: Any, record: Optional[Mapping[str, Any]]) -> None:
    if record is not None:
        f.attrs[SETTINGS_ATTRIBUTE] = json.dumps(record, sort_keys=True)
