"""Scale on paper: `ithaca plan`'s predicted throughput on H100 clusters, and beside it the published figures.

Every number here is a plan row (launcher/plan: make_plan over layouts the config check accepts); this
module only chooses which layouts to ask about and prints the answers. For each series (a model with
one sp method, or a linear model with one state exchange), GPU count (8 to 1024, 8 per node) and
sequence length (32K to 4M tokens, one sequence per dp rank), it asks the plan about every
sp x dp split (tp = pp = 1, sp >= 2 so the method matters), ZeRO 1 and 3, selective and full
checkpointing, and keeps the fastest that fits (or, when none fits, the smallest peak, to name what breaks).

Validated on the CPU (bench/RESULTS.md, plan_check): per-rank memory within 10% and sp bytes equal to
the counted bytes. Not validated: every step time and tokens/s figure (no GPU run yet; the device
efficiency 0.4 and link figures are assumptions), and memory on a GPU (bf16, other kernels).

Run:  python -m ithaca.bench.scale [--png bench/scale.png] [--gpus 8 64 ...] [--seq-lens 32768 ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
from dataclasses import dataclass

from ithaca.launcher.config.load import load_config
from ithaca.launcher.config.schema import RunConfig
from ithaca.launcher.plan.devices import DEVICES, GIB
from ithaca.launcher.plan.layouts import Layout, with_layout
from ithaca.launcher.plan.report import Plan, best_first, make_plan

K = 1024
GPUS = (8, 16, 32, 64, 128, 256, 512, 1024)
SEQ_LENS = (32 * K, 128 * K, 512 * K, 1024 * K, 2048 * K, 4096 * K)
GPUS_PER_NODE = 8
DEVICE = DEVICES["h100"]
ZERO_STAGES = (1, 3)
CHECKPOINTING = ("selective", "full")

LLAMA_8B = ["model.dim=4096", "model.n_layers=32", "model.n_heads=32", "model.n_kv_heads=8", "model.ffn_dim=14336",
            "model.vocab_size=128256"]
"""Llama-3.1-8B's shape on the llama-1b-32k config (bf16)."""
MODELS: dict[str, tuple[str, list[str]]] = {
    "llama-8b": ("llama-1b-32k", LLAMA_8B),
    "llama-1b": ("llama-1b-32k", []),
    "gla-1b": ("linear-llama-1b-128k", []),  # every layer gated linear attention, GLA-style
}
LINEAR_MODELS = {"gla-1b"}
"""Models without softmax layers: their series differ by state exchange, not sp method."""


@dataclass(frozen=True)
class Series:
    model: str
    sp_method: str
    linear_exchange: str

    @property
    def name(self) -> str:
        return f"{self.model} {self.linear_exchange if self.model in LINEAR_MODELS else self.sp_method}"


SERIES = (*(Series("llama-8b", m, "allgather") for m in ("ulysses", "ring", "usp", "allgather")),
          *(Series("gla-1b", "allgather", x) for x in ("allgather", "scan")))
"""An all-linear model's sp_method only lays out the sequence: allgather keeps each rank's part contiguous
and, unlike Ulysses, has no heads limit."""


@functools.lru_cache(maxsize=None)
def base_config(model: str) -> RunConfig:
    name, overrides = MODELS[model]
    return load_config(name, ["data.path=unused", *overrides])


def config_at(model: str, seq_len: int, dp: int) -> RunConfig:
    """The model's config at `seq_len` tokens, one sequence per dp rank (the layout is set after)."""
    cfg = base_config(model)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=seq_len),
                               train=dataclasses.replace(cfg.train, global_batch=dp, micro_batch=1))


def plan_of(model: str, seq_len: int, layout: Layout, gpus: int) -> Plan | None:
    """The plan's row for `layout`, or None where the config check refuses it."""
    try:
        cfg = with_layout(config_at(model, seq_len, layout.dp), layout)
    except ValueError:  # ConfigError, or LlamaArgs' own check
        return None
    return make_plan(cfg, DEVICE, gpus, GPUS_PER_NODE)


def _powers_of_two(top: int) -> list[int]:
    return [2**i for i in range(1, top.bit_length()) if top % 2**i == 0]


def candidates(series: Series, gpus: int, sps: list[int] | None = None) -> list[Layout]:
    """The layouts asked about: sp x dp = gpus, the series' method (usp: each Ulysses degree)."""
    out = []
    for sp, zero, mode in itertools.product(sps or _powers_of_two(gpus), ZERO_STAGES, CHECKPOINTING):
        ulysses = [u for u in _powers_of_two(sp) if u < sp] if series.sp_method == "usp" else [None]
        out += [Layout(dp=gpus // sp, tp=1, pp=1, sp=sp, sp_method=series.sp_method, ulysses_degree=u,
                       linear_exchange=series.linear_exchange, zero_stage=zero, activation_checkpointing=mode,
                       micro_batch=1) for u in ulysses]
    return out


@dataclass(frozen=True)
class ScaleRow:
    series: Series
    gpus: int
    seq_len: int
    plan: Plan | None
    """The fastest plan that fits, else the one with the smallest peak; None where the config check refuses
    every layout."""


def best_row(series: Series, gpus: int, seq_len: int, sps: list[int] | None = None) -> ScaleRow:
    plans = [p for p in (plan_of(series.model, seq_len, layout, gpus) for layout in candidates(series, gpus, sps))
             if p is not None]
    fitting = best_first([p for p in plans if p.fits])
    closest = min(plans, key=lambda p: p.memory.total, default=None)
    return ScaleRow(series, gpus, seq_len, fitting[0] if fitting else closest)


def scale_rows(series: tuple[Series, ...] = SERIES, gpus: tuple[int, ...] = GPUS,
               seq_lens: tuple[int, ...] = SEQ_LENS) -> list[ScaleRow]:
    return [best_row(s, g, n) for s, g, n in itertools.product(series, gpus, seq_lens)]


def tokens_label(n: int) -> str:
    return f"{n // (K * K)}M" if n % (K * K) == 0 else f"{n // K}K"


def speed(plan: Plan | None) -> str:
    """Predicted tokens/s/GPU, or why there is none: the config check refuses, or the term that breaks it."""
    if plan is None:
        return "refused"
    if not plan.fits:
        term = plan.memory.largest
        return f"no fit ({term} {plan.memory.as_dict()[term] / GIB:.0f} GiB)"
    return f"{plan.time.tokens_per_s_per_gpu:,.0f}"


def scale_table(rows: list[ScaleRow]) -> str:
    """Markdown: predicted tokens/s/GPU, one line per series and GPU count, one column per length."""
    lengths = sorted({r.seq_len for r in rows})
    lines = ["| series | GPUs | " + " | ".join(tokens_label(n) for n in lengths) + " |",
             "|---|---|" + "---|" * len(lengths)]
    by_key = {(r.series, r.gpus, r.seq_len): r for r in rows}
    for series, gpus in dict.fromkeys((r.series, r.gpus) for r in rows):
        lines.append(f"| {series.name} | {gpus} | "
                     + " | ".join(speed(by_key[series, gpus, n].plan) for n in lengths) + " |")
    return "\n".join(lines)


def chart(rows: list[ScaleRow], path: str) -> None:
    """One panel per series: predicted tokens/s/GPU against GPUs, a line per sequence length (fits only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = list(dict.fromkeys(r.series for r in rows))
    fig, axes = plt.subplots(2, (len(series) + 1) // 2, figsize=(5 * ((len(series) + 1) // 2), 8), squeeze=False)
    for ax, s in zip(axes.flat, series):
        for n in sorted({r.seq_len for r in rows}):
            points = [(r.gpus, r.plan.time.tokens_per_s_per_gpu) for r in rows
                      if r.series == s and r.seq_len == n and r.plan is not None and r.plan.fits]
            if points:
                ax.plot(*zip(*points), marker="o", label=tokens_label(n))
        ax.set(title=s.name, xscale="log", yscale="log", xlabel="H100 GPUs", ylabel="tokens/s/GPU (predicted)")
        ax.set_xticks(sorted({r.gpus for r in rows}), [str(g) for g in sorted({r.gpus for r in rows})])
        ax.legend(title="sequence", fontsize=8)
    for ax in list(axes.flat)[len(series):]:
        ax.set_visible(False)
    fig.suptitle("ithaca plan: predicted throughput on H100 (step times unvalidated)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def longest_fit(model: str, gpus: int, step: int = 16 * K, most: int = 32 * K * K) -> tuple[int, Plan | None]:
    """The longest seq_len (a multiple of `step`, up to `most`) for which some layout on `gpus` ranks fits:
    every sp method, sp = gpus (one sequence over all), ZeRO 1 and 3, selective and full; (0, None) if
    none fits at `step`. Fitting is monotone in the length for a fixed layout, so a bisection finds it."""
    def fitting(seq_len: int) -> Plan | None:
        rows = [best_row(Series(model, m, "allgather"), gpus, seq_len, sps=[gpus])
                for m in (("ulysses", "ring", "usp", "allgather") if gpus > 1 else ("ulysses",))]
        fits = [r.plan for r in rows if r.plan is not None and r.plan.fits]
        return best_first(fits)[0] if fits else None

    low, high = 0, most // step + 1  # fits at low * step (or low = 0), not at high * step
    best = None
    while high - low > 1:
        mid = (low + high) // 2
        plan = fitting(mid * step)
        if plan is None:
            high = mid
        else:
            low, best = mid, plan
    return low * step, best


@dataclass(frozen=True)
class Published:
    claim: str
    published: str
    source: str
    predicted: str
    plan_rows: str
    """How the prediction was made (which layouts)."""


def _speed(model: str, method: str, exchange: str, gpus: int, seq_len: int, sp: int) -> Plan | None:
    """The plan's fastest row with sp = `sp` (1: data parallelism alone) that fits, else its smallest peak."""
    return best_row(Series(model, method, exchange), gpus, seq_len, sps=[sp]).plan


def _ratio(a: Plan, b: Plan) -> float:
    """a's predicted tokens/s/GPU over b's (both must fit: a comparison with a layout that does not is no answer)."""
    if not (a.fits and b.fits):
        raise RuntimeError(f"no layout fits: {a.layout.short()} ({speed(a)}) or {b.layout.short()} ({speed(b)})")
    return a.time.tokens_per_s_per_gpu / b.time.tokens_per_s_per_gpu


def published_comparison() -> list[Published]:
    """The plan's predictions for the setups of published results (issue #24 deliverable 5)."""
    out = []
    dp = _speed("gla-1b", "allgather", "allgather", 256, 32 * K, 1)
    scan = _speed("gla-1b", "allgather", "scan", 256, 256 * 32 * K, 256)
    gather = _speed("gla-1b", "allgather", "allgather", 256, 256 * 32 * K, 256)
    out.append(Published(
        "ZeCO (All-Scan) and LASP-2 throughput as a share of data parallelism, 1B GLA, 32K tokens per GPU, 256 GPUs",
        "ZeCO 88%, LASP-2 55%",
        "issue #24's figures; the ZeCO abstract (arXiv 2507.01004) gives their ratio: 60% faster than the "
        "SOTA SP method on 256 GPUs at 8M (0.88 / 0.55 = 1.60); the 88% and 55% themselves not found in the "
        "sources searched",
        f"scan {_ratio(scan, dp):.0%}, allgather {_ratio(gather, dp):.0%} (scan / allgather = {_ratio(scan, gather):.2f})",
        f"gla-1b sp256 at 8M ({scan.layout.short()} / {gather.layout.short()}) against dp256 at 32K "
        f"({dp.layout.short()})"))
    lasp = _speed("gla-1b", "allgather", "allgather", 64, 2048 * K, 64)
    serial = _speed("gla-1b", "allgather", "scan", 64, 2048 * K, 64)
    ring = _speed("llama-1b", "ring", "allgather", 64, 2048 * K, 64)
    out.append(Published(
        "LASP-2 against ring attention and against LASP-1, Linear-Llama3-1B, 2048K tokens, 64 GPUs",
        "LASP-2 +36.6% over Ring Attention, +15.2% over LASP-1",
        "LASP-2 abstract (arXiv 2502.07563)",
        f"over ring: {_ratio(lasp, ring) - 1:+.1%}; over the scan: {_ratio(lasp, serial) - 1:+.1%}",
        f"gla-1b sp64 allgather ({lasp.layout.short()}) against llama-1b, the same shape with softmax layers, sp64 "
        f"ring ({ring.layout.short()}): the plan's ring runs softmax attention (quadratic), not comparable if the "
        f"paper's ring ran linear attention; the scan ({serial.layout.short()}) is the plan's nearest to LASP-1's "
        "serial state passing (its wait along the chain of 64 ranks charged, one hop after another)"))
    torchtitan = {32 * K: (1, "3,890"), 64 * K: (2, "2,540"), 128 * K: (4, "1,071"), 256 * K: (8, "548")}
    for seq_len, (cp, theirs) in torchtitan.items():
        plan = _speed("llama-8b", "ring", "allgather", 8, seq_len, cp)
        out.append(Published(
            f"torchtitan FSDP + context parallelism, Llama-3.1-8B, {tokens_label(seq_len)} tokens, 8 H100, "
            f"CP {cp} x FSDP {8 // cp}", f"{theirs} tokens/s/GPU",
            "pytorch/torchtitan benchmarks/llama3_h100_202412_torchtitan.md, Table 2 (torch.compile and Float8, "
            "full activation checkpointing, local batch 1, H100 95 GB at a lower TDP)",
            f"{speed(plan)} tokens/s/GPU" if plan.fits else speed(plan),
            f"llama-8b {f'sp{cp} ring' if cp > 1 else 'dp8'} ({plan.layout.short()}): bf16 at the device table's efficiency; Float8 "
            "matmuls, which the plan does not model, run faster"))
    alst = {1: "500K", 8: "3.7M", 32: "15M"}
    for gpus, theirs in alst.items():
        length, plan = longest_fit("llama-8b", gpus)
        out.append(Published(
            f"ALST's longest sequence, Llama-8B, {gpus} H100", theirs,
            "ALST abstract (arXiv 2506.13996) and Snowflake's engineering blog",
            f"{length:,} tokens" if plan else "none fits at 16K",
            f"llama-8b, sp = {gpus}, every sp method, ZeRO 1/3, selective/full, 16K steps"
            + (f" ({plan.layout.short()})" if plan else "")))
    return out


def published_table(rows: list[Published]) -> str:
    lines = ["| setup | published | source | plan predicts | plan rows |", "|---|---|---|---|---|"]
    lines += [f"| {r.claim} | {r.published} | {r.source} | {r.predicted} | {r.plan_rows} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--png", default="bench/scale.png", help="where the chart goes")
    parser.add_argument("--gpus", type=int, nargs="+", default=list(GPUS))
    parser.add_argument("--seq-lens", type=int, nargs="+", default=list(SEQ_LENS))
    parser.add_argument("--no-published", action="store_true", help="skip the comparison with published figures")
    args = parser.parse_args(argv)
    if min(args.gpus) < 2 or min(args.seq_lens) < 1:
        parser.error("use --gpus of 2 or more (sp >= 2) and --seq-lens of 1 or more tokens")
    rows = scale_rows(gpus=tuple(args.gpus), seq_lens=tuple(args.seq_lens))
    chart(rows, args.png)
    print(f"Predicted tokens/s/GPU on H100 ({GPUS_PER_NODE} per node; chart: {args.png}):\n")
    print(scale_table(rows))
    if not args.no_published:
        print("\nThe plan beside published figures:\n")
        print(published_table(published_comparison()))


if __name__ == "__main__":
    main()
