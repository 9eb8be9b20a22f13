"""launcher/train/metrics.py: the MFU formula, the peak table, peak memory and train.peak_tflops."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ithaca.launcher.config.schema import ConfigError
from ithaca.launcher.config.load import load_config
from ithaca.launcher.train.metrics import StepMeter, device_peak_flops, flops_per_token, gpu_peaks, read_peak_memory
from ithaca.models.llama_args import LlamaArgs

CPU = torch.device("cpu")
# 4 layers of "LS": 2 linear, 2 softmax; 4 heads of dim 32 / 4 = 8, no GQA; retention decay (no
# parameters), output gate and per-head output norm on
TINY = LlamaArgs(vocab_size=64, dim=32, n_layers=4, n_heads=4, ffn_dim=48, layer_pattern="LS")
FFN_AND_NORMS = 3 * 32 * 48 + 2 * 32              # gate_up, down; attn_norm, ffn_norm: 4672
SOFTMAX = 32 * (4 + 2 * 4) * 8 + 32 * 32          # qkv, out: 4096
LINEAR = 3 * 32 * 32 + 32 * 32 + 32 * 32 + 4 * 8  # qkv, out_gate, out, out_norm: 5152
HEAD = 32 + 64 * 32                               # final norm, output projection: 2080
N = 2 * (FFN_AND_NORMS + SOFTMAX) + 2 * (FFN_AND_NORMS + LINEAR) + HEAD  # 39264; not the input embedding (a lookup)
FLOPS = 6 * N + 12 * 2 * 4 * 8 * 128              # 6N + 12 L H Q T: L = 2 softmax layers, T = 128


def test_flops_per_token_by_hand():
    assert flops_per_token(TINY, seq_len=128) == FLOPS == 333_888


def test_a_tied_embedding_counts_once_as_the_output_projection():
    assert flops_per_token(dataclasses.replace(TINY, tie_embeddings=True), seq_len=128) == FLOPS


def test_peak_table_knows_h100_sxm_and_nothing_it_was_not_told():
    assert gpu_peaks("NVIDIA H100 80GB HBM3") == (989e12, 3.35e12)
    for name in ("NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA A100-SXM4-80GB", "Tesla T4", ""):
        assert gpu_peaks(name) is None, name


def test_mfu_needs_a_configured_peak_on_the_cpu():
    assert device_peak_flops(CPU, None) is None
    assert device_peak_flops(CPU, 2.5) == 2.5e12
    assert "mfu" not in StepMeter(TINY, 128, CPU, world_size=1, peak_tflops=None).read(10, 1.0)
    meter = StepMeter(TINY, 128, CPU, world_size=2, peak_tflops=1.0)
    # 1e6 tokens/s over 2 devices of 1e12 FLOP/s each
    assert meter.read(tokens=2_000_000, seconds=2.0)["mfu"] == pytest.approx(FLOPS * 1e6 / 2e12)


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
