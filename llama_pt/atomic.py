"""Every output is written under a temporary name beside its final path and renamed when complete.

A reader therefore sees either the previous version or the whole new one, never a partial file, however
the writer dies; a rerun finds either the output (done) or no output (to redo). Temporary names start
with a dot and carry the host, the process id and a random part, so concurrent writers of the same
path never share one, and `leftovers` finds what killed writers left behind.

- `atomic_path(path)`: a context yielding the temporary path, for writers that take a path (np.save,
  matplotlib, SentencePiece, a folder filled by the caller); renamed over `path` when the block ends
  without an exception, removed otherwise.
- `atomic_open(path, mode)`: the same, yielding an open file.
- `write_bytes_atomic` / `write_text_atomic`: one call for a small file.

With ``durable=True`` (the default) the data is fsynced before the rename and the folder after it, so
the rename survives a machine crash too; heartbeats and other files rewritten every few seconds pass
``durable=False``. Torch-free.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
from pathlib import Path
from typing import IO, Iterator, Union

PathLike = Union[str, os.PathLike]
TMP_MARK = ".tmp-"


def temporary_name(path: PathLike) -> Path:
    """A hidden, unique sibling of ``path``: ``.<name>.tmp-<host>-<pid>-<random>``."""
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_MARK}{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}")


def leftovers(path: PathLike) -> list[Path]:
    """Temporary siblings of ``path`` left by writers that did not finish (any host, any process)."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    return sorted(path.parent.glob(f".{path.name}{TMP_MARK}*"))


def remove(path: PathLike) -> None:
    """Delete a file or a folder tree; nothing if it does not exist."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def fsync(path: PathLike) -> None:
    """fsync one file, or one folder's entries."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: PathLike) -> None:
    """fsync a file, or every file under a folder and every folder of it."""
    path = Path(path)
    if path.is_dir():
        for child in path.iterdir():
            fsync_tree(child)
    if path.is_dir() or path.is_file():
        fsync(path)


@contextlib.contextmanager
def atomic_path(path: PathLike, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path; rename it to ``path`` on success (replacing a file, or a folder: the old one is
    first renamed out of sight, then deleted)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        if durable:
            fsync_tree(tmp)
        if tmp.is_dir() and path.is_dir():
            old = temporary_name(path)
            os.replace(path, old)
            os.replace(tmp, path)
            remove(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        remove(tmp)
        raise
    if durable:
        fsync(path.parent)


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "wb", durable: bool = True, **kwargs) -> Iterator[IO]:
    """Yield a file open for writing (``mode`` "w…" or "x…"); it becomes ``path`` when the block ends."""
    if not mode.startswith(("w", "x")):
        raise ValueError(f"atomic_open writes a new file; mode {mode!r} is not a write mode")
    with atomic_path(path, durable) as tmp:
        with open(tmp, mode, **kwargs) as f:
            yield f


def write_bytes_atomic(path: PathLike, data: bytes, durable: bool = True) -> Path:
    with atomic_open(path, "wb", durable) as f:
        f.write(data)
    return Path(path)


def write_text_atomic(path: PathLike, text: str, durable: bool = True, encoding: str = "utf-8") -> Path:
    with atomic_open(path, "w", durable, encoding=encoding) as f:
        f.write(text)
    return Path(path)
