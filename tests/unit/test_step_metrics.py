"""launcher/train/metrics.py: the MFU formula, the peak table, peak memory and train.peak_tflops."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ithaca.launcher.config.schema import ConfigError
from ithaca.launcher.config.load import load_config
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ithaca.launcher.train.metrics import (COUNTED_CPU_STEPS, StepMeter, device_peak_flops, flops_per_token, gpu_peaks,
                                          matmul_params)
from ithaca.models.llama_args import LlamaArgs

CPU = torch.device("cpu")
MIB, GIB = 2**20, 2**30
# 4 layers of "LS": 2 linear, 2 softmax; 4 heads of dim 32 / 4 = 8, no GQA; retention decay (no
# parameters), output gate and per-head output norm on
TINY = LlamaArgs(vocab_size=64, dim=32, n_layers=4, n_heads=4, ffn_dim=48, layer_pattern="LS")
FFN_AND_NORMS = 3 * 32 * 48 + 2 * 32              # gate_up, down; attn_norm, ffn_norm: 4672
SOFTMAX = 32 * (4 + 2 * 4) * 8 + 32 * 32          # qkv, out: 4096
LINEAR = 3 * 32 * 32 + 32 * 32 + 32 * 32 + 4 * 8  # qkv, out_gate, out, out_norm: 5152
HEAD = 32 + 64 * 32                               # final norm, output projection: 2080
N = 2 * (FFN_AND_NORMS + SOFTMAX) + 2 * (FFN_AND_NORMS + LINEAR) + HEAD  # 39264; not the input embedding (a lookup)
# 6N + 12 L_S H Q T + 12 L_L H Q (C + Q): 2 softmax layers, T = 128; 2 linear layers, chunks of C = 64
FLOPS = 6 * N + 12 * 2 * 4 * 8 * 128 + 12 * 2 * 4 * 8 * (64 + 8)


def test_flops_per_token_by_hand():
    assert flops_per_token(TINY, seq_len=128) == FLOPS == 389_184


def test_delta_rule_layers_count_their_chunk_work():
    # 6 L_D H Q (4 C + 3 Q) for the 2 layers that become delta-rule layers
    delta = dataclasses.replace(TINY, layer_pattern="DS")
    linear_part = 12 * 2 * 4 * 8 * (64 + 8)
    delta_part = 6 * 2 * 4 * 8 * (4 * 64 + 3 * 8)
    assert flops_per_token(delta, seq_len=128) - flops_per_token(TINY, seq_len=128) == pytest.approx(
        6 * (matmul_params(delta) - matmul_params(TINY)) + delta_part - linear_part)


def test_a_tied_embedding_counts_once_as_the_output_projection():
    assert flops_per_token(dataclasses.replace(TINY, tie_embeddings=True), seq_len=128) == FLOPS


def test_peak_table_is_the_plans_device_table_for_sxm_parts_only():
    assert gpu_peaks("NVIDIA H100 80GB HBM3") == (989e12, 3.35e12)
    assert gpu_peaks("NVIDIA A100-SXM4-80GB") == (312e12, 2.039e12)
    for name in ("NVIDIA H100 PCIe", "NVIDIA H100 NVL", "Tesla T4", ""):
        assert gpu_peaks(name) is None, name


def read_every_counted_step(meter: StepMeter, tokens: int, seconds: float) -> dict[str, float]:
    """The last of COUNTED_CPU_STEPS reads: the meter stops counting ops, as a run's does."""
    return [meter.read(tokens, seconds) for _ in range(COUNTED_CPU_STEPS)][-1]


def test_mfu_needs_a_configured_peak_on_the_cpu():
    assert device_peak_flops(CPU, None) is None
    assert device_peak_flops(CPU, 2.5) == 2.5e12
    assert "mfu" not in read_every_counted_step(StepMeter(TINY, 128, CPU, world_size=1, peak_tflops=None), 10, 1.0)
    meter = StepMeter(TINY, 128, CPU, world_size=2, peak_tflops=1.0)
    # 1e6 tokens/s over 2 devices of 1e12 FLOP/s each
    assert read_every_counted_step(meter, 2_000_000, 2.0)["mfu"] == pytest.approx(FLOPS * 1e6 / 2e12)


def test_cpu_peak_memory_is_live_tensor_bytes_counted_in_the_first_steps():
    meter = StepMeter(TINY, 128, CPU, world_size=1, peak_tflops=None)
    kept = torch.ones(32 * MIB, dtype=torch.uint8)  # made in "step 1": live at every later peak
    first = meter.read(10, 1.0)["peak_mem_gib"] * GIB
    step = torch.ones(64 * MIB, dtype=torch.uint8)  # a step's own peak, freed before the read
    del step
    second = meter.read(10, 1.0)["peak_mem_gib"] * GIB
    assert first >= 32 * MIB and second == first + 64 * MIB  # what existed, the kept tensor, the step's own
    third = meter.read(10, 1.0)["peak_mem_gib"] * GIB  # the last counted step: no new tensor
    assert third == first
    assert _get_current_dispatch_mode() is None  # counting has stopped
    later = torch.ones(128 * MIB, dtype=torch.uint8)
    assert meter.read(10, 1.0)["peak_mem_gib"] * GIB == third  # later steps show the last counted one's
    del kept, later


@pytest.mark.parametrize("value", ["0", "-1.5", ".nan", ".inf"])
def test_peak_tflops_must_be_finite_and_positive(value):
    with pytest.raises(ConfigError, match="train.peak_tflops"):
        load_config("debug-cpu", [f"train.peak_tflops={value}"])


def test_peak_tflops_accepts_an_integer_from_yaml():
    assert load_config("debug-cpu", ["train.peak_tflops=989"]).train.peak_tflops == 989.0
