"""The layouts a config could run under on N ranks: every choice the config check accepts.

A layout is the config's parallel degrees, sequence method, state exchange, ZeRO stage,
activation checkpointing and micro-batch; the model, sequence length and global batch stay the
config's. Each candidate is built as a RunConfig, so the config's own checks (schema.py's
RunConfig and SequenceLayout) decide which exist; nothing here restates them.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import get_args

from ithaca.launcher.config.schema import RunConfig
from ithaca.models.llama_args import Recompute
from ithaca.parallel.sequence_layout import SoftmaxMethod, StateExchange


@dataclass(frozen=True, kw_only=True)
class Layout:
    dp: int
    tp: int
    pp: int
    sp: int
    sp_method: str
    ulysses_degree: int | None
    linear_exchange: str
    zero_stage: int
    activation_checkpointing: str
    micro_batch: int

    @classmethod
    def of(cls, cfg: RunConfig) -> "Layout":
        p = cfg.parallel
        return cls(dp=p.dp, tp=p.tp, pp=p.pp, sp=p.sp, sp_method=p.sp_method, ulysses_degree=p.ulysses_degree,
                   linear_exchange=cfg.model.linear_sp_exchange, zero_stage=cfg.train.zero_stage,
                   activation_checkpointing=cfg.model.activation_checkpointing, micro_batch=cfg.train.micro_batch)

    def short(self) -> str:
        method = f"{self.sp_method}{self.ulysses_degree or ''}" if self.sp > 1 else "-"
        return (f"dp{self.dp} tp{self.tp} pp{self.pp} sp{self.sp} {method} {self.linear_exchange} "
                f"z{self.zero_stage} {self.activation_checkpointing} mb{self.micro_batch}")


def with_layout(cfg: RunConfig, layout: Layout) -> RunConfig:
    """`cfg` under `layout`; raises ConfigError (or the model's ValueError) where the checks refuse it."""
    parallel = dataclasses.replace(cfg.parallel, dp=layout.dp, tp=layout.tp, pp=layout.pp, sp=layout.sp,
                                   sp_method=layout.sp_method, ulysses_degree=layout.ulysses_degree,
                                   pp_split=cfg.parallel.pp_split if layout.pp == cfg.parallel.pp else None)
    model = dataclasses.replace(cfg.model, linear_sp_exchange=layout.linear_exchange,
                                activation_checkpointing=layout.activation_checkpointing)
    train = dataclasses.replace(cfg.train, zero_stage=layout.zero_stage, micro_batch=layout.micro_batch)
    return dataclasses.replace(cfg, parallel=parallel, model=model, train=train)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _sequence_choices(sp: int, has_linear: bool, own_exchange: str) -> list[tuple[str, int | None, str]]:
    """(sp_method, ulysses_degree, linear exchange) worth telling apart at this sp."""
    if sp == 1:  # nothing crosses ranks: one choice stands for all
        return [("ulysses", None, own_exchange)]
    methods: list[tuple[str, int | None]] = [(m, None) for m in get_args(SoftmaxMethod) if m != "usp"]
    methods += [("usp", u) for u in _divisors(sp) if 1 < u < sp]
    exchanges = get_args(StateExchange) if has_linear else (own_exchange,)
    return [(m, u, x) for (m, u), x in itertools.product(methods, exchanges)]


def candidate_layouts(cfg: RunConfig, gpus: int) -> list[Layout]:
    """Every combination of choices on `gpus` ranks, before the checks."""
    has_linear = any(cfg.model.mixer(i) != "S" for i in range(cfg.model.n_layers))
    out = []
    for dp, tp, pp in itertools.product(_divisors(gpus), repeat=3):
        if gpus % (dp * tp * pp):
            continue
        sp = gpus // (dp * tp * pp)
        for (method, ulysses, exchange), zero, mode, micro in itertools.product(
                _sequence_choices(sp, has_linear, cfg.model.linear_sp_exchange), range(4), get_args(Recompute),
                _divisors(max(cfg.train.global_batch // dp, 1))):
            out.append(Layout(dp=dp, tp=tp, pp=pp, sp=sp, sp_method=method, ulysses_degree=ulysses,
                              linear_exchange=exchange, zero_stage=zero, activation_checkpointing=mode,
                              micro_batch=micro))
    return out


def accepted_layouts(cfg: RunConfig, gpus: int) -> list[RunConfig]:
    """`cfg` under every layout of `gpus` ranks its checks accept."""
    accepted = []
    for layout in candidate_layouts(cfg, gpus):
        try:
            accepted.append(with_layout(cfg, layout))
        except ValueError:  # ConfigError, or LlamaArgs' own check
            continue
    return accepted
