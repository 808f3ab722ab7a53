"""Sets of arrays built once, on disk, and read by every process as shared read-only memory maps.

A set is a folder `<root>/<name>/` of `.npy` files, one per array. One process builds it:
  1. it takes the set's file lock `<root>/<name>.lock` (fasteners.InterProcessLock), so that of the
     processes wanting the same missing set one builds it and the others wait, then read its result;
  2. it writes the files into a temporary folder beside it (llama_pt.atomic's name,
     `.<name>.tmp-<host>-<pid>-<random>`), fsyncs each file and the folder, renames the folder to
     `<root>/<name>` in one step and fsyncs the parent.
A visible set is therefore always complete. A build killed half-way leaves only a temporary folder,
which is never read; the next build of that set on the same host removes it (holding the lock, no
other process on that host can be writing it). Should the lock not reach across hosts on some file
system, two hosts may build the same set at once: the second rename fails and its result is dropped.

Readers load each file with np.load(mmap_mode="r", allow_pickle=False): the pages belong to the page
cache, shared by every process of the machine, and a process holds no copy of its own.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Callable, Optional

import fasteners
import numpy as np

from ..atomic import TMP_MARK, fsync, fsync_tree, leftovers, remove, temporary_name
from .indexed import PathLike


class TableStore:
    """The sets under one root folder; `name` may contain '/' to group sets in subfolders."""

    def __init__(self, root: PathLike):
        self.root = Path(root)

    def open(self, name: str) -> Optional[dict[str, np.ndarray]]:
        """The arrays of a built set (file stem -> read-only memory-mapped array), None if not built."""
        folder = self.root / name
        if not folder.is_dir():
            return None
        return {p.stem: np.load(p, mmap_mode="r", allow_pickle=False).view(np.ndarray)
                for p in sorted(folder.glob("*.npy"))}

    def build(self, name: str, write: Callable[[Path], None]) -> bool:
        """Build the set unless it exists: `write(folder)` puts its .npy files in `folder`.

        Returns True if this call built it, False if it was there (or another process built it meanwhile)."""
        final = self.root / name
        if final.is_dir():
            return False
        final.parent.mkdir(parents=True, exist_ok=True)
        with fasteners.InterProcessLock(f"{final}.lock"):
            if final.is_dir():
                return False
            host = socket.gethostname()
            for leftover in leftovers(final):
                if leftover.name.startswith(f".{final.name}{TMP_MARK}{host}-"):
                    remove(leftover)
            tmp = temporary_name(final)
            tmp.mkdir()
            try:
                write(tmp)
                fsync_tree(tmp)
                os.rename(tmp, final)
            except OSError:
                remove(tmp)
                if final.is_dir():
                    return False
                raise
            except BaseException:
                remove(tmp)
                raise
            fsync(final.parent)
        return True

    def load(self, name: str, write: Callable[[Path], None]) -> dict[str, np.ndarray]:
        """The arrays of the set, building it first if it does not exist."""
        tables = self.open(name)
        if tables is None:
            self.build(name, write)
            tables = self.open(name)
        return tables
