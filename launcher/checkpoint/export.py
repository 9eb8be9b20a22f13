"""`ithaca export`: a checkpoint from any layout -> a Hugging Face folder, or Ithaca's own format.

A Llama (every layer softmax attention) becomes what `transformers.LlamaForCausalLM.from_pretrained`
loads: config.json, model.safetensors (or model-0000i-of-0000n.safetensors shards with
model.safetensors.index.json, above `max_shard_bytes`), generation_config.json. Tensor names and
the fused q/k/v and gate/up layouts are mapped by models/hf_llama.py; RoPE needs no permutation
(ours is the half-split form HF uses). max_position_embeddings is the longer of the sequence length
the run trained at and its rope scaling's extended context.

Linear-attention and hybrid models have no Hugging Face class. They are written in Ithaca's format:
config.json = {"format": "ithaca-llama/1", "model": {...}, "max_position_embeddings": n,
"eos_token_id": id}, where "model" is a run config's model section (LlamaArgs' fields, init_from
dropped), and the same safetensors files holding the canonical tensors (models/state_layout.py: the
names of `ithaca.models.llama.Llama` at tp = 1, in our fused layouts). Read it back with
`ithaca.launcher.config.load.build(LlamaArgs, config["model"], "model.")` and `Llama.load_state_dict`.

The folder appears complete or not at all: everything is written to <output>.partial, fsynced, and
renamed; an existing <output> is refused, and a <output>.partial left by a killed export is replaced.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch

from ithaca.data.shards import read_manifest
from ithaca.launcher.config.schema import RunConfig
from ithaca.launcher.checkpoint.consolidate import full_model_state
from ithaca.log import get_logger
from ithaca.models.hf_llama import hf_config, hf_state, max_position

log = get_logger(__name__)

ITHACA_FORMAT = "ithaca-llama/1"
DEFAULT_SHARD_BYTES = 5 * 2**30  # what save_pretrained writes by default in transformers 4.x


def export_checkpoint(ckpt: Path, output: Path, *, dtype: torch.dtype = torch.float32, config: Path | None = None,
                      max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> str:
    """Write checkpoint `ckpt` (a step folder or a checkpoints folder) to the new folder `output` with
    weights in `dtype`; `config`: the run's YAML when it is not beside the checkpoint (see
    launcher/checkpoint/consolidate.py). Returns the format written: "huggingface" or ITHACA_FORMAT.
    Raises ValueError naming the fix: an existing output, a damaged checkpoint, a missing config."""
    if output.exists():
        raise ValueError(f"--output={str(output)!r}: exists; give a new folder (export never overwrites)")
    cfg, state = full_model_state(ckpt, config)
    args = cfg.model
    state = {name: t.to(dtype) for name, t in state.items()}
    context, eos = max_position(args, cfg.data.seq_len), _eos_id(cfg)
    is_llama = set(args.layer_pattern) == {"S"}
    if is_llama:
        tensors = hf_state(args, state)
        files = {"config.json": hf_config(args, max_position_embeddings=context, dtype=dtype, eos_token_id=eos),
                 "generation_config.json": {"bos_token_id": None, "eos_token_id": eos}}
    else:
        tensors = {name: t.contiguous() for name, t in state.items()}
        model = dataclasses.asdict(dataclasses.replace(args, init_from=None))
        files = {"config.json": {"format": ITHACA_FORMAT, "model": model,
                                 "max_position_embeddings": context, "eos_token_id": eos}}
    partial = output.with_name(f"{output.name}.partial")
    if partial.exists():
        log.info(f"removing {partial}: left by an export that did not finish")
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    _write_safetensors(tensors, partial, max_shard_bytes)
    for name, content in files.items():
        (partial / name).write_text(json.dumps(content, indent=2) + "\n")
    for file in partial.iterdir():
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    partial.rename(output)
    return "huggingface" if is_llama else ITHACA_FORMAT


def _write_safetensors(tensors: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int) -> None:
    """One model.safetensors, or shards of at most max_shard_bytes (a larger tensor alone) and the
    index transformers reads (model.safetensors.index.json)."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], folder / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _eos_id(cfg: RunConfig) -> int | None:
    """The end-of-document id of the run's data (its first shard folder's manifest), None if unreadable."""
    try:
        return read_manifest(next(iter(cfg.data.sources))).tokenizer["eos_id"]
    except (OSError, ValueError, KeyError):
        return None
