"""FLOPs per token, the GPU peak table, MFU, precision choice and what tokens/s covers."""
import json

import pytest
import torch

from support import make_config
from llama_pt.model import ConfigError, flops_per_token, get_preset
from llama_pt.plan.hardware import DENSE_BF16_PEAKS, GPUS, device_peak, gpu_from_device_name
from llama_pt.train import metrics, precision
from llama_pt.train.metrics import mfu, peak_flops


def test_flops_per_token_of_llama1_7b_worked_out_by_hand():
    """LLaMA-7B (dim 4096, 32 layers, 32000 tokens, FFN 11008) at 2048 tokens of context.

    Per layer: attention 4 * 4096^2 = 67,108,864; SwiGLU 3 * 4096 * 11008 = 135,266,304; two RMSNorm
    weights 8,192: 202,383,360. 32 layers: 6,476,267,520; final norm 4,096; output head
    4096 * 32000 = 131,072,000. N (every parameter but the embedding lookup) = 6,607,343,616.
    6N = 39,644,061,696. Attention (QK^T and AV, 2 matmuls x 2 FLOPs x 3 for forward+backward):
    12 * 32 layers * 4096 * 2048 = 3,221,225,472. Total: 42,865,287,168 FLOPs per token.
    """
    assert flops_per_token(get_preset("llama1_7b"), 2048) == 42_865_287_168


def test_mfu_of_the_llama_paper_run_worked_out_by_hand():
    """LLaMA-65B: 380 tokens/s/GPU on A100s (paper, Sec. 2.4). N = 65,285,660,672 - 32000 * 8192 =
    65,023,516,672; 6N = 390,141,100,032; attention 12 * 80 * 8192 * 2048 = 16,106,127,360;
    406,247,227,392 FLOPs/token x 380 = 1.54374e17 FLOP/s over 312e12: 49.479%."""
    a100 = device_peak("NVIDIA A100-SXM4-80GB").dense_bf16_flops
    assert mfu(380, flops_per_token(get_preset("llama1_65b"), 2048), 1, a100) == pytest.approx(0.49479, abs=1e-5)
    assert mfu(1000.0, 1e9, 2, None) is None
    assert peak_flops(torch.device("cpu")) is None


# Every device name in the table with the dense bf16 TFLOP/s its data sheet gives (sparse / 2).
EXPECTED_TFLOPS = {
    "NVIDIA H100 80GB HBM3": 989, "NVIDIA H100 PCIe": 756, "NVIDIA H100 NVL": 835,
    "NVIDIA H200": 989, "NVIDIA H200 NVL": 835,
    "NVIDIA A100-SXM4-80GB": 312, "NVIDIA A100-SXM4-40GB": 312, "NVIDIA A100 80GB PCIe": 312,
    "NVIDIA A100-PCIE-40GB": 312,
    "NVIDIA L40S": 362.05, "NVIDIA L40": 181.05, "NVIDIA L4": 121, "NVIDIA A10": 125,
}


def test_every_listed_device_name_has_its_data_sheet_peak():
    listed = {name for p in DENSE_BF16_PEAKS for name in p.device_names}
    assert listed == set(EXPECTED_TFLOPS)
    for name, tflops in EXPECTED_TFLOPS.items():
        assert device_peak(name).dense_bf16_flops == pytest.approx(tflops * 1e12, rel=1e-12), name
    assert all("data sheet" in p.source for p in DENSE_BF16_PEAKS)


@pytest.mark.parametrize("name", ["NVIDIA H100", "NVIDIA L40 SXM", "NVIDIA A10G", "Tesla V100-SXM2-32GB",
                                  "NVIDIA GeForce RTX 4090", "H100"])
def test_names_not_in_the_table_have_no_peak(name):
    """Exact names only: no prefix or substring match (an unknown H100 variant is not guessed to be SXM)."""
    assert device_peak(name) is None
    assert gpu_from_device_name(name, 80 << 30).peak_flops is None


def test_planner_gpus_use_the_same_table():
    for gpu in GPUS.values():
        for name in gpu.device_names:
            peak = device_peak(name)
            assert gpu.peak_flops == (peak.dense_bf16_flops if peak else None), name
            assert gpu_from_device_name(name, 1 << 30).key == gpu.key
    assert gpu_from_device_name("NVIDIA H100 PCIe", 80 << 30).key == "unknown"  # not the SXM entry
    assert gpu_from_device_name("NVIDIA H100 PCIe", 80 << 30).peak_flops == 756e12


def test_peak_flops_reads_the_cuda_device_name(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L40")
    assert peak_flops(torch.device("cuda", 0)) == 181.05e12
    assert metrics.peak_flops(torch.device("cpu")) is None


def _fake_gpu(monkeypatch, bf16: bool):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-32GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))


def test_auto_precision_falls_back_to_fp32_with_a_reason(monkeypatch):
    gpu = torch.device("cuda", 0)
    _fake_gpu(monkeypatch, bf16=False)
    chosen = precision.resolve_precision(gpu, "auto")
    assert not chosen.bf16
    assert chosen.note == ("train.precision=auto chose fp32: Tesla V100-SXM2-32GB (compute capability 7.0) "
                           "has no native bf16")
    with pytest.raises(ConfigError, match="^train.precision=bf16: Tesla V100.* has no native bf16"):
        precision.resolve_precision(gpu, "bf16")
    assert precision.resolve_precision(gpu, "fp32") == precision.Precision(bf16=False)
    _fake_gpu(monkeypatch, bf16=True)
    assert precision.resolve_precision(gpu, "auto") == precision.Precision(bf16=True)
    cpu = torch.device("cpu")
    assert precision.resolve_precision(cpu, "auto") == precision.Precision(bf16=False)
    assert precision.resolve_precision(cpu, "bf16") == precision.Precision(bf16=True)


def test_tokens_per_second_covers_training_steps_only(tmp_path, token_corpus, monkeypatch):
    """On a clock the test controls, a training step takes 1 s, and every evaluation and checkpoint 100 s:
    the step time and tokens/s see the steps alone, and eval_s and ckpt_s the rest."""
    import types
    from omegaconf import OmegaConf
    from llama_pt.train import trainer as trainer_module
    from llama_pt.config import resolve
    from llama_pt.train.trainer import Trainer
    clock = types.SimpleNamespace(now=0.0)
    monkeypatch.setattr(trainer_module, "time", types.SimpleNamespace(perf_counter=lambda: clock.now))

    def taking(seconds, method):
        def wrapped(self, *args, **kwargs):
            clock.now += seconds
            return method(self, *args, **kwargs)
        return wrapped

    monkeypatch.setattr(Trainer, "train_step", taking(1.0, Trainer.train_step))
    monkeypatch.setattr(Trainer, "evaluate", taking(100.0, Trainer.evaluate))
    monkeypatch.setattr(Trainer, "save", taking(100.0, Trainer.save))
    cfg = OmegaConf.to_container(make_config(tmp_path, token_corpus, "train.steps=6", "train.log_every=2",
                                             "train.eval_every=1", "train.ckpt_every=1"))
    trainer = Trainer(resolve(cfg), cfg)
    try:
        trainer.fit()
    finally:
        trainer.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [(r["step"], r["step_time_s"], r["tokens_per_s"]) for r in steps] == [(2, 1.0, 512.0), (4, 1.0, 512.0),
                                                                                (6, 1.0, 512.0)]
    assert [(r["step"], r["eval_s"]) for r in records if "eval_s" in r] == [(s, 100.0) for s in range(1, 7)]
    assert [(r["step"], r["ckpt_s"]) for r in records if "ckpt_s" in r] == [(s, 100.0) for s in range(1, 7)]
