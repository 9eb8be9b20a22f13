"""Hugging Face Llama <-> Ithaca: config.json fields, tensor names and the fused layouts.

The math needs no change between the two: our RoPE pairs channel i with i + d/2 (the Llama/NeoX
half-split form of Hugging Face's `rotate_half`), so q and k rows are copied as they are, with no
interleave permutation; RMSNorm, SwiGLU, GQA (query head j uses kv head j // g) and the d^-0.5
attention scale are the same. Only two of our weights are fused:

- `attn.qkv` is laid out per kv group, [g query heads, k, v] x head_dim rows (g = n_heads /
  n_kv_heads), so that a tp split keeps groups whole; HF keeps q_proj (query heads in order, head
  j = group j // g), k_proj and v_proj apart.
- `ffn.gate_up` is [gate; up] (HF's gate_proj, up_proj).

A folder is read lazily (safetensors), so a pipeline stage or tp rank reads only the tensors it
needs. config.json is read in both forms transformers writes: 4.x's `rope_theta` + `rope_scaling`,
and 5.x's `rope_parameters`; we write the 4.x form, which both read.
"""

from __future__ import annotations

import json
import math
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from ithaca.models.llama_args import LlamaArgs
from ithaca.models.rope_scaling import RopeScaling
from ithaca.models.state_layout import ParamLayout

ARCHITECTURE = {  # our field -> HF's; these must agree for HF weights to load into our model
    "vocab_size": "vocab_size",
    "dim": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
    "ffn_dim": "intermediate_size",
    "norm_eps": "rms_norm_eps",
    "tie_embeddings": "tie_word_embeddings",
}
_BLOCK = {  # per layer, our name -> HF's, for the tensors that map one to one
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn.out.weight": "self_attn.o_proj.weight",
    "ffn.down.weight": "mlp.down_proj.weight",
}
_WHOLE = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight", "head.weight": "lm_head.weight"}
_ROPE_KEYS = {f.name for f in fields(RopeScaling)}


def hf_config(args: LlamaArgs, *, max_position_embeddings: int, dtype: torch.dtype,
              eos_token_id: int | None) -> dict[str, Any]:
    """config.json of a LlamaForCausalLM with `args`'s architecture (an all-softmax model)."""
    if set(args.layer_pattern) != {"S"}:
        raise ValueError(f"layer_pattern={args.layer_pattern!r}: only softmax attention (S) has a Hugging Face "
                         "Llama class; export linear and hybrid models in Ithaca's own format")
    scaling = args.rope_scaling
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **{hf: getattr(args, ours) for ours, hf in ARCHITECTURE.items()},
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "rope_theta": args.rope_theta,
        "rope_scaling": None if scaling is None else {k: getattr(scaling, k) for k in sorted(scaling.given())},
        "max_position_embeddings": max_position_embeddings,
        "initializer_range": args.init_std,
        "bos_token_id": None,
        "eos_token_id": eos_token_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def llama_args_from_hf(config: dict[str, Any], where: str, **ours: Any) -> LlamaArgs:
    """LlamaArgs with the architecture and RoPE of an HF Llama config.json (`where`: its path, for
    errors) and `ours` for the rest (kernels, activation_checkpointing, ...). Raises ValueError naming
    the field of a model our Llama cannot represent."""
    _refuse_unsupported(config, where)
    n_heads = config["num_attention_heads"]
    theta, scaling = _rope_from_hf(config, where)
    args = dict(vocab_size=config["vocab_size"], dim=config["hidden_size"], n_layers=config["num_hidden_layers"],
                n_heads=n_heads, n_kv_heads=config.get("num_key_value_heads") or n_heads,
                ffn_dim=config["intermediate_size"], norm_eps=config.get("rms_norm_eps", 1e-6),
                tie_embeddings=config.get("tie_word_embeddings", False), rope_theta=theta, rope_scaling=scaling)
    return LlamaArgs(**args, **ours)


def check_hf_config(config: dict[str, Any], args: LlamaArgs, where: str) -> None:
    """Refuse HF weights whose architecture differs from `args` (rope may differ: that is context
    extension). Raises ValueError naming the file, its field and ours."""
    theirs = llama_args_from_hf(config, where)
    for ours, hf in ARCHITECTURE.items():
        if getattr(theirs, ours) != getattr(args, ours):
            field = "n_kv_heads" if ours == "kv_heads" else ours
            raise ValueError(f"{where}: {hf}={getattr(theirs, ours)!r} but model.{field}={getattr(args, ours)!r}; "
                             f"set model.{field}: {getattr(theirs, ours)!r} to start from these weights")
    if set(args.layer_pattern) != {"S"}:
        raise ValueError(f"model.layer_pattern={args.layer_pattern!r}: {where} is a softmax-attention Llama; "
                         "init_from needs layer_pattern: S")


def _refuse_unsupported(config: dict[str, Any], where: str) -> None:
    wrong = {"model_type": ("llama", config.get("model_type")), "hidden_act": ("silu", config.get("hidden_act", "silu")),
             "attention_bias": (False, config.get("attention_bias", False)), "mlp_bias": (False, config.get("mlp_bias", False))}
    for key, (want, got) in wrong.items():
        if got != want:
            raise ValueError(f"{where}: {key}={got!r}; Ithaca's Llama has {key}={want!r}")
    head_dim = config.get("head_dim")
    if head_dim is not None and head_dim * config["num_attention_heads"] != config["hidden_size"]:
        raise ValueError(f"{where}: head_dim={head_dim}; Ithaca's Llama has head_dim = hidden_size / "
                         f"num_attention_heads = {config['hidden_size'] // config['num_attention_heads']}")


def _rope_from_hf(config: dict[str, Any], where: str) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from either config.json form; HF's own defaults fill what is omitted."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", config.get("rope_theta", 10000.0)))
    kind = params.pop("rope_type", params.pop("type", "default"))
    if params.pop("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError(f"{where}: partial_rotary_factor is not 1; Ithaca rotates every channel of a head")
    if kind == "default":
        return theta, None
    if kind not in ("linear", "llama3", "yarn"):
        raise ValueError(f"{where}: rope_type={kind!r}; Ithaca has default, linear, llama3 and yarn")
    unknown = sorted(set(params) - _ROPE_KEYS)
    if unknown:
        raise ValueError(f"{where}: rope scaling key {unknown[0]!r} is not one Ithaca reads for {kind}")
    if kind in ("llama3", "yarn"):  # transformers' standardize_rope_params: the pretraining length by default
        params.setdefault("original_max_position_embeddings", config["max_position_embeddings"])
    try:
        return theta, RopeScaling(rope_type=kind, **params)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def hf_names(name: str) -> list[str]:
    """The HF tensors canonical tensor `name` is made of (two or three for the fused ones)."""
    if name in _WHOLE:
        return [_WHOLE[name]]
    _, layer, rest = name.split(".", 2)  # blocks.<layer>.<rest>
    prefix = f"model.layers.{layer}."
    if rest == "attn.qkv.weight":
        return [prefix + f"self_attn.{p}_proj.weight" for p in "qkv"]
    if rest == "ffn.gate_up.weight":
        return [prefix + "mlp.gate_proj.weight", prefix + "mlp.up_proj.weight"]
    return [prefix + _BLOCK[rest]]


def fuse(args: LlamaArgs, name: str, parts: list[torch.Tensor]) -> torch.Tensor:
    """HF tensors `hf_names(name)` -> canonical tensor `name`."""
    if name.endswith("attn.qkv.weight"):
        q, k, v = parts
        kv, g, d = args.kv_heads, args.n_heads // args.kv_heads, args.head_dim
        grouped = [q.view(kv, g, d, -1), k.view(kv, 1, d, -1), v.view(kv, 1, d, -1)]
        return torch.cat(grouped, dim=1).reshape(-1, q.shape[-1])  # [kv * (g + 2) * d, dim]
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def split(args: LlamaArgs, name: str, tensor: torch.Tensor) -> list[torch.Tensor]:
    """`fuse`'s inverse: canonical tensor `name` -> the HF tensors `hf_names(name)`."""
    if name.endswith("attn.qkv.weight"):
        kv, g, d = args.kv_heads, args.n_heads // args.kv_heads, args.head_dim
        grouped = tensor.view(kv, g + 2, d, -1)  # [kv groups, g query heads + k + v, d, dim]
        return [grouped[:, :g].reshape(-1, tensor.shape[-1]), grouped[:, g].reshape(-1, tensor.shape[-1]),
                grouped[:, g + 1].reshape(-1, tensor.shape[-1])]
    if name.endswith("ffn.gate_up.weight"):
        return list(tensor.chunk(2))
    return [tensor]


def hf_state(args: LlamaArgs, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Canonical state -> HF LlamaForCausalLM tensors (contiguous, none sharing memory)."""
    out = {}
    for name, tensor in state.items():
        out.update(zip(hf_names(name), (t.contiguous() for t in split(args, name, tensor))))
    return out


class HFFolder:
    """A local Hugging Face model folder: config.json and *.safetensors (one file or an index of shards)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise ValueError(f"model.init_from={str(self.path)!r}: no config.json there; give a Hugging Face model "
                             "folder (config.json and *.safetensors, as save_pretrained writes)")
        self.config_file = config_file
        self.config = json.loads(config_file.read_text())
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            self.files = {k: self.path / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        elif (self.path / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(self.path / "model.safetensors", "pt") as f:
                self.files = {k: self.path / "model.safetensors" for k in f.keys()}
        else:
            raise ValueError(f"model.init_from={str(self.path)!r}: no model.safetensors or "
                             "model.safetensors.index.json; save the model with safe_serialization (the default)")

    def tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors, each file opened once; raises ValueError naming a missing one."""
        from safetensors import safe_open

        missing = [n for n in names if n not in self.files]
        if missing:
            raise ValueError(f"{self.path}: holds no tensor {missing[0]!r} (a Llama checkpoint has it)")
        out = {}
        for file in sorted({self.files[n] for n in names}):
            with safe_open(file, "pt") as f:
                out.update({n: f.get_tensor(n) for n in names if self.files[n] == file})
        return out


def load_hf_llama(folder: HFFolder, args: LlamaArgs, names: list[str],
                  layout: dict[str, ParamLayout]) -> dict[str, torch.Tensor]:
    """Canonical tensors `names` of the model `args`, whole and in the folder's dtype, read from
    `folder` after checking its architecture against `args`. `layout`: state_layout.canonical_layout(args),
    whose shapes each tensor must have. Raises ValueError naming the file and the field or tensor."""
    check_hf_config(folder.config, args, str(folder.config_file))
    hf = folder.tensors([n for name in names for n in hf_names(name)])
    out = {}
    for name in names:
        parts = [hf[n] for n in hf_names(name)]
        want = layout[name].shape
        if sum(p.shape[0] for p in parts) != want[0] or any(tuple(p.shape[1:]) != want[1:] for p in parts):
            shapes = ", ".join(f"{n} {tuple(hf[n].shape)}" for n in hf_names(name))
            raise ValueError(f"{folder.path}: {shapes} do not make {name} {want}; the safetensors do not match "
                             "config.json")
        out[name] = fuse(args, name, parts)
    return out


def max_position(args: LlamaArgs, trained_at: int) -> int:
    """The context an exported model claims: the longest of what it was trained at and its scaling's."""
    s = args.rope_scaling
    scaled = 0 if s is None or s.original_max_position_embeddings is None else math.ceil(
        s.original_max_position_embeddings * s.factor)
    return max(trained_at, scaled)
