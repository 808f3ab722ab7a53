"""Document masking: several documents packed into one row, none of them attending to another.

Llama 3 (Dubey et al. 2024, Sec. 3.2): "We use an attention mask that prevents self-attention between
different documents within the same sequence." A row of a batch holds documents one after another;
`documents[b, i]` says which one token i belongs to, and a new value starts a new document (values need
not be consecutive, only constant within a document's run of tokens). Query i then sees key j exactly
when j <= i and both lie in the same run, and each document's RoPE positions restart at 0 (`positions`).

`DocumentMask` is built once per forward pass from the [b, s] tensor (the full sequence, also under
sequence parallelism) and shared by every layer; it derives, on first use, the forms the kernels take:
- `visible()`   bool [b, 1, s, s]: the block-diagonal causal mask (torch SDPA, the `math` kernel);
- `additive()`  0 / -inf [b, 1, s, s] in the scores' dtype (the CPU flash kernel, the CUDA memory-efficient
                kernel's attention bias), optionally with a key stride aligned to what that kernel needs;
- `lengths()` / `cu_seqlens()`: the documents' lengths over the flattened batch b * s (xformers'
                BlockDiagonalCausalMask, flash attention's variable-length kernel), where no s x s mask exists.
"""
from __future__ import annotations

import torch


class DocumentMask:
    """The packed documents of a batch: `documents` [b, s] integers, one run of equal values per document."""

    def __init__(self, documents: torch.Tensor):
        if documents.dim() != 2:
            raise ValueError(f"documents must be [batch, seq], got shape {list(documents.shape)}")
        self.documents = documents
        b, s = documents.shape
        starts = torch.ones(b, s, dtype=torch.bool, device=documents.device)
        starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
        self.starts = starts  # True at the first token of every document (and of every row)
        self._cache: dict = {}

    @property
    def shape(self) -> torch.Size:
        return self.documents.shape

    def _cached(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    @property
    def positions(self) -> torch.Tensor:
        """[b, s] int64: each token's position within its document (its RoPE position)."""
        def make():
            index = torch.arange(self.shape[1], device=self.documents.device).expand(self.shape)
            first = torch.where(self.starts, index, torch.zeros_like(index)).cummax(dim=1).values
            return index - first
        return self._cached("positions", make)

    def run_ids(self) -> torch.Tensor:
        """[b, s]: the document's number in its row (0, 1, ...), equal exactly within one run."""
        return self._cached("runs", lambda: self.starts.long().cumsum(dim=1))

    def visible(self) -> torch.Tensor:
        """bool [b, 1, s, s]: query i may attend to key j (j <= i, same document)."""
        def make():
            runs = self.run_ids()
            s = self.shape[1]
            causal = torch.ones(s, s, dtype=torch.bool, device=runs.device).tril()
            return ((runs[:, :, None] == runs[:, None, :]) & causal)[:, None]
        return self._cached("visible", make)

    def additive(self, dtype: torch.dtype, key_align: int = 1) -> torch.Tensor:
        """[b, 1, s, s] in `dtype`: 0 where visible, -inf elsewhere. With key_align > 1 the keys' dimension
        is a view of a buffer whose rows are padded to a multiple of key_align elements (an alignment the
        CUDA memory-efficient kernel requires of its attention bias)."""
        def make():
            b, s = self.shape
            width = -(-s // key_align) * key_align
            buffer = torch.zeros(b, 1, s, width, dtype=dtype, device=self.documents.device)
            bias = buffer[..., :s]
            return bias.masked_fill_(~self.visible(), float("-inf"))
        return self._cached(("additive", dtype, key_align), make)

    def lengths(self) -> list[int]:
        """The documents' lengths in order over the flattened batch (row 0's documents, then row 1's, ...)."""
        def make():
            flat = self.starts.reshape(-1)
            first = torch.nonzero(flat).flatten()
            ends = torch.cat([first[1:], first.new_tensor([flat.numel()])])
            return (ends - first).tolist()
        return self._cached("lengths", make)

    def cu_seqlens(self) -> tuple[torch.Tensor, int]:
        """(int32 cumulative lengths [n_documents + 1] on the batch's device, the longest document's length):
        flash attention's variable-length description of the flattened batch."""
        def make():
            lengths = self.lengths()
            cu = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
            return cu.to(self.documents.device), max(lengths)
        return self._cached("cu_seqlens", make)



def document_positions(documents: torch.Tensor) -> torch.Tensor:
    """[b, s] int64: each token's position within its document, 0 at a document's first token (RoPE's)."""
    return DocumentMask(documents).positions
