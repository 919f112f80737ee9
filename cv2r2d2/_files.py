"""Outputs written atomically, with the permissions a plain ``open()`` gives them.

A run killed while writing must leave the old output or the new one, never half of
one, so every file and folder the package writes is made under a temporary name beside
its destination (``.<name>.<random>.tmp``) and renamed into place. The temporary file
is created as ``open(path, "w")`` creates one, mode 0o666 masked by the umask (a folder
as ``os.mkdir``: 0o777 masked by the umask), not as ``tempfile.mkstemp`` / ``mkdtemp``
do (0o600 / 0o700 whatever the umask): renamed into place, those would stay unreadable
to the other users and services of a shared file system.

This module sits at the bottom of the package: it imports nothing from it.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path
from typing import Callable, Iterator, Union

__all__ = ["TEMPORARY_GLOB", "atomic_path", "atomic_dir"]

PathLike = Union[str, os.PathLike]
# The temporary names of this module, for those cleaning up after killed processes.
TEMPORARY_GLOB = ".*.tmp"


def _create_beside(path: Path, make: Callable[[Path], None]) -> Path:
    """Make (``make(name)``) a new temporary file or folder beside ``path``; its name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        candidate = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            make(candidate)
        except FileExistsError:
            continue
        return candidate


def _new_file(path: Path) -> None:
    # O_EXCL: never an existing file; 0o666: the kernel applies the umask, as for open().
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a new, empty temporary file beside ``path``; move it onto ``path`` on success.

    The file has the mode ``open(path, "w")`` would give ``path``; writers may truncate
    and rewrite it (``open(tmp, "wb")``, ``np.savez``, ``h5py.File(tmp, "w")``,
    ``torch.save``...), which keeps that mode. Missing parent folders are created (mode
    0o777 masked by the umask). On an exception the temporary file is removed and
    ``path`` is left as it was.
    """
    path = Path(path)
    tmp = _create_beside(path, _new_file)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: PathLike) -> Iterator[Path]:
    """Yield a new, empty temporary folder beside ``path``; on success it replaces ``path``.

    The folder has the mode ``os.mkdir(path)`` would give it (0o777 masked by the
    umask). A folder already at ``path`` is moved aside, replaced and then deleted; on
    an exception the temporary folder is deleted and ``path`` is left as it was.
    """
    path = Path(path)
    tmp = _create_beside(path, lambda name: os.mkdir(name, 0o777))
    try:
        yield tmp
        old = None
        if path.exists():
            old = _create_beside(path, lambda name: os.mkdir(name, 0o700))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
