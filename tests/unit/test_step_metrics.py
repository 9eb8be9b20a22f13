"""launcher/step_metrics.py: the MFU formula, the peak table, peak memory and train.peak_tflops."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ithaca.launcher.config import ConfigError
from ithaca.launcher.config_load import load_config
from ithaca.launcher.step_metrics import (StepMeter, count_params, device_peak_flops, flops_per_token, gpu_peaks,
                                          read_peak_memory)
from ithaca.models.llama_args import LlamaArgs

CPU = torch.device("cpu")


def _tiny_args() -> LlamaArgs:
    # 4 layers "LS" repeated: 2 softmax layers; 4 heads of dim 32 / 4 = 8
    return LlamaArgs(vocab_size=64, dim=32, n_layers=4, n_heads=4, ffn_dim=48, layer_pattern="LS")


def test_flops_per_token_is_6n_plus_attention_of_the_softmax_layers_only():
    # 6 * 1000 + 12 * L=2 * H=4 * Q=8 * T=128 = 6000 + 98304
    assert flops_per_token(_tiny_args(), n_params=1000, seq_len=128) == 104_304


class _Sharded(nn.Module):
    """Llama's parameter names on a tp rank: `embed.` (vocab-parallel), a tp-split matmul, a replicated norm."""

    def __init__(self, tie_embeddings: bool):
        super().__init__()
        self.args = SimpleNamespace(tie_embeddings=tie_embeddings)
        self.embed = nn.Embedding(10, 4)          # this rank's 40 of 80
        self.proj = nn.Linear(4, 3, bias=False)   # this rank's 12 of 24
        self.norm = nn.Parameter(torch.ones(4))   # 4, whole on every rank
        for p in (self.embed.weight, self.proj.weight):
            p.tensor_model_parallel = True  # as megatron-core marks its split parameters


def test_count_params_scales_tp_shards_and_skips_an_untied_input_embedding():
    assert count_params(_Sharded(tie_embeddings=False), tp=2) == 24 + 4
    assert count_params(_Sharded(tie_embeddings=True), tp=2) == 80 + 24 + 4


def test_peak_table_knows_h100_sxm_and_nothing_it_was_not_told():
    assert gpu_peaks("NVIDIA H100 80GB HBM3") == (989e12, 3.35e12)
    for name in ("NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA A100-SXM4-80GB", "Tesla T4", ""):
        assert gpu_peaks(name) is None, name


def test_mfu_needs_a_configured_peak_on_the_cpu():
    assert device_peak_flops(CPU, None) is None
    assert device_peak_flops(CPU, 2.5) == 2.5e12
    assert "mfu" not in StepMeter(_tiny_args(), 1000, 128, CPU, world_size=1, peak_tflops=None).read(10, 1.0)
    meter = StepMeter(_tiny_args(), 1000, 128, CPU, world_size=2, peak_tflops=1.0)
    # 104_304 FLOP/token * 1e6 tokens/s over 2 devices of 1e12 FLOP/s
    assert meter.read(tokens=2_000_000, seconds=2.0)["mfu"] == pytest.approx(104_304e6 / 2e12)


def test_cpu_peak_memory_is_positive_and_sees_a_big_tensor():
    read_peak_memory(CPU)  # the reset: later reads cover only what follows
    before = read_peak_memory(CPU)
    assert before > 0
    big = torch.ones(256 * 2**20, dtype=torch.uint8)  # 256 MiB, written so that it is resident
    after = read_peak_memory(CPU)
    del big
    # the peak was reset to the then-current RSS, so it grows by the tensor (less pages freed meanwhile)
    assert after >= before + 200 * 2**20


@pytest.mark.parametrize("value", ["0", "-1.5", ".nan", ".inf"])
def test_peak_tflops_must_be_finite_and_positive(value):
    with pytest.raises(ConfigError, match="train.peak_tflops"):
        load_config("debug-cpu", [f"train.peak_tflops={value}"])


def test_peak_tflops_accepts_an_integer_from_yaml():
    assert load_config("debug-cpu", ["train.peak_tflops=989"]).train.peak_tflops == 989.0
