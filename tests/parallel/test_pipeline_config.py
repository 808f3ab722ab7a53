"""The pipeline's settings and stage split (torch-free llama_pt.config): one-line refusals naming the field."""
from __future__ import annotations

import pytest

from llama_pt.config import ConfigError, ParallelConfig, TrainConfig, get_preset, validate_layout
from llama_pt.config.layout import validate_pipeline_run
from llama_pt.config.pipeline import chunk_costs, describe_split, stage_layers

TINY4 = get_preset("tiny").__class__(**{**get_preset("tiny").to_dict(), "n_layers": 4})


def counts(split):
    return [len(r) for r in split]


def test_stage_split_covers_every_layer_once_in_order():
    for n in range(1, 13):
        for stages in range(1, n + 1):
            for emb, head in ((1.0, 1.0), (0.0, 0.0), (2.5, 0.5)):
                split = stage_layers(n, stages, emb, head)
                assert len(split) == stages and all(len(r) >= 1 for r in split)
                assert [i for r in split for i in r] == list(range(n))


def test_stage_split_balances_the_embedding_and_head_weights():
    assert counts(stage_layers(4, 2)) == [2, 2]
    assert counts(stage_layers(5, 2)) == [3, 2]              # uneven: costs 4 and 3, earlier chunk larger
    assert counts(stage_layers(6, 4)) == [1, 2, 2, 1]        # the ends carry the embedding and the head
    assert counts(stage_layers(6, 4, 0.0, 0.0)) == [2, 2, 1, 1]
    assert counts(stage_layers(8, 2, 0.0, 4.0)) == [6, 2]    # a heavy head: fewer layers on the last stage
    assert max(chunk_costs(stage_layers(8, 2, 0.0, 4.0), 0.0, 4.0)) == 6
    # The largest cost is the least possible: no other contiguous split of 7 layers on 3 stages does better.
    best = max(chunk_costs(stage_layers(7, 3, 1.5, 1.0), 1.5, 1.0))
    for a in range(1, 6):
        for b in range(1, 7 - a):
            other = [range(0, a), range(a, a + b), range(a + b, 7)]
            assert max(chunk_costs(other, 1.5, 1.0)) >= best
    with pytest.raises(ValueError, match="3 layers cannot fill 4 pipeline chunks"):
        stage_layers(3, 4)


def test_split_is_described_per_stage_with_virtual_chunks():
    assert describe_split(stage_layers(5, 2), 2) == "stage 0: emb + layers 0-2 | stage 1: layers 3-4 + head"
    assert describe_split(stage_layers(4, 4, 0.0, 0.0), 2) == \
        "stage 0: emb + layer 0, layer 2 | stage 1: layer 1, layer 3 + head"


def test_pipeline_fields_are_checked_in_one_line():
    for bad, message in [
        ({"pipeline_parallel": 0}, "parallel.pipeline_parallel=0 must be a positive integer"),
        ({"virtual_stages": 2}, "parallel.virtual_stages=2 needs parallel.pipeline_schedule=interleaved_1f1b"),
        ({"pipeline_schedule": "interleaved_1f1b"}, "parallel.pipeline_schedule=interleaved_1f1b needs "
                                                    "parallel.virtual_stages >= 2"),
        ({"pipeline_schedule": "zb"}, "parallel.pipeline_schedule='zb' is unknown"),
        ({"pipeline_head_layers": -1}, "parallel.pipeline_head_layers=-1 must be a non-negative number"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
            ParallelConfig.from_dict(bad)
        assert "\n" not in str(info.value)


def test_layout_refuses_fewer_layers_than_chunks_and_worlds_pp_does_not_divide():
    tiny = get_preset("tiny")  # 2 layers
    validate_layout(4, ParallelConfig(pipeline_parallel=2, tensor_parallel=2), tiny, 32)
    with pytest.raises(ConfigError, match=r"model.n_layers=2 is fewer than the 4 pipeline chunks"):
        validate_layout(4, ParallelConfig(pipeline_parallel=2, virtual_stages=2,
                                          pipeline_schedule="interleaved_1f1b"), tiny, 32)
    with pytest.raises(ConfigError, match=r"parallel.pipeline_parallel=2 x parallel.tensor_parallel=2 does not "
                                          r"divide the world size 6"):
        validate_layout(6, ParallelConfig(pipeline_parallel=2, tensor_parallel=2), TINY4, 32)


def test_micro_batches_must_fill_the_pipeline():
    train = TrainConfig(seq_len=32, global_batch_tokens=512, micro_batch_size=4, steps=1)
    validate_pipeline_run(ParallelConfig(pipeline_parallel=4, pipeline_schedule="gpipe"), train, 1)
    validate_pipeline_run(ParallelConfig(pipeline_parallel=2), train, 2)
    with pytest.raises(ConfigError, match="parallel.pipeline_schedule=1f1b needs at least "
                                          "parallel.pipeline_parallel=4 micro-batches per data-parallel rank, got 2"):
        validate_pipeline_run(ParallelConfig(pipeline_parallel=4), train, 2)
    with pytest.raises(ConfigError, match=r"interleaved_1f1b needs micro-batches per data-parallel rank \(3\)"):
        validate_pipeline_run(ParallelConfig(pipeline_parallel=2, virtual_stages=2,
                                             pipeline_schedule="interleaved_1f1b"), train, 3)
    with pytest.raises(ConfigError, match="train.sample_tokens=5 is not supported with parallel.pipeline_parallel=2"):
        validate_pipeline_run(ParallelConfig(pipeline_parallel=2), TrainConfig(
            seq_len=32, global_batch_tokens=512, micro_batch_size=4, steps=1, sample_tokens=5), 4)


def test_every_parallel_file_takes_pipeline_overrides():
    from llama_pt.config import compose_config, resolve
    for group in ("single", "tp2", "tp2_sp", "tp8", "pp2", "pp2_tp2"):
        cfg = compose_config([f"parallel={group}", "parallel.pipeline_parallel=2", "model=tiny", "data.manifest=x",
                              "train.eval_every=0", "train.seq_len=32", "train.global_batch_tokens=512",
                              "train.micro_batch_size=4"])
        world = 2 * cfg["parallel"]["tensor_parallel"]
        if group == "tp8":
            continue  # tiny's 4 heads do not split over 8 ranks; the override itself composed
        assert resolve(cfg, world).parallel.pipeline_parallel == 2, group


def test_interleaved_on_two_stages_is_refused_on_nccl_only():
    """At p = 2 interleaved, one direction between the two ranks carries activations and gradients, matched by
    tag; NCCL ignores tags, so that layout is refused on nccl in one line (gloo honours them)."""
    from llama_pt.config import compose_config, resolve
    from llama_pt.config.layout import validate_pipeline_transfers
    common = ["model=tiny", "model.n_layers=4", "data.manifest=x", "train.eval_every=0", "train.seq_len=32",
              "train.global_batch_tokens=512", "train.micro_batch_size=4", "parallel.pipeline_parallel=2"]
    interleaved = resolve(compose_config([*common, "parallel.virtual_stages=2",
                                          "parallel.pipeline_schedule=interleaved_1f1b"]), 2)
    with pytest.raises(ConfigError, match="interleaved_1f1b with parallel.pipeline_parallel=2 is unsupported on nccl"):
        validate_pipeline_transfers(interleaved.parallel, "nccl")
    validate_pipeline_transfers(interleaved.parallel, "gloo")
    validate_pipeline_transfers(resolve(compose_config(common), 2).parallel, "nccl")  # 1F1B: one kind per direction
