"""Checkpoints: torch.distributed.checkpoint folders, written atomically and verified before loading.

A checkpoint is a folder ``step_XXXXXXXX`` holding
- the DCP files of a nested dict of tensors only (model weights, optimizer moments by parameter name),
- ``trainer_state.json``: step, loader counter, RNG states, the resolved config (plain JSON),
- ``MANIFEST.json``: size and SHA-256 of every other file, written last.

It is written under a temporary name and renamed when complete, and deleted by renaming it out of
sight first, so a reader never sees a partial folder, whenever the writer is killed; a folder whose manifest is missing or whose files do not match it is refused with a message
naming the file. Nothing is unpickled without restriction: tensors are read by DCP with
``weights_only=True`` and DCP's metadata file through an allow-list unpickler.

Across processes (every rank calls save/load): each rank writes the DCP file of its own shards, rank 0
writes the trainer state and, after a barrier, the manifest, then renames. On load, rank 0 verifies
every file against the manifest and sends the verdict (JSON over a broadcast) to all ranks before any
of them reads a tensor; `latest_valid_checkpoint` is likewise decided by rank 0. The folder must be on
a file system all ranks see.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from ..atomic import fsync, fsync_tree, write_text_atomic

MANIFEST = "MANIFEST.json"
TRAINER_STATE = "trainer_state.json"
PREFIX = "step_"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, partial or corrupt; the message names the folder and file."""


_DTYPE_NAMES = frozenset(n for n in dir(torch) if isinstance(getattr(torch, n, None), torch.dtype))


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` allowing exactly the (module, name) pairs it is made of.

    Names are matched whole: the unpickler would otherwise resolve a dotted name such as
    ``os.system`` as an attribute path through any allowed module that imports ``os``. DCP's
    ``BytesStorageMetadata`` is deliberately absent: DCP reads byte entries back with
    ``torch.load(weights_only=False)``, and our checkpoints hold tensors only.
    """

    _ALLOWED = frozenset({
        *(("torch.distributed.checkpoint.metadata", n) for n in (
            "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
            "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"), ("torch.serialization", "_get_layout"), ("torch._utils", "_get_layout"),
        ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("collections", "OrderedDict"),
        *(("torch", n) for n in _DTYPE_NAMES),
    })

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, which is not allowed")


def read_dcp_metadata(path: Path) -> Metadata:
    """DCP's ``.metadata`` file through the allow-list unpickler; CheckpointError naming the file otherwise."""
    try:
        metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
    except Exception as e:  # any failure to unpickle a file we did not vet is the checkpoint's fault
        reason = " ".join(str(e).split()) or type(e).__name__
        raise CheckpointError(f"checkpoint metadata {path} refused: {reason}") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"checkpoint metadata {path} refused: it holds a {type(metadata).__name__}, "
                              "not DCP metadata")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose metadata is read through the allow-list unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_dcp_metadata(Path(self.path) / ".metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _is_coordinator() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _broadcast_json(value: Any) -> Any:
    """Rank 0's JSON-serialisable `value` on every rank (without a process group: `value`)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    nccl = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    payload = json.dumps(value).encode() if dist.get_rank() == 0 else b""
    size = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    dist.broadcast(size, 0)
    buf = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    if dist.get_rank() == 0:
        buf.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    dist.broadcast(buf, 0)
    return json.loads(bytes(buf.cpu().numpy()).decode())


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns that it runs in one process when no process group exists; that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(process group|single process|uninitialized).*")
        yield


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def save_checkpoint(root: str | Path, step: int, tensors: dict[str, Any], state: dict[str, Any],
                    keep_last: Optional[int] = None) -> Path:
    """Write ``root/step_XXXXXXXX`` atomically; every rank calls it (DCP writes each rank's shards).

    The temporary folder has one name every rank knows (``.step_XXXXXXXX.tmp``), since all of them write
    into it; the manifest (llama_pt.atomic) is written last, after every file is fsynced."""
    root = Path(root)
    final = root / checkpoint_name(step)
    tmp = root / f".{checkpoint_name(step)}.tmp"
    if _is_coordinator():
        root.mkdir(parents=True, exist_ok=True)
        for leftover in root.glob(f".{PREFIX}*"):  # of a save or a deletion that was killed
            shutil.rmtree(leftover, ignore_errors=True)
    _barrier()
    with _single_process_quiet():
        dcp.save(tensors, checkpoint_id=tmp)
    _barrier()
    if _is_coordinator():
        (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=1, sort_keys=True))
        files = sorted(p for p in tmp.iterdir() if p.is_file())
        manifest = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
        fsync_tree(tmp)
        write_text_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
        if final.exists():
            remove_checkpoint(final)
        os.replace(tmp, final)
        fsync(root)
        if keep_last:
            for old in list_checkpoints(root)[:-keep_last]:
                remove_checkpoint(old)
    _barrier()
    return final


def remove_checkpoint(path: Path) -> None:
    """Rename out of sight (atomic), then delete: killed half-way, it leaves a hidden folder that the next
    save removes, never a visible partial checkpoint."""
    trash = path.with_name(f".{path.name}.deleting")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete-looking checkpoint folders (renamed from their temporary name), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check every file against MANIFEST.json and vet DCP's metadata; return the trainer state.
    Raises CheckpointError."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: {MANIFEST} is missing")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {path} is corrupt: {MANIFEST} is not valid JSON ({e})") from None
    present = {p.name for p in path.iterdir() if p.is_file()} - {MANIFEST}
    if present != set(manifest):
        diff = sorted(present.symmetric_difference(manifest))
        raise CheckpointError(f"checkpoint {path} is corrupt: files differ from {MANIFEST}: {', '.join(diff)}")
    for name, expected in manifest.items():
        file = path / name
        if file.stat().st_size != expected["bytes"] or _sha256(file) != expected["sha256"]:
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} does not match its checksum")
    read_dcp_metadata(path / ".metadata")
    return json.loads((path / TRAINER_STATE).read_text())


def verified_state(path: Path) -> dict[str, Any]:
    """verify_checkpoint on rank 0; its verdict (trainer state or error) on every rank."""
    verdict = None
    if _is_coordinator():
        try:
            verdict = {"state": verify_checkpoint(path)}
        except CheckpointError as e:
            verdict = {"error": str(e)}
    verdict = _broadcast_json(verdict)
    if "error" in verdict:
        raise CheckpointError(verdict["error"])
    return verdict["state"]


def load_checkpoint(path: str | Path, tensors: dict[str, Any]) -> dict[str, Any]:
    """Verify, then load in place into ``tensors`` (same nesting as saved); return the trainer state.

    Verification happens before a single tensor is touched, so a bad checkpoint is never half-loaded.
    Tensors may be laid out differently from when they were saved (DTensor shards, other ranks): DCP
    reads the overlapping chunks.
    """
    state = verified_state(Path(path))
    load_verified(path, tensors)
    return state


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    """trainer_state.json of a checkpoint the caller has already verified."""
    return json.loads((Path(path) / TRAINER_STATE).read_text())


def load_verified(path: str | Path, tensors: dict[str, Any]) -> None:
    """The tensor load alone, for a checkpoint the caller has just verified (verify_checkpoint)."""
    with _single_process_quiet():
        dcp.load(tensors, storage_reader=SafeFileSystemReader(str(path)))


def latest_valid_checkpoint(root: str | Path, log=print) -> Optional[Path]:
    """Newest checkpoint that verifies; corrupt ones are reported and skipped (decided by rank 0)."""
    found = None
    if _is_coordinator():
        for path in reversed(list_checkpoints(root)):
            try:
                verify_checkpoint(path)
                found = str(path)
                break
            except CheckpointError as e:
                log(f"skipping {e}")
    found = _broadcast_json(found)
    return None if found is None else Path(found)
