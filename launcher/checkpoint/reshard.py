"""Resuming a checkpoint under another layout (dp, tp, pp, sp, sp_method, ZeRO stage, precision).

Each save records its layout and its model's shape in the client state. A resume whose layout
equals the checkpoint's loads through DeepSpeed as it always did (bitwise the uninterrupted run).
Otherwise every rank reads the whole training state from the old layout's files
(launcher/checkpoint/consolidate.py `full_training_state`: fp32 masters and AdamW's moments of every parameter,
whole over tp, ZeRO partitions and pipeline stages), cuts its tp part (models/state_layout.py `shard`)
and hands it to DeepSpeed's optimizer, which keeps its own partition of it:
- ZeRO 1/2 and the bf16 optimizer: `safe_set_full_fp32_param` / `safe_set_full_optimizer_state`
  through each parameter's fragment mapping, after creating the AdamW state they write into
  (torch creates it lazily at the first step, which a fresh engine has not taken);
- ZeRO-3: this rank's padded share of each parameter written into the flat fp32 partition and its
  AdamW state, then the partitioned weights refreshed from it (DeepSpeed's `set_full_hp_param`
  assumes the parameter divides evenly over the ranks);
- no ZeRO: the parameters and torch's AdamW state directly (fp32; bf16 without ZeRO is refused,
  see `check_reshardable`).
The lr schedule, the step counters and the client state come from the checkpoint's first model
states file; they do not depend on the layout.

Why not DeepSpeed's universal checkpoint: ds_to_universal needs our tp splits described as its
parameter patterns (fused qkv, strided gate_up and linear qkv) and writes a second, full copy of
the checkpoint; our canonical layout already knows the splits, and conversion at load leaves every
save as it was.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ithaca.launcher.checkpoint.consolidate import MOMENTS, full_training_state
from ithaca.log import get_logger
from ithaca.models.llama_args import LlamaArgs
from ithaca.models.state_layout import SHAPE_FIELDS, canonical_layout, canonical_name, shard, shape_fields

if TYPE_CHECKING:  # DeepSpeed and the config import slowly; the types are only names here
    import deepspeed

    from ithaca.launcher.config.schema import RunConfig
    from ithaca.parallel.mesh import ParallelMesh

log = get_logger(__name__)

# What DeepSpeed's engine.load_checkpoint keeps out of the client state it returns (engine.py, _load_checkpoint).
_ENGINE_KEYS = frozenset({"module", "skipped_steps", "global_steps", "dp_world_size", "mp_world_size", "data_sampler",
                          "random_ltd", "lr_scheduler", "optimizer"})


@dataclass(frozen=True, kw_only=True)
class CheckpointLayout:
    """How a run was split: what decides which files a checkpoint holds and what is in them."""
    dp: int
    tp: int
    pp: int
    sp: int
    sp_method: str
    zero_stage: int
    precision: str
    pp_split: tuple[int, ...] | None = None
    """Blocks per pipeline stage as configured; None: balanced by parameter count."""

    @classmethod
    def of(cls, cfg: RunConfig) -> CheckpointLayout:
        p, t = cfg.parallel, cfg.train
        return cls(dp=p.dp, tp=p.tp, pp=p.pp, sp=p.sp, sp_method=p.sp_method, zero_stage=t.zero_stage,
                   precision=t.precision, pp_split=None if p.pp_split is None else tuple(p.pp_split))

    def __str__(self) -> str:
        return " ".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))


def checkpoint_facts(cfg: RunConfig) -> dict:
    """What a save adds to its client state: the layout and the model's shape (a few numbers)."""
    return {"layout": dataclasses.asdict(CheckpointLayout.of(cfg)), "model_shape": shape_fields(cfg.model)}


def written_layout(facts: dict) -> CheckpointLayout:
    """The layout a checkpoint's facts (launcher/checkpoint/format.py `read_checkpoint_facts`) record."""
    saved = facts["layout"]
    split = saved["pp_split"]
    return CheckpointLayout(**{**saved, "pp_split": None if split is None else tuple(split)})


def check_model_shape(facts: dict, args: LlamaArgs, path: Path) -> None:
    """Raise ValueError naming the first model field whose value differs between the checkpoint's
    model (its facts, as `written_layout` takes them) and `args` (fields that change no tensor, such
    as rope_theta, may differ)."""
    saved = facts["model_shape"]
    for name in SHAPE_FIELDS:
        if saved[name] != getattr(args, name):
            raise ValueError(f"--resume: {path} holds a model with model.{name}={saved[name]!r}, this run has "
                             f"model.{name}={getattr(args, name)!r}; set model.{name}: {saved[name]!r} to resume it, "
                             "or start a new run")


def check_reshardable(written: CheckpointLayout, running: CheckpointLayout) -> None:
    """Raise ValueError if either layout keeps its optimizer in a form this module does not convert:
    bf16 without ZeRO and without pipeline stages runs DeepSpeed's fp16-style optimizer (masters in
    its own flat groups, no fragment mappings)."""
    for which, layout in (("the checkpoint", written), ("this run", running)):
        if layout.precision == "bf16" and layout.zero_stage == 0 and layout.pp == 1:
            raise ValueError(f"train.zero_stage=0: {which} is bf16 without ZeRO, whose optimizer state cannot be "
                             "resharded; resume under the checkpoint's own layout, or use train.zero_stage >= 1")


def load_resharded(engine: deepspeed.DeepSpeedEngine, path: Path, args: LlamaArgs, mesh: ParallelMesh) -> dict:
    """Set this rank's weights, fp32 masters, AdamW state, lr schedule and step counters from checkpoint
    `path` (verified, of any layout); returns its client state. Reads the whole checkpoint on every
    rank (memory: about four copies of the fp32 model); no communication."""
    state = full_training_state(path, args)
    layout = canonical_layout(args)
    tp, tp_rank = mesh.tp, mesh.rank("tp")
    params = {canonical_name(name, args.n_layers): p for name, p in engine.module.named_parameters()}

    def local(full: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        return shard(full[name], layout[name], tp, tp_rank).float()

    masters = {name: local(state.params, name) for name in params}
    moments = {key: {name: local(state.moments[key], name) for name in params} for key in MOMENTS}
    stage = engine.zero_optimization_stage()
    with torch.no_grad():
        if stage == 3:
            _set_zero3(engine.optimizer, params, masters, moments, state.optimizer_step)
        elif stage > 0 or hasattr(next(iter(params.values())), "_hp_mapping"):  # the bf16 optimizer maps too
            _set_mapped(engine.optimizer, params, masters, moments, state.optimizer_step)
        else:
            _set_plain(engine.optimizer, params, masters, moments, state.optimizer_step)

    scheduler = engine.lr_scheduler
    scheduler.load_state_dict(state.engine["lr_scheduler"])
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr  # a LambdaLR restores its counter, not the optimizer's current lr
    engine.global_steps = state.engine["global_steps"]
    engine.skipped_steps = state.engine["skipped_steps"]
    engine.global_samples = engine.global_steps * engine.train_batch_size()
    return {k: v for k, v in state.engine.items() if k not in _ENGINE_KEYS}


def _adam_state(like: torch.Tensor, step: float) -> dict[str, torch.Tensor]:
    """torch.optim.AdamW's state for one flat tensor, as its first step would create it (moments zero)."""
    return {"step": torch.tensor(step, dtype=torch.float32), **{key: torch.zeros_like(like) for key in MOMENTS}}


def _set_mapped(optimizer, params: dict[str, nn.Parameter], masters: dict, moments: dict, step: float) -> None:
    """ZeRO 1/2 or DeepSpeed's bf16 optimizer: each parameter's fragment of this rank's flat fp32 partition."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    base = optimizer.optimizer
    for group in base.param_groups:
        flat = group["params"][0]  # DeepSpeed gives the base optimizer one flat partition per group
        base.state[flat] = _adam_state(flat, step)
    for name, p in params.items():
        p.data.copy_(masters[name])  # the module's (bf16 or fp32) weights; every rank holds them whole
        if p._hp_mapping is None:
            continue  # none of this parameter lies in this rank's partition
        flat = base.param_groups[p._hp_mapping.param_group_index]["params"][0]
        p._hp_mapping.set_optim_state_fragment(flat, base.state[flat])
        safe_set_full_fp32_param(p, masters[name])
        for key in MOMENTS:
            safe_set_full_optimizer_state(p, moments[key][name], key)


def _set_zero3(optimizer, params: dict[str, nn.Parameter], masters: dict, moments: dict, step: float) -> None:
    """ZeRO-3: this rank's share (ceil(numel / ranks), the last one zero-padded) of every parameter."""
    import torch.distributed as dist

    flats = optimizer.fp32_partitioned_groups_flat
    states = [_adam_state(flat, step) for flat in flats]
    for flat, state in zip(flats, states):
        optimizer.optimizer.state[flat] = state
    for name, p in params.items():
        group, offset, share = optimizer.grad_position[optimizer.get_param_id(p)]
        start = dist.get_rank(p.ds_process_group) * share
        for target, value in ((flats[group], masters[name]),
                              *((states[group][key], moments[key][name]) for key in MOMENTS)):
            padded = torch.zeros(share * dist.get_world_size(p.ds_process_group), dtype=target.dtype)
            padded[:value.numel()] = value.flatten()
            target.narrow(0, offset, share).copy_(padded.narrow(0, start, share))
    for weights, flat in zip(optimizer.fp16_partitioned_groups_flat, flats):
        weights.copy_(flat)  # the partitioned module weights follow their masters


def _set_plain(optimizer, params: dict[str, nn.Parameter], masters: dict, moments: dict, step: float) -> None:
    """No ZeRO: torch's AdamW over the module's own parameters."""
    for name, p in params.items():
        p.data.copy_(masters[name])
        optimizer.state[p] = {"step": torch.tensor(step, dtype=torch.float32),
                              **{key: moments[key][name].to(p.dtype) for key in MOMENTS}}
