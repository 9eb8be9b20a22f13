"""One Ithaca checkpoint, whatever layout wrote it -> the whole model's state under canonical names.

    cfg, state = full_model_state(Path("runs/x/checkpoints/step_00000100"))

Canonical names are those of `ithaca.models.llama.Llama` built with tp = 1 (models/state_layout.py).
The files DeepSpeed 0.19.8 writes through launcher/checkpoint/store.py, by layout:
- ZeRO 0-2 (any dp, sp): `mp_rank_<tp>_model_states.pt` holds the tp rank's `module` state (in the
  run's precision: bf16 runs keep bf16 weights there, their fp32 masters in the optimizer files);
- pp > 1: `layer_<part>-model_<tp>-model_states.pt` per pipeline part (parallel/pipeline.py's list:
  embedding, blocks, final norm, head) and tp rank;
- ZeRO-3: the module states are empty; each dp x sp rank's `zero_pp_rank_<r>_mp_rank_<tp>_optim_states.pt`
  holds `fp32_flat_groups`, per parameter group the concatenation of its 1/P share of every
  parameter (ceil(numel / P) elements, the last share zero-padded), in the order of `param_shapes`
  in the model states file: read back as fp32 masters.
Then every tensor's tp parts are joined (`unshard`). The model's architecture comes from the run's
resolved config (`<output_dir>/config.yaml`, two folders above a checkpoint in the default
`<output_dir>/checkpoints/step_N`), or a config given explicitly.

Before anything is unpickled, every file is checked against the checkpoint's manifest (size and
sha256), and every load is `torch.load(weights_only=True)` (launcher/checkpoint/format.py).

`full_training_state` reads, besides the weights, what resuming under another layout needs
(launcher/checkpoint/reshard.py): each parameter's fp32 master and AdamW moments, whole. ZeRO 1/2 and
DeepSpeed's bf16 optimizer write per dp x sp rank (and per tp rank and pipeline stage: `mp_rank_<m>`,
m = stage * tp + tp rank) `[bf16_]zero_pp_rank_<r>_mp_rank_<m>_optim_states.pt`: per parameter group
one flat fp32 partition, the AdamW state over the same flat, and `param_slice_mappings`, where each
parameter's fragment sits in it; a parameter's fragments over r in rank order are the parameter.
Without ZeRO, `mp_rank_<tp>_model_states.pt` holds the whole torch optimizer state beside the module.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from ithaca.launcher.checkpoint.format import LATEST, load_weights_only, main_states_file, verify_alone
from ithaca.launcher.config.schema import RunConfig
from ithaca.launcher.config.load import load_config
from ithaca.models.llama_args import LlamaArgs
from ithaca.models.state_layout import canonical_layout, canonical_name, pipeline_part_name, unshard

_LAYER = re.compile(r"layer_(\d+)-model_(\d+)-model_states\.pt")
_MODULE = re.compile(r"mp_rank_(\d+)_model_states\.pt")
_ZERO3_MODEL = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt")
_ZERO3_OPTIM = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt")
_SLICED_OPTIM = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt")  # ZeRO 1/2, bf16
MOMENTS = ("exp_avg", "exp_avg_sq")
"""AdamW's per-parameter state tensors (torch.optim.AdamW's names)."""

TpParts = list[dict[str, torch.Tensor]]  # per tp rank, canonical name -> that rank's part


def full_model_state(ckpt: Path, config: Path | None = None) -> tuple[RunConfig, dict[str, torch.Tensor]]:
    """(the run's config, the whole model's tensors by canonical name, in model order) from checkpoint
    `ckpt`: a step_N folder, or a checkpoints folder (the one its `latest` names). `config`: the run's
    YAML, by default config.yaml two folders above the checkpoint. Single process, no process group.

    Tensors are fp32 masters under ZeRO-3, else the module's weights in the run's precision.
    Raises ValueError naming the file: a damaged or unlisted file, a missing config, or a tensor whose
    shape differs from what the config's model has.
    """
    path = ckpt / (ckpt / LATEST).read_text().strip() if (ckpt / LATEST).is_file() else ckpt
    verify_alone(path)
    config = config or path.parent.parent / "config.yaml"
    if not config.is_file():
        raise ValueError(f"{config}: missing; the run's resolved config names the model of {path}; give the "
                         "config the run trained with (ithaca export --config PATH)")
    cfg = load_config(config)
    parts = _tp_parts(path, cfg.model)
    return cfg, _join(parts, cfg.model, path, str(config))


@dataclass(frozen=True)
class TrainingState:
    """A checkpoint's whole training state by canonical name (tp = 1), whatever layout wrote it."""
    params: dict[str, torch.Tensor]
    """fp32 masters; a run without them (bf16 without ZeRO) trains its bf16 weights: those."""
    moments: dict[str, dict[str, torch.Tensor]]
    """MOMENTS key -> canonical name -> AdamW's state tensor, in the parameter's shape."""
    optimizer_step: float
    """AdamW's step count (its bias correction), the same for every parameter."""
    engine: dict
    """The first model states file's entries but the module: lr_scheduler, global_steps, skipped_steps, ...
    and the client state the run saved."""


def full_training_state(path: Path, args: LlamaArgs) -> TrainingState:
    """The training state in checkpoint folder `path` (verified by the caller) of the model `args`.
    Single process; reads every file of the checkpoint. Raises ValueError naming the file or the
    tensor that does not fit `args`."""
    names = sorted(p.name for p in path.iterdir())
    zero3 = sorted({int(m[2]) for n in names if (m := _ZERO3_MODEL.fullmatch(n))})
    if zero3:
        read = {t: _zero3_tensors(path, t) for t in zero3}
        parts = {key: _in_rank_order({t: r[0][key] for t, r in read.items()}, path, "zero_pp_rank_*_mp_rank_<tp>")
                 for key in ("param", *MOMENTS)}
        step = read[zero3[0]][1]
    elif any(_SLICED_OPTIM.fullmatch(n) for n in names):
        parts, step = _sliced_parts(path, names, args)
    else:
        parts, step = _unpartitioned_parts(path, names, args)
    missing = [key for key in MOMENTS if not any(parts[key])]
    if missing:
        raise ValueError(f"{path}: holds no optimizer {missing[0]} (saved before the first step?); resume it "
                         "under the layout that wrote it")
    tensors = {key: _join(p, args, path, "this run's config") for key, p in parts.items()}
    engine = {k: v for k, v in load_weights_only(main_states_file(path), "cpu").items() if k != "module"}
    return TrainingState(params=tensors.pop("param"), moments=tensors, optimizer_step=step, engine=engine)


def _sliced_parts(path: Path, names: list[str], args: LlamaArgs) -> tuple[dict[str, TpParts], float]:
    """Masters and moments per tp rank from ZeRO 1/2 or bf16-optimizer files (see the module docstring)."""
    files: dict[int, dict[int, str]] = defaultdict(dict)  # mp rank -> dp x sp rank -> file
    for name in names:
        if m := _SLICED_OPTIM.fullmatch(name):
            files[int(m[2])][int(m[1])] = name
    parts: dict[str, dict[int, dict[str, torch.Tensor]]] = {key: defaultdict(dict) for key in ("param", *MOMENTS)}
    step = 0.0
    for mp, by_rank in sorted(files.items()):
        if sorted(by_rank) != list(range(len(by_rank))):
            raise ValueError(f"{path}: optimizer files of mp rank {mp} are dp x sp ranks {sorted(by_rank)}; a file "
                             "is missing")
        main = load_weights_only(path / f"mp_rank_{mp:02d}_model_states.pt", "cpu")
        tp_rank = mp % main["checkpoint_parallel_dimensions"]["tp_degree"]  # mp = stage * tp + tp rank
        states = [load_weights_only(path / by_rank[r], "cpu")["optimizer_state_dict"] for r in range(len(by_rank))]
        for group, group_shapes in enumerate(main["param_shapes"]):
            adam = [s["base_optimizer_state"]["state"].get(group, {}) for s in states]
            flats = {"param": [s["single_partition_of_fp32_groups"][group] for s in states],
                     **{key: [a[key] for a in adam] for key in MOMENTS if key in adam[0]}}
            step = float(adam[0].get("step", step))
            for name, shape in group_shapes.items():
                canonical = canonical_name(name, args.n_layers)
                if canonical in parts["param"][tp_rank]:
                    continue  # the tied embedding: the first and last stages keep equal copies
                for key, flat in flats.items():
                    pieces = [flat[r].narrow(0, at.start, at.numel) for r, s in enumerate(states)
                              if (at := s["param_slice_mappings"][group].get(name)) is not None]
                    parts[key][tp_rank][canonical] = torch.cat(pieces).view(shape)
    return {key: _in_rank_order(held, path, "*_mp_rank_<m>_optim_states") for key, held in parts.items()}, step


def _unpartitioned_parts(path: Path, names: list[str], args: LlamaArgs) -> tuple[dict[str, TpParts], float]:
    """Weights and moments per tp rank from `mp_rank_<tp>_model_states.pt` of a run without ZeRO."""
    modules = {int(m[1]): n for n in names if (m := _MODULE.fullmatch(n))}
    parts: dict[str, dict[int, dict[str, torch.Tensor]]] = {key: {} for key in ("param", *MOMENTS)}
    step = 0.0
    for tp_rank, name in modules.items():
        saved = load_weights_only(path / name, "cpu")
        if saved["module"] is None or not saved.get("optimizer"):
            raise ValueError(f"{path / name}: holds no module with its optimizer state (pipeline stages without "
                             "ZeRO); resume it under the layout that wrote it")
        module = _tensors(saved["module"])
        params = [n for n in module if n not in saved["buffer_names"]]
        # launcher/train/engine.py parameter_groups: matrices first, then gains, each in module order
        order = [n for n in params if module[n].dim() >= 2] + [n for n in params if module[n].dim() < 2]
        optim = saved["optimizer"]
        ids = [i for group in optim["param_groups"] for i in group["params"]]
        if len(ids) != len(order):
            raise ValueError(f"{path / name}: the optimizer holds {len(ids)} parameters, the module {len(order)}")
        canonical = [canonical_name(n, args.n_layers) for n in order]
        parts["param"][tp_rank] = dict(zip(canonical, (module[n] for n in order)))
        for key in MOMENTS:
            parts[key][tp_rank] = {c: optim["state"][i][key] for c, i in zip(canonical, ids) if i in optim["state"]}
        step = float(optim["state"][ids[0]]["step"]) if ids[0] in optim["state"] else 0.0
    return {key: _in_rank_order(held, path, "mp_rank_<tp>") for key, held in parts.items()}, step


def _tp_parts(path: Path, args: LlamaArgs) -> TpParts:
    """Each tp rank's tensors, canonical names, from whichever files the layout wrote."""
    names = sorted(p.name for p in path.iterdir())
    layers = [(m, n) for n in names if (m := _LAYER.fullmatch(n))]
    if layers:
        parts: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)
        for m, name in layers:
            part, tp_rank = int(m[1]), int(m[2])
            for key, tensor in _tensors(load_weights_only(path / name, "cpu")).items():
                parts[tp_rank][pipeline_part_name(part, key, args.n_layers)] = tensor
        return _in_rank_order(parts, path, "layer_*-model_<tp>")
    zero3 = sorted({int(m[2]) for n in names if (m := _ZERO3_MODEL.fullmatch(n))})
    if zero3:
        return _in_rank_order({t: _zero3_masters(path, t) for t in zero3}, path, "zero_pp_rank_*_mp_rank_<tp>")
    modules = {int(m[1]): n for n in names if (m := _MODULE.fullmatch(n))}
    if not modules:
        raise ValueError(f"{path}: no model states file (mp_rank_*, layer_* or zero_pp_rank_*); not an Ithaca "
                         "checkpoint folder")
    return _in_rank_order({t: _tensors(load_weights_only(path / n, "cpu")["module"]) for t, n in modules.items()},
                          path, "mp_rank_<tp>")


def _zero3_masters(path: Path, tp_rank: int) -> dict[str, torch.Tensor]:
    """Tp rank `tp_rank`'s fp32 parameters, joined from every dp x sp rank's ZeRO-3 partition."""
    return _zero3_tensors(path, tp_rank)[0]["param"]


def _zero3_tensors(path: Path, tp_rank: int) -> tuple[dict[str, dict[str, torch.Tensor]], float]:
    """({"param": fp32 masters, "exp_avg": ..., "exp_avg_sq": ...} by name, AdamW's step) of tp rank
    `tp_rank`, each tensor joined from every dp x sp rank's ZeRO-3 partition."""
    shapes = load_weights_only(path / f"zero_pp_rank_0_mp_rank_{tp_rank:02d}_model_states.pt", "cpu")["param_shapes"]
    files = sorted(((int(m[1]), n) for p in path.iterdir() if (m := _ZERO3_OPTIM.fullmatch(n := p.name))
                    and int(m[2]) == tp_rank))
    states = [load_weights_only(path / n, "cpu")["optimizer_state_dict"] for _, n in files]
    world = len(states)
    if [r for r, _ in files] != list(range(world)) or any(s["partition_count"] != world for s in states):
        raise ValueError(f"{path}: ZeRO-3 optimizer files of tp rank {tp_rank} are ranks {[r for r, _ in files]}, "
                         f"partitioned {states[0]['partition_count']} ways; a file is missing")
    out: dict[str, dict[str, torch.Tensor]] = {key: {} for key in ("param", *MOMENTS)}
    adam = [s["optimizer_state_dict"]["state"] for s in states]
    for group, group_shapes in enumerate(shapes):
        flats = {"param": [s["fp32_flat_groups"][group] for s in states],
                 **{key: [a[group][key] for a in adam] for key in MOMENTS if group in adam[0]}}
        offset = 0
        for name, shape in group_shapes.items():
            numel = math.prod(shape)
            share = math.ceil(numel / world)  # deepspeed/runtime/zero/partition_parameters.py: padded equal shares
            for key, flat in flats.items():
                out[key][name] = torch.cat([f.narrow(0, offset, share) for f in flat])[:numel].view(shape)
            offset += share
    return out, float(adam[0][0]["step"]) if 0 in adam[0] else 0.0


def _join(parts: TpParts, args: LlamaArgs, path: Path, config: str) -> dict[str, torch.Tensor]:
    """Every tensor's tp parts joined, checked name by name and shape by shape against the model `args`
    (`config`: where `args` came from, for the messages)."""
    layout = canonical_layout(args)
    for rank, held in enumerate(parts):
        missing, extra = sorted(set(layout) - set(held)), sorted(set(held) - set(layout))
        if missing or extra:
            what = f"has no {missing[0]}, which" if missing else f"has {extra[0]}, which"
            raise ValueError(f"{path}: tp rank {rank} {what} the model of {config} {'has' if missing else 'lacks'}; "
                             "give the config of the run that wrote the checkpoint")
    state = {}
    for name, want in layout.items():
        state[name] = unshard([held[name] for held in parts], want)
        if tuple(state[name].shape) != want.shape:
            raise ValueError(f"{path}: {name} is {tuple(state[name].shape)} over tp={len(parts)}, the model of "
                             f"{config} has {want.shape}; give the config of the run that wrote the checkpoint")
    return state


def _in_rank_order(by_rank: dict[int, dict[str, torch.Tensor]], path: Path, pattern: str) -> TpParts:
    if sorted(by_rank) != list(range(len(by_rank))):
        raise ValueError(f"{path}: files {pattern} for tp ranks {sorted(by_rank)}; a tp rank's file is missing")
    return [by_rank[r] for r in range(len(by_rank))]


def _tensors(state: dict) -> dict[str, torch.Tensor]:
    """A module state without megatron-core's `_extra_state` entries (None: no Transformer Engine)."""
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
