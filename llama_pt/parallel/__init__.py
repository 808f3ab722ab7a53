"""Tensor + sequence parallelism (Megatron-style, Korthikanti et al. 2022) applied from outside the model
by a declared plan (.tensor_parallel), and data parallelism (all-reduce, or DeepSpeed ZeRO in .zero,
imported on demand)."""
from .checkpoint_layout import CheckpointLayout
from .comm import COUNTER as COMM_COUNTER
from .comm_trace import Collective, summarize, trace_collectives
from .cross_entropy import vocab_parallel_cross_entropy
from .data_parallel import PlainDataParallel, clip_by_global_norm, global_grad_norm, init_adamw_state
from .layers import ColumnParallelLinear, RowParallelLinear, ShardSpec, TPContext, VocabParallelEmbedding
from .state import ParallelState, resolve_comm_backend
from .tensor_parallel import (FullLogits, TensorParallelAttention, TensorParallelFeedForward, full_gradients,
                              full_state_dict, gather_logits, gather_shards, load_full_state_dict, make_loss_fn,
                              parallelize, tensor_parallel_plan, tp_context)
from .timeline import record_timeline, write_chrome_trace

__all__ = ["COMM_COUNTER", "CheckpointLayout", "Collective", "ColumnParallelLinear", "FullLogits", "ParallelState",
           "PlainDataParallel", "RowParallelLinear", "ShardSpec", "TPContext", "TensorParallelAttention",
           "TensorParallelFeedForward", "VocabParallelEmbedding", "clip_by_global_norm", "full_gradients",
           "full_state_dict", "gather_logits", "gather_shards", "global_grad_norm", "init_adamw_state",
           "load_full_state_dict", "make_loss_fn", "parallelize", "record_timeline", "resolve_comm_backend",
           "summarize", "tensor_parallel_plan", "tp_context", "trace_collectives", "vocab_parallel_cross_entropy",
           "write_chrome_trace"]
