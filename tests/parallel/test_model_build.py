"""build_model materializes only what a rank keeps, and the initial values do not depend on the layout.

One process: the layouts are ParallelState objects made by hand (their ranks set, no process groups), which is
all that building a rank's model reads; the values are compared with one process's
`torch.manual_seed(seed); Llama(cfg)` (and its adapters), sliced as the TP plan slices them. The memory test
counts every byte given storage during the build of a middle pipeline stage of a model whose embedding and
head dwarf its layers, and records which parameters ever got an initial value.
"""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from llama_pt.adapters.apply import apply_peft
from llama_pt.config import ModelConfig, ParallelConfig, PeftConfig
from llama_pt.model import Llama
from llama_pt.model import llama as llama_module
from llama_pt.parallel import ParallelState
from llama_pt.parallel.pipeline.stages import stage_split
from llama_pt.train import model_setup
from llama_pt.train.model_setup import build_model

CFG = ModelConfig(dim=64, n_heads=4, n_kv_heads=2, n_layers=4, vocab_size=500, multiple_of=32, max_seq_len=64)
SEED = 1234


def layout(tp: int = 1, pp: int = 1, tp_rank: int = 0, pp_rank: int = 0, virtual: int = 1,
           cfg: ModelConfig = CFG, sequence_parallel: bool = False) -> ParallelState:
    """The ParallelState of rank (tp_rank, pp_rank) of a TP x PP layout, without process groups."""
    parallel = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, virtual_stages=virtual,
                              sequence_parallel=sequence_parallel,
                              pipeline_schedule="interleaved_1f1b" if virtual > 1 else "1f1b").validate()
    p = ParallelState.__new__(ParallelState)
    p.timeout, p.config, p.model_config, p.seq_len = None, parallel, cfg, 32
    p.world_size, p.rank = tp * pp, pp_rank * tp + tp_rank
    p.tp_size, p.dp_size, p.pp_size = tp, 1, pp
    p.tp_rank, p.dp_rank, p.pp_rank = tp_rank, 0, pp_rank
    p.kv_replicas = max(1, tp // cfg.kv_heads)
    p.tp_group = p.dp_group = p.pp_group = p.model_parallel_group = p.kv_replica_group = None
    return p


def run_config(cfg: ModelConfig = CFG, activation: str = "none", peft: PeftConfig = PeftConfig()):
    """What build_model reads of a RunConfig."""
    train = SimpleNamespace(seed=SEED, init_from=None, init_tokenizer=None)
    return SimpleNamespace(model=cfg, attention="sdpa", activation=activation, train=train, peft=peft)


def one_process(peft: PeftConfig = PeftConfig()) -> dict[str, torch.Tensor]:
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        model = apply_peft(Llama(CFG), peft)
    return {k: v.detach() for k, v in model.state_dict().items()}


def expected_slice(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    spec = getattr(param, "tp_shard", None)
    return full if spec is None else spec.take(full)


LAYOUTS = [(1, 1, 1), (2, 1, 1), (4, 1, 1), (1, 2, 1), (2, 2, 1), (1, 2, 2), (4, 2, 1)]


@pytest.mark.parametrize("activation", ["none", "selective"])
@pytest.mark.parametrize("tp,pp,virtual", LAYOUTS)
def test_initial_weights_are_one_process_slices(tp, pp, virtual, activation):
    ref = one_process()
    seen = set()
    for pp_rank in range(pp):
        for tp_rank in range(tp):
            model = build_model(run_config(activation=activation), layout(tp, pp, tp_rank, pp_rank, virtual),
                                torch.device("cpu"))
            params = dict(model.named_parameters())
            for name, value in model.state_dict().items():
                assert torch.equal(value, expected_slice(ref[name], params[name])), (tp, pp, tp_rank, pp_rank, name)
                seen.add(name)
            assert torch.equal(model.rope_cos, Llama(CFG, seed=0).rope_cos)
    assert seen == set(ref)  # every parameter is on some rank


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_adapters_are_one_process_slices(tp, pp):
    peft = PeftConfig(method="lora", rank=4, targets=("wq", "wk", "wo", "w2"), modules_to_save=("output",))
    ref = one_process(peft)
    assert any(name.endswith("lora_A") and value.abs().sum() > 0 for name, value in ref.items())
    seen = set()
    for pp_rank in range(pp):
        for tp_rank in range(tp):
            model = build_model(run_config(peft=peft), layout(tp, pp, tp_rank, pp_rank), torch.device("cpu"))
            params = dict(model.named_parameters())
            for name, value in model.state_dict().items():
                assert torch.equal(value, expected_slice(ref[name], params[name])), (tp, pp, name)
                seen.add(name)
            trained = {n for n, p in params.items() if p.requires_grad}
            assert trained == {n for n in params if ".adapter." in n or n == "output.weight"}
    assert seen == set(ref)


def test_one_process_build_is_llama_of_the_seed():
    """build_model at TP = PP = 1 is `torch.manual_seed(seed); Llama(cfg)`, and leaves the same random state."""
    torch.manual_seed(SEED)
    ref = Llama(CFG)
    after_ref = torch.get_rng_state()
    model = build_model(run_config(), layout(), torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), after_ref)
    assert model.state_dict().keys() == ref.state_dict().keys()
    for name, value in ref.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


def test_initial_values_follow_the_rule():
    """Norms one, padding rows zero, the residual outputs scaled; two seeds give two models."""
    a, b = Llama(CFG, seed=1).state_dict(), Llama(CFG, seed=2).state_dict()
    assert torch.equal(a["layers.0.attention_norm.weight"], torch.ones(CFG.dim))
    for name in ("tok_embeddings.weight", "output.weight"):
        assert a[name][CFG.vocab_size:].abs().sum() == 0 and a[name][:CFG.vocab_size].abs().sum() > 0
    std_in = a["layers.0.attention.wq.weight"].std().item()
    std_out = a["layers.0.attention.wo.weight"].std().item()
    assert abs(std_in - CFG.init_std) < 0.1 * CFG.init_std
    assert abs(std_out - CFG.init_std / (2 * CFG.n_layers) ** 0.5) < 0.1 * CFG.init_std
    assert not torch.equal(a["layers.0.attention.wq.weight"], b["layers.0.attention.wq.weight"])
    assert not torch.equal(a["layers.0.attention.wq.weight"], a["layers.1.attention.wq.weight"])


class StorageBytes(TorchDispatchMode):
    """Bytes of every new storage an op returns off the meta device (an upper bound of what was allocated)."""

    def __init__(self):
        super().__init__()
        self.total, self.largest = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.untyped_storage().data_ptr() not in inputs:
                self.total += t.untyped_storage().nbytes()
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def test_a_stage_never_materializes_the_rest(monkeypatch):
    """Stage 1 of 4 (a few of eight layers, no embedding or head) of a model whose embedding and head are ~90% of
    it, at TP=2: only its own parameters ever get initial values, and everything given storage during the
    build adds up to a small fraction of the full model (one full layer at a time, then its shards)."""
    cfg = dataclasses.replace(CFG, n_layers=8, vocab_size=32000)
    full_bytes = sum(p.numel() * 4 for p in Llama(cfg, seed=0).parameters())
    layer_bytes = sum(p.numel() * 4 for p in Llama(cfg, seed=0).layers[0].parameters())
    initialised = []
    rule = llama_module.initial_value

    def recording(name, *args, **kwargs):
        initialised.append(name)
        return rule(name, *args, **kwargs)

    monkeypatch.setattr(llama_module, "initial_value", recording)
    counter = StorageBytes()
    pstate = layout(tp=2, pp=4, tp_rank=1, pp_rank=1, cfg=cfg)
    with counter:
        model = build_model(run_config(cfg), pstate, torch.device("cpu"))
    kept = [name for name, _ in model.named_parameters()]
    assert sorted(initialised) == sorted(kept)
    layers = {str(i) for i in stage_split(pstate)[1]}
    assert 0 < len(layers) <= 3 and {name.split(".")[1] for name in kept if name.startswith("layers.")} == layers
    assert model.tok_embeddings is None and model.output is None
    # the stage's layers, each made in full (values drawn on the CPU, copied in) and then sliced: a few
    # copies of its layers, against the full model's 4M parameters
    assert counter.total < 4 * len(layers) * layer_bytes + 64 * 1024, (counter.total, layer_bytes)
    assert counter.total < 0.1 * full_bytes
    assert counter.largest <= max(p.numel() * 4 for p in Llama(cfg, seed=0).layers[0].parameters())


def test_kept_parts_in_order():
    model = build_model(run_config(), layout(pp=2, pp_rank=1), torch.device("cpu"))
    assert model_setup.kept_parts(model) == ["layers.2", "layers.3", "norm", "output"]
    with torch.device("meta"):
        whole = Llama(CFG)
    assert model_setup.kept_parts(whole) == ["tok_embeddings", "layers.0", "layers.1", "layers.2", "layers.3",
                                              "norm", "output"]


HF_CFG = dataclasses.replace(CFG, vocab_size=512, max_seq_len=256)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, tokenizer_512):
    """A random model (norm weights too) with the 512-piece tokenizer, as a sharded Hugging Face folder."""
    from llama_pt.hf_interop import export_hf
    model = Llama(HF_CFG, seed=7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return export_hf(model, HF_CFG, tmp_path_factory.mktemp("hf") / "base", tokenizer_path=tokenizer_512,
                     max_shard_bytes=200_000)


@pytest.fixture(scope="module")
def grown_tokenizer(tmp_path_factory, tokenizer_512):
    from sentencepiece import sentencepiece_model_pb2
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tokenizer_512.read_bytes())
    for piece in ["▁sublicensable", "▁llama", "ingly", "▁中国"]:
        added = proto.pieces.add()
        added.piece, added.score = piece, 0.0
    out = tmp_path_factory.mktemp("tok") / "grown.model"
    out.write_bytes(proto.SerializeToString())
    return out


@pytest.mark.parametrize("grow", [False, True])
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)])
def test_init_from_loads_only_the_kept_tensors(tp, pp, grow, hf_folder, grown_tokenizer, monkeypatch):
    """train.init_from (and init_tokenizer): every rank's shards are the one-process model's slices, and a rank
    reads from the safetensors files only the tensors of the parameters it keeps."""
    from llama_pt import hf_interop
    cfg = dataclasses.replace(HF_CFG, vocab_size=516) if grow else HF_CFG
    run = run_config(cfg)
    run.train.init_from = str(hf_folder)
    run.train.init_tokenizer = str(grown_tokenizer) if grow else None
    ref = build_model(run, layout(cfg=cfg), torch.device("cpu")).state_dict()
    read, load = [], hf_interop._load_safetensors

    def recording(path, wanted=None):
        tensors = load(path, wanted)
        read.extend(tensors)
        return tensors

    monkeypatch.setattr(hf_interop, "_load_safetensors", recording)
    assert len(list(hf_folder.glob("*.safetensors"))) > 2  # several files: some ranks need only some of them
    for pp_rank in range(pp):
        for tp_rank in range(tp):
            read.clear()
            model = build_model(run, layout(tp, pp, tp_rank, pp_rank, cfg=cfg), torch.device("cpu"))
            params = dict(model.named_parameters())
            for name, value in model.state_dict().items():
                assert torch.equal(value, expected_slice(ref[name], params[name])), (tp, pp, name)
            kept = set(model.state_dict())
            assert sorted(hf_interop.from_hf_name(n) for n in read) == sorted(kept)
    if grow:  # the grown rows are not zero (subtoken_mean), the padding rows are
        assert ref["output.weight"][512:516].abs().sum() > 0 and ref["output.weight"][516:].abs().sum() == 0
