"""RoPE scaling: our frequencies equal transformers' own rope init functions for every scheme, the
Hugging Face config.json round trip is exact, and bad values are refused naming the field.

Also the pieces export and init_from stand on: the canonical layout read off the model (which dim
megatron-core splits, with which stride), tp shard/unshard, and the HF q/k/v, gate/up mapping.
"""

from __future__ import annotations

import json

import pytest
import torch

from ithaca.models.hf_llama import fuse, hf_config, hf_names, llama_args_from_hf, split
from ithaca.models.llama_args import LlamaArgs
from ithaca.models.rope_scaling import RopeScaling, rope_frequencies
from ithaca.models.state_layout import canonical_layout, shard, unshard

transformers = pytest.importorskip("transformers")  # the test extra; only parity checks need it

ARCH = dict(vocab_size=96, dim=256, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64)  # head_dim 128, as Llama's
SCHEMES = {
    "theta": (500000.0, None),
    "linear": (10000.0, RopeScaling(rope_type="linear", factor=4.0)),
    "llama3": (500000.0, RopeScaling(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position_embeddings=8192)),
    "yarn": (10000.0, RopeScaling(rope_type="yarn", factor=16.0, original_max_position_embeddings=4096)),
    "yarn-betas": (1e6, RopeScaling(rope_type="yarn", factor=4.0, original_max_position_embeddings=32768,
                                    beta_fast=16.0, beta_slow=2.0, truncate=False)),
    "yarn-attention-factor": (10000.0, RopeScaling(rope_type="yarn", factor=8.0, original_max_position_embeddings=2048,
                                                   attention_factor=1.5)),
    "yarn-mscale": (10000.0, RopeScaling(rope_type="yarn", factor=40.0, original_max_position_embeddings=4096,
                                         mscale=1.0, mscale_all_dim=0.707)),
}


def _args(scheme: str) -> LlamaArgs:
    theta, scaling = SCHEMES[scheme]
    return LlamaArgs(**ARCH, rope_theta=theta, rope_scaling=scaling)


def _written(args: LlamaArgs) -> dict:
    """config.json as export writes it, through a JSON file's text."""
    return json.loads(json.dumps(hf_config(args, max_position_embeddings=65536, dtype=torch.float32, eos_token_id=2)))


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_frequencies_equal_transformers(scheme):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    args = _args(scheme)
    config = LlamaConfig(**_written(args))  # transformers reads what we write
    rope = LlamaRotaryEmbedding(config)
    rope_dict = getattr(config, "rope_parameters", None) or config.rope_scaling or {}  # 5.x or 4.x
    kind = rope_dict.get("rope_type", rope_dict.get("type", "default"))
    if kind != "default":  # the module applies the scheme's own init function; check both agree
        want_freq, want_scale = ROPE_INIT_FUNCTIONS[kind](config, "cpu")
        torch.testing.assert_close(rope.inv_freq, want_freq, rtol=0, atol=0)
    inv_freq, scale = rope_frequencies(args.head_dim, args.rope_theta, args.rope_scaling)
    # fp32 on both sides; the formulas are written independently, so allow fp32 rounding (2^-23)
    torch.testing.assert_close(inv_freq, rope.inv_freq, rtol=2e-7, atol=0)
    assert scale == pytest.approx(rope.attention_scaling, rel=1e-12)


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_config_round_trip_is_exact(scheme):
    args = _args(scheme)
    back = llama_args_from_hf(_written(args), "config.json")
    assert back == args
    assert _written(back) == _written(args)


@pytest.mark.parametrize("scheme", ["llama3", "yarn-betas"])
def test_config_transformers_saves_reads_the_same(scheme):
    """transformers 5.x saves rope_parameters (rope_theta inside); 4.x rope_theta + rope_scaling."""
    from transformers import LlamaConfig

    args = _args(scheme)
    saved = LlamaConfig(**_written(args)).to_dict()
    assert llama_args_from_hf(saved, "config.json") == args


def test_hf_defaults_fill_what_a_config_omits():
    """An HF llama3 config without original_max_position_embeddings uses max_position_embeddings."""
    written = _written(_args("llama3"))
    del written["rope_scaling"]["original_max_position_embeddings"]
    assert llama_args_from_hf(written, "c.json").rope_scaling.original_max_position_embeddings == 65536


@pytest.mark.parametrize("change, match", [
    (dict(factor=0.5), "rope_scaling.factor=0.5"),
    (dict(rope_type="llama3"), "rope_scaling.high_freq_factor: required"),
    (dict(beta_fast=8.0), "rope_scaling.beta_fast=8.0: not used by rope_type linear"),
])
def test_bad_scaling_is_refused_naming_the_field(change, match):
    with pytest.raises(ValueError, match=match):
        RopeScaling(**{"rope_type": "linear", "factor": 4.0, **change})


def test_llama3_and_yarn_ranges_are_checked():
    with pytest.raises(ValueError, match="rope_scaling.high_freq_factor=1.0: must exceed"):
        RopeScaling(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=1.0,
                    original_max_position_embeddings=8192)
    with pytest.raises(ValueError, match="rope_scaling.beta_fast=1.0: must exceed"):
        RopeScaling(rope_type="yarn", factor=8.0, original_max_position_embeddings=8192, beta_fast=1.0)


@pytest.mark.parametrize("edit, match", [
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "config.json: rope_type='dynamic'"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0, "long_factor": [1.0]}}, "key 'long_factor'"),
    ({"hidden_act": "gelu"}, "config.json: hidden_act='gelu'"),
    ({"attention_bias": True}, "config.json: attention_bias=True"),
    ({"head_dim": 64}, "config.json: head_dim=64"),
    ({"partial_rotary_factor": 0.5}, "config.json: partial_rotary_factor"),
])
def test_hf_configs_our_llama_cannot_represent_are_refused(edit, match):
    with pytest.raises(ValueError, match=match):
        llama_args_from_hf({**_written(_args("theta")), **edit}, "config.json")


def _built_layout(args: LlamaArgs) -> dict[str, tuple]:
    """Names, shapes and megatron-core's split marks of the model built at tp = 1 (no process group:
    megatron-core's layers then take tp = 1), on the meta device."""
    from megatron.core.model_parallel_config import ModelParallelConfig

    from ithaca.models.llama import Llama

    mp = ModelParallelConfig(tensor_model_parallel_size=1, use_cpu_initialization=True, gradient_accumulation_fusion=False)
    with torch.device("meta"):
        model = Llama(args, mp)
    return {name: (tuple(p.shape), p.partition_dim if getattr(p, "tensor_model_parallel", False) else None,
                   getattr(p, "partition_stride", 1)) for name, p in model.named_parameters()}


@pytest.mark.parametrize("extra", [{}, {"layer_pattern": "LS", "linear_decay": "gated", "n_kv_heads": None},
                                   {"layer_pattern": "L", "linear_output_norm": False, "tie_embeddings": True},
                                   {"layer_pattern": "DS", "linear_decay": "gated", "n_kv_heads": None},
                                   {"layer_pattern": "LD", "linear_decay": "plain", "delta_conv_size": 2}])
def test_layout_table_is_the_models(extra):
    """models/state_layout.py's table: the model's names in its order, shapes and megatron-core's splits."""
    args = LlamaArgs(**{**ARCH, **extra})
    table = {name: (p.shape, p.tp_dim, p.stride) for name, p in canonical_layout(args).items()}
    built = _built_layout(args)
    assert list(table) == list(built)
    assert table == built


def test_shard_takes_each_ranks_piece_of_every_block():
    gate_up = canonical_layout(LlamaArgs(**ARCH))["blocks.0.ffn.gate_up.weight"]  # [gate; up], 2 x 64 rows
    full = torch.arange(128.0)[:, None].expand(128, 256)
    parts = [shard(full, gate_up, 4, r) for r in range(4)]
    assert parts[1][:, 0].tolist() == list(range(16, 32)) + list(range(80, 96))  # gate rows, then up rows of rank 1
    assert torch.equal(unshard(parts, gate_up), full)


def test_qkv_maps_to_hf_q_k_v_by_kv_group():
    args = LlamaArgs(vocab_size=8, dim=8, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=8)  # g = 2, head_dim 2
    rows = torch.arange(16.0)[:, None]  # our fused rows: group 0 = q0 q0 q1 q1 k0 k0 v0 v0, group 1 = ...
    q, k, v = split(args, "blocks.0.attn.qkv.weight", rows)
    assert q[:, 0].tolist() == [0, 1, 2, 3, 8, 9, 10, 11] and k[:, 0].tolist() == [4, 5, 12, 13]
    assert v[:, 0].tolist() == [6, 7, 14, 15]
    assert torch.equal(fuse(args, "blocks.0.attn.qkv.weight", [q, k, v]), rows)
    assert hf_names("blocks.0.attn.qkv.weight") == [f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"]
