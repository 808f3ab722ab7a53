"""One-process checks: layout validation, config files, the world-size-1 ParallelState, DeepSpeed's view of it."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from llama_pt.model import ConfigError, Llama, ModelConfig
from llama_pt.parallel import (COMM_COUNTER, ParallelState, ShardSpec, full_state_dict,
                               load_full_state_dict, make_loss_fn, parallelize)
from llama_pt.parallel import resolve_comm_backend as resolve_backend
from llama_pt.config import ParallelConfig, validate_layout

REPO = Path(__file__).resolve().parents[2]
TINY = ModelConfig(dim=64, n_heads=4, n_kv_heads=2, n_layers=2, vocab_size=512, multiple_of=32, max_seq_len=64)


def _cfg(**kw) -> ModelConfig:
    return ModelConfig(**{**TINY.to_dict(), **kw})


@pytest.mark.parametrize("world, t, model, seq, sp, field", [
    (6, 4, TINY, 16, False, "world size 6"),
    (8, 8, _cfg(dim=60, n_heads=6, n_kv_heads=6), 16, False, "model.dim=60"),
    (8, 8, _cfg(dim=96, n_heads=4, n_kv_heads=4), 16, False, "model.n_heads=4"),
    (4, 4, _cfg(dim=96, n_heads=12, n_kv_heads=6), 16, False, "model.n_kv_heads=6"),
    (4, 4, _cfg(dim=96, n_heads=12, n_kv_heads=3), 16, False, "not a multiple of model.n_kv_heads=3"),
    (4, 4, _cfg(multiple_of=2, dim=64), 16, False, "model.ffn_hidden_dim=170"),
    (2, 2, _cfg(vocab_size=511, vocab_multiple=1), 16, False, "model.vocab_size=511 padded to a multiple of "
                                                              "model.vocab_multiple=1"),
    (2, 2, TINY, 15, True, "seq_len=15"),
])
def test_layout_errors_name_the_field(world, t, model, seq, sp, field):
    with pytest.raises(ConfigError, match=field.replace("(", r"\(")) as err:
        validate_layout(world, ParallelConfig(tensor_parallel=t, sequence_parallel=sp), model, seq)
    assert "\n" not in str(err.value)


def test_valid_layouts_pass():
    validate_layout(2, ParallelConfig(tensor_parallel=2), TINY, 15)  # odd seq_len is fine without SP
    validate_layout(8, ParallelConfig(tensor_parallel=4, sequence_parallel=True), _cfg(n_kv_heads=1), 16)
    validate_layout(2, ParallelConfig(tensor_parallel=2), _cfg(vocab_size=511), 16)  # padded to 512


def test_parallel_config_files_and_bad_values():
    files = sorted((REPO / "configs" / "parallel").glob("*.yaml"))
    assert {"single.yaml", "tp2.yaml", "tp2_sp.yaml"} <= {f.name for f in files}
    for f in files:
        cfg = ParallelConfig.from_dict(yaml.safe_load(f.read_text()))
        assert set(cfg.to_dict()) == {"tensor_parallel", "sequence_parallel", "overlap", "zero_stage", "backend",
                                      "bucket_size", "pipeline_parallel", "virtual_stages", "pipeline_schedule",
                                      "pipeline_embedding_layers", "pipeline_head_layers"}
    assert ParallelConfig.from_dict(yaml.safe_load((REPO / "configs/parallel/tp2_sp.yaml").read_text())) == \
        ParallelConfig(tensor_parallel=2, sequence_parallel=True, overlap=True, zero_stage=0, backend="auto",
                       bucket_size=500_000_000)
    for bad, field in [({"tensor_paralel": 2}, "parallel.tensor_paralel"), ({"zero_stage": 3}, "parallel.zero_stage"),
                       ({"backend": "mpi"}, "parallel.backend"), ({"tensor_parallel": 0}, "parallel.tensor_parallel"),
                       ({"overlap": "yes"}, "parallel.overlap"),
                       ({"tensor_parallel": True}, "parallel.tensor_parallel"),
                       ({"bucket_size": 3}, "parallel.bucket_size")]:
        with pytest.raises(ConfigError, match=field):
            ParallelConfig.from_dict(bad)
    assert resolve_backend("auto", torch.device("cpu")) == "gloo"
    assert resolve_backend("auto", torch.device("cuda")) == "nccl"
    with pytest.raises(ConfigError, match="parallel.backend=nccl"):
        resolve_backend("nccl", torch.device("cpu"))


def test_single_process_state_is_a_deepspeed_mpu_and_parallelize_is_a_no_op():
    from deepspeed.utils import bwc

    pstate = ParallelState.single(TINY, 16)
    assert (pstate.tp_size, pstate.dp_size, pstate.tp_rank, pstate.dp_rank) == (1, 1, 0, 0)
    assert pstate.tp_group is None and pstate.dp_group is None
    assert bwc.bwc_tensor_model_parallel_rank(pstate) == 0
    assert bwc.bwc_tensor_model_parallel_world_size(pstate) == 1
    assert bwc.bwc_tensor_model_parallel_group(pstate) is None
    assert bwc.bwc_pipeline_parallel_world_size(pstate) == 1
    assert pstate.get_data_parallel_world_size() == 1 and pstate.get_data_parallel_group_ranks() == [0]
    assert pstate.get_tensor_model_parallel_src_rank() == 0
    assert not hasattr(pstate, "get_sequence_parallel_world_size")  # would make DeepSpeed divide the DP world

    torch.manual_seed(0)
    model = Llama(TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert parallelize(model, pstate, sequence_parallel=True, overlap=True) is model
    assert type(model.layers[0].attention).__name__ == "Attention"
    tokens = torch.randint(0, 512, (2, 17))
    COMM_COUNTER.reset()
    logits = model(tokens[:, :-1])
    loss = make_loss_fn(pstate)(logits, tokens[:, 1:])
    assert torch.equal(loss, F.cross_entropy(logits.reshape(-1, 512), tokens[:, 1:].reshape(-1)))
    assert COMM_COUNTER.summary() == {}
    full = full_state_dict(model, pstate)
    assert all(torch.equal(full[k], v) for k, v in before.items())
    load_full_state_dict(model, full)
    with pytest.raises(ValueError, match="'output.weight' has shape"):
        load_full_state_dict(model, {**full, "output.weight": torch.zeros(3, 64)})
    with pytest.raises(ValueError, match="lacks key 'norm.weight'"):
        load_full_state_dict(model, {k: v for k, v in full.items() if k != "norm.weight"})
    with pytest.raises(ConfigError, match="differs"):
        parallelize(Llama(_cfg(n_layers=1)), pstate)


def test_the_loss_leaves_the_padded_vocabulary_out():
    """Vocabulary 1000 padded to 1024: the loss is F.cross_entropy over the first 1000 logits, however large
    the padding logits are, and the padding rows get no gradient."""
    cfg = _cfg(vocab_size=1000)
    pstate = ParallelState(ParallelConfig(), cfg, 16)
    torch.manual_seed(0)
    model = Llama(cfg)
    tokens = torch.randint(0, 1000, (2, 17))
    logits = model(tokens[:, :-1])
    assert logits.shape[-1] == 1024
    huge = logits + 1e4 * (torch.arange(1024) >= 1000)  # the first 1000 columns unchanged (+ 0.0)
    loss = make_loss_fn(pstate)(huge, tokens[:, 1:])
    want = F.cross_entropy(logits[..., :1000].reshape(-1, 1000), tokens[:, 1:].reshape(-1))
    assert torch.equal(loss, want)
    loss.backward()
    assert torch.count_nonzero(model.output.weight.grad[1000:]) == 0
    assert torch.count_nonzero(model.tok_embeddings.weight.grad[1000:]) == 0
    assert torch.count_nonzero(model.output.weight.grad[:1000]) > 0


def test_shard_spec_takes_whole_chunks():
    full = torch.arange(24).view(6, 4)
    assert torch.equal(ShardSpec(0, 3, 1).take(full), full[2:4])
    assert torch.equal(ShardSpec(1, 2, 1).take(full), full[:, 2:])
    with pytest.raises(ValueError, match="does not split into 4"):
        ShardSpec(0, 4, 0).take(full)
