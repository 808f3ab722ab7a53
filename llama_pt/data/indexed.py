"""Token shards in Megatron-LM's memory-mapped indexed format (`prefix.bin` + `prefix.idx`).

The `.bin` file is the raw token ids of every sequence, back to back, in the dtype named by the index.
The `.idx` file is, all little-endian:

    9 bytes   magic  b"MMIDIDX\\x00\\x00"
    uint64    version (1)
    uint8     dtype code (Megatron's table: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64,
              6 float64, 7 float32, 8 uint16)
    uint64    sequence count  n
    uint64    document count  d (= number of documents + 1)
    int32[n]  sequence lengths (tokens)
    int64[n]  sequence pointers (byte offset of each sequence in .bin)
    int64[d]  document indices: 0, then the sequence index where each document ends

(Megatron's multimodal variant appends int8[n] sequence modes; the reader accepts and ignores them.)
Our writer stores one sequence per document, so documents and sequences coincide. Token ids are
uint16 when the vocabulary has fewer than 65500 entries, else int32 (Megatron's choice).

EOS convention: a document is stored exactly as the tokenization stage emits it, i.e. WITH its
trailing EOS. Nothing downstream adds separators; packing only concatenates documents.
"""
from __future__ import annotations

import mmap
import os
import struct
from array import array
from pathlib import Path
from typing import Sequence, Union

import numpy as np

from ..atomic import fsync, temporary_name

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = len(MAGIC) + 8 + 1 + 8 + 8  # 34
DTYPE_CODES: dict[int, type] = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
                                6: np.float64, 7: np.float32, 8: np.uint16}
_CODE_OF = {np.dtype(t): c for c, t in DTYPE_CODES.items()}

PathLike = Union[str, os.PathLike]


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 for vocabularies under 65500 entries, else int32 (Megatron's rule)."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def bin_path(prefix: PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.bin")


def idx_path(prefix: PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.idx")


class IndexedDatasetWriter:
    """Streams documents into `prefix.bin` and writes `prefix.idx` on finalize.

    Both files are written under temporary names and renamed when complete (.bin first, then .idx),
    so a visible .idx always has its complete .bin. Used as a context manager, it finalizes on a
    clean exit and removes its temporary files if the block raises.
    """

    def __init__(self, prefix: PathLike, vocab_size: int):
        if vocab_size <= 0:
            raise ValueError(f"vocab_size={vocab_size} must be positive")
        self.prefix = Path(prefix)
        self.vocab_size = int(vocab_size)
        self.dtype = token_dtype(vocab_size)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self._bin_tmp = temporary_name(bin_path(prefix))
        self._idx_tmp = temporary_name(idx_path(prefix))
        self._bin = open(self._bin_tmp, "wb")
        self._sizes = array("q")
        self._done = False

    def add_document(self, tokens: Union[Sequence[int], np.ndarray]) -> None:
        """Append one document (its tokens, including the trailing EOS the tokenizer stage added)."""
        if self._done:
            raise ValueError(f"{self.prefix}: writer already finalized")
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ValueError(f"{self.prefix}: document {len(self._sizes)} must be 1-D, got shape {arr.shape}")
        if arr.size:
            if arr.dtype.kind not in "iu":
                raise ValueError(f"{self.prefix}: document {len(self._sizes)} has non-integer dtype {arr.dtype}")
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0 or hi >= self.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(f"{self.prefix}: document {len(self._sizes)} has token id {bad} outside "
                                 f"[0, {self.vocab_size})")
        if arr.size > np.iinfo(np.int32).max:
            raise ValueError(f"{self.prefix}: document {len(self._sizes)} has {arr.size} tokens (int32 limit)")
        self._bin.write(arr.astype(self.dtype, copy=False).tobytes(order="C"))
        self._sizes.append(int(arr.size))

    def finalize(self) -> None:
        """Write the index and publish both files under their final names."""
        if self._done:
            return
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        sizes = np.frombuffer(self._sizes, dtype=np.int64) if self._sizes else np.zeros(0, np.int64)
        pointers = np.zeros(len(sizes), dtype=np.int64)
        if len(sizes):
            pointers[1:] = np.cumsum(sizes[:-1]) * self.dtype.itemsize
        doc_idx = np.arange(len(sizes) + 1, dtype=np.int64)
        with open(self._idx_tmp, "wb") as f:
            f.write(MAGIC)
            f.write(struct.pack("<Q", VERSION))
            f.write(struct.pack("<B", _CODE_OF[self.dtype]))
            f.write(struct.pack("<Q", len(sizes)))
            f.write(struct.pack("<Q", len(doc_idx)))
            f.write(sizes.astype("<i4").tobytes())
            f.write(pointers.astype("<i8").tobytes())
            f.write(doc_idx.astype("<i8").tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(self._bin_tmp, bin_path(self.prefix))
        os.replace(self._idx_tmp, idx_path(self.prefix))
        fsync(self.prefix.parent)
        self._done = True

    def abort(self) -> None:
        """Drop the temporary files; the final names are never touched."""
        if not self._bin.closed:
            self._bin.close()
        for tmp in (self._bin_tmp, self._idx_tmp):
            tmp.unlink(missing_ok=True)
        self._done = True

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


class IndexedDataset:
    """Memory-mapped reader: `len(ds)` documents, `ds[i]` the tokens of document i.

    `.sizes` (int32) and `.pointers` (int64) are the per-sequence arrays of the index, `.doc_idx` the
    document indices, `.dtype` the token dtype, `.tokens` the whole `.bin` as one flat array; all are
    memory maps, so an open dataset holds O(1) memory whatever its size. `doc_start(i)` and
    `doc_length(i)` give one document's extent in `.tokens`; the `.doc_starts`/`.doc_lengths`
    properties compute the arrays of all of them (int64, O(documents) memory) on each access.
    Opening checks the index against itself and the `.bin` size, reading it in chunks of
    `CHECK_CHUNK` sequences. `random_access=True` tells the kernel that `.tokens` is read at scattered
    places, as shuffled training reads it (madvise MADV_RANDOM): a page fault then reads that page
    only, not the read-ahead window (which can be megabytes) after it.
    """

    CHECK_CHUNK = 1 << 20

    def __init__(self, prefix: PathLike, random_access: bool = False):
        self.prefix = Path(prefix)
        self.random_access = random_access
        self._open()

    def _open(self) -> None:
        ipath, bpath = idx_path(self.prefix), bin_path(self.prefix)
        if not ipath.is_file():
            raise FileNotFoundError(f"{ipath}: index file not found")
        if not bpath.is_file():
            raise FileNotFoundError(f"{bpath}: data file not found (its index {ipath.name} exists)")
        idx_bytes = ipath.stat().st_size
        if idx_bytes < HEADER_BYTES:
            raise ValueError(f"{ipath}: truncated index ({idx_bytes} bytes, header needs {HEADER_BYTES})")
        raw = np.memmap(ipath, dtype=np.uint8, mode="r")
        if raw[:len(MAGIC)].tobytes() != MAGIC:
            raise ValueError(f"{ipath}: not a Megatron indexed dataset (bad magic {raw[:9].tobytes()!r})")
        version, code, n, d = struct.unpack_from("<QBQQ", raw, len(MAGIC))
        if version != VERSION:
            raise ValueError(f"{ipath}: unsupported index version {version}")
        if code not in DTYPE_CODES:
            raise ValueError(f"{ipath}: unknown dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        expected = HEADER_BYTES + 12 * n + 8 * d
        if raw.size not in (expected, expected + n):  # + n: Megatron's multimodal sequence modes
            raise ValueError(f"{ipath}: {'truncated' if raw.size < expected else 'corrupt'} index "
                             f"({raw.size} bytes, header announces {n} sequences and {d} document "
                             f"indices = {expected} bytes)")
        off = HEADER_BYTES
        self.sizes = raw[off:off + 4 * n].view("<i4")
        self.pointers = raw[off + 4 * n:off + 12 * n].view("<i8")
        self.doc_idx = raw[off + 12 * n:off + 12 * n + 8 * d].view("<i8")
        total = self._check_sequences(ipath)
        if d < 1 or self.doc_idx[0] != 0 or self.doc_idx[-1] != n or not self._doc_idx_rises():
            raise ValueError(f"{ipath}: corrupt index (document indices must rise from 0 to {n})")
        bin_bytes = bpath.stat().st_size
        if bin_bytes != total * self.dtype.itemsize:
            raise ValueError(f"{bpath}: data file has {bin_bytes} bytes, index {ipath.name} describes "
                             f"{total} tokens = {total * self.dtype.itemsize} bytes")
        self.tokens = self._map_tokens(bpath) if total else np.empty(0, dtype=self.dtype)

    def _map_tokens(self, bpath: Path) -> np.ndarray:
        with open(bpath, "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if self.random_access:
            mapped.madvise(mmap.MADV_RANDOM)
        return np.frombuffer(mapped, dtype=self.dtype)

    def _check_sequences(self, ipath: Path) -> int:
        """Check that the pointers are the running sum of the sizes; return the total token count."""
        total = 0
        for a in range(0, len(self.sizes), self.CHECK_CHUNK):
            sizes = self.sizes[a:a + self.CHECK_CHUNK].astype(np.int64)
            starts = np.cumsum(sizes) - sizes + total
            if sizes.min() < 0 or not np.array_equal(self.pointers[a:a + len(sizes)], starts * self.dtype.itemsize):
                raise ValueError(f"{ipath}: corrupt index (sizes and pointers disagree)")
            total = int(starts[-1] + sizes[-1])
        return total

    def _doc_idx_rises(self) -> bool:
        step = self.CHECK_CHUNK
        return all(not np.any(np.diff(self.doc_idx[a:a + step + 1]) < 0) for a in range(0, len(self.doc_idx), step))

    def _seq_offsets(self, seqs: np.ndarray) -> np.ndarray:
        """Token offset in `.tokens` of each sequence number in `seqs` (the sequence count: the end)."""
        out = np.full(len(seqs), self.num_tokens, dtype=np.int64)
        inside = seqs < len(self.sizes)
        out[inside] = self.pointers[seqs[inside]] // self.dtype.itemsize
        return out

    def _seq_offset(self, k: int) -> int:
        return int(self.pointers[k]) // self.dtype.itemsize if k < len(self.sizes) else self.num_tokens

    def doc_start(self, i: int) -> int:
        """Offset of document i's first token in `.tokens`."""
        return self._seq_offset(int(self.doc_idx[i]))

    def doc_length(self, i: int) -> int:
        """Number of tokens of document i."""
        return self._seq_offset(int(self.doc_idx[i + 1])) - self.doc_start(i)

    @property
    def doc_starts(self) -> np.ndarray:
        return self._seq_offsets(self.doc_idx[:-1])

    @property
    def doc_lengths(self) -> np.ndarray:
        return self._seq_offsets(self.doc_idx[1:]) - self.doc_starts

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.size)

    def __len__(self) -> int:
        return len(self.doc_idx) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"document {i} out of range for {self.prefix} ({len(self)} documents)")
        i = int(i) % len(self)
        start = self.doc_start(i)
        return self.tokens[start:start + self.doc_length(i)]

    def __getstate__(self) -> dict:
        return {"prefix": self.prefix, "random_access": self.random_access}  # maps are reopened (loader workers)

    def __setstate__(self, state: dict) -> None:
        self.prefix, self.random_access = state["prefix"], state["random_access"]
        self._open()
