"""A contiguous range of a flattened tensor, saved and loaded by torch.distributed.checkpoint as rectangles.

DeepSpeed ZeRO stage 1 and 2 (zero.py) keeps the fp32 master weights and Adam moments of a parameter
group as ONE flat buffer cut into equal DP partitions; a parameter's share in this rank's partition
is a contiguous range ``[start, start + numel)`` of the parameter flattened in row-major order. In
the parameter's 2-D shape (rows x cols) that range is up to three rectangles, each a contiguous piece
of the range, hence a view of DeepSpeed's storage:

               cols
    ┌──────────────────────┐
    │          ████████████│  partial first row  (row r0, columns c0 .. cols)
    │██████████████████████│  full middle rows   (rows r0 + 1 .. r1 - 1)
    │██████████████████████│
    │██████                │  partial last row   (row r1, columns 0 .. c1)
    └──────────────────────┘
    start = r0 * cols + c0,  start + numel = r1 * cols + c1

(A 1-D parameter's range is one 1-D chunk.) `FragmentTensor` stands for a whole global tensor in the
state dict handed to DCP and holds this rank's rectangles as views, each with its offsets in the
global tensor. It implements the protocol DCP's default planners use for DTensor
(torch.distributed._checkpointable: ``__create_write_items__``, ``__create_chunk_list__``,
``__get_tensor_shard__``): DCP saves each rectangle as one chunk of the global tensor and, on load,
reads into each view, in place, whatever saved chunks overlap it. Every rank's chunk list reaches the
coordinator in DCP's own plan exchange, so no other communication is needed. (ShardedTensor, the
older way to hand DCP several chunks per rank, must be built with every rank's chunks on every rank,
and rejects overlapping chunks, which ranks that read the same replicated values have on load.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType


@dataclass(frozen=True)
class FlatFragment:
    """Elements ``[start, start + values.numel())`` of a tensor flattened in row-major order; `values` is
    1-D (a view of the storage that holds them; empty when this rank holds none of the tensor)."""
    start: int
    values: torch.Tensor


Rectangle = tuple[tuple[int, ...], tuple[int, ...]]  # (offsets, sizes)


def flat_range_rectangles(shape: Sequence[int], start: int, numel: int) -> list[Rectangle]:
    """(offsets, sizes) of the rectangles of a 1-D or 2-D tensor of `shape` that cover the elements
    ``[start, start + numel)`` of its row-major flattening, in that order (none when numel is 0)."""
    if start < 0 or numel < 0 or start + numel > math.prod(shape):
        raise ValueError(f"range [{start}, {start + numel}) is not inside a tensor of shape {tuple(shape)}")
    if numel == 0:
        return []
    if len(shape) == 1:
        return [((start,), (numel,))]
    if len(shape) != 2:
        raise ValueError(f"flat ranges of {len(shape)}-D tensors are not supported (1-D and 2-D are)")
    cols = shape[1]
    (r0, c0), (r1, c1) = divmod(start, cols), divmod(start + numel, cols)
    if r0 == r1:
        return [((r0, c0), (1, c1 - c0))]
    rectangles = []
    if c0:
        rectangles.append(((r0, c0), (1, cols - c0)))
        r0 += 1
    if r1 > r0:
        rectangles.append(((r0, 0), (r1 - r0, cols)))
    if c1:
        rectangles.append(((r1, 0), (1, c1)))
    return rectangles


class FragmentTensor(torch.Tensor):
    """A global tensor of which this rank holds `chunks` [(global offsets, view)] for DCP to save from
    (when `writes`: the one rank, of those holding the same values, that saves them) and load into.

    A wrapper tensor without storage: it has the global size, dtype and device, and no operations.
    """

    _chunks: list[tuple[torch.Size, torch.Tensor]]
    _writes: bool

    @staticmethod
    def __new__(cls, size: Sequence[int], chunks: list[tuple[Sequence[int], torch.Tensor]], *,
                dtype: torch.dtype, device: torch.device, writes: bool) -> "FragmentTensor":
        for offsets, view in chunks:
            if view.dtype != dtype or view.device != device or len(offsets) != len(size) or not \
                    all(0 <= o and o + n <= s for o, n, s in zip(offsets, view.shape, size)):
                raise ValueError(f"chunk at {tuple(offsets)} ({tuple(view.shape)} {view.dtype}) does not fit a "
                                 f"{dtype} tensor of size {tuple(size)}")
        self = torch.Tensor._make_wrapper_subclass(cls, torch.Size(size), dtype=dtype, device=device)
        self._chunks = [(torch.Size(offsets), view) for offsets, view in chunks]
        self._writes = writes
        return self

    @classmethod
    def from_flat(cls, fragment: FlatFragment, shape: Sequence[int], size: Sequence[int],
                  offsets: Sequence[int], writes: bool) -> "FragmentTensor":
        """`fragment` of a tensor of `shape` that sits at `offsets` in the global tensor of `size`."""
        chunks, position = [], 0
        for local, sizes in flat_range_rectangles(shape, fragment.start, fragment.values.numel()):
            numel = math.prod(sizes)
            chunks.append((tuple(a + b for a, b in zip(local, offsets)),
                           fragment.values[position:position + numel].view(sizes)))
            position += numel
        return cls(size, chunks, dtype=fragment.values.dtype, device=fragment.values.device, writes=writes)

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        raise TypeError(f"FragmentTensor only describes checkpoint chunks; {func} is not defined on it")

    def __repr__(self) -> str:  # type: ignore[override]
        chunks = ", ".join(f"{tuple(o)}+{tuple(v.shape)}" for o, v in self._chunks)
        return f"FragmentTensor(size={tuple(self.shape)}, {self.dtype}, writes={self._writes}, chunks=[{chunks}])"

    # ---- torch.distributed.checkpoint's protocol (torch.distributed._checkpointable) ----------------
    def __create_write_items__(self, fqn: str, object: Any) -> list[WriteItem]:
        if not self._writes:
            return []
        return [WriteItem(index=MetadataIndex(fqn, offsets), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(offsets, view.shape),
                                                      properties=TensorProperties.create_from_tensor(view),
                                                      size=self.shape))
                for offsets, view in self._chunks]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(offsets, view.shape) for offsets, view in self._chunks]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        for offsets, view in self._chunks:
            if offsets == index.offset:
                return view
        raise ValueError(f"{index.fqn}: this rank holds no chunk at offset {tuple(index.offset or ())}")
