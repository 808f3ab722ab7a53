"""Activation modes: which block implementation each layer runs (config key `model.activation`).

- ``none``       TransformerBlock, plain autograd: every intermediate an op needs for its backward is kept.
- ``selective``  SelectiveBlock (.selective, Touvron et al. 2023, Sec. 2.4): the hand-written layer keeps
                 the layer input, the outputs of the linear layers, the attention output and its
                 log-sum-exp, and the residual sum; norms and the SwiGLU product are recomputed. It
                 computes the LoRA updates of adapted projections itself (keeping u and dropout masks).
- ``full``       CheckpointedBlock (.checkpointed): only the layer input is kept.

`apply_activation_mode` replaces every layer of the model by a block of the chosen class built from the
same four parts (the parameters are untouched, so it can be switched back). docs/activation_memory.md
gives the bytes each mode keeps per layer; .memory computes them. Call it after the attention backend is
chosen and after `llama_pt.parallel.parallelize`, with the same ParallelState: the hand-written layer
issues the tensor-parallel collectives itself and takes the TP group and settings from it.
"""
from __future__ import annotations

from typing import Optional

from ..config import ACTIVATION_MODES
from ..config.sections import check_choice
from ..model.llama import Llama, TransformerBlock
from ..parallel import ColumnParallelLinear, ParallelState, tp_context
from .checkpointed import CheckpointedBlock
from .selective import SelectiveBlock

BLOCKS = {"none": TransformerBlock, "selective": SelectiveBlock, "full": CheckpointedBlock}
assert tuple(BLOCKS) == ACTIVATION_MODES


def apply_activation_mode(model: Llama, mode: str, pstate: Optional[ParallelState] = None) -> Llama:
    """Make every layer of `model` a block of activation mode `mode`, in place; return the model.

    `model` is a Llama or a pipeline stage (its layers keyed by their global index). With a TP size above
    one (pstate) the model must already be parallelized."""
    check_choice(mode, ACTIVATION_MODES, "model.activation")
    tp = None
    if pstate is not None and pstate.tp_size > 1:
        if not isinstance(next(iter(model.layers.children())).attention.wq, ColumnParallelLinear):
            raise ValueError("apply_activation_mode: the model is not parallelized; call parallelize(model, pstate) first")
        tp = tp_context(pstate)
    for key, layer in list(model.layers.named_children()):
        setattr(model.layers, key, SelectiveBlock(*layer.parts(), tp=tp) if mode == "selective"
                else BLOCKS[mode](*layer.parts()))
    return model
