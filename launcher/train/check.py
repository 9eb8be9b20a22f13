"""`ithaca check`: a few steps of the configured layout beside one process training the same
function, compared step by step (the loss and every parameter's gradient norm).

A layout that trains, logs a plausible loss and is wrong (Ulysses gradients scaled by sp, the sp
sum of a gradient dropped, a loss that changes with sp under accumulation) is invisible in a
loss curve; next to its single-process twin it is not.

The twin: dp = tp = pp = sp = 1, ZeRO off, the same seed (so the same weights: every part is drawn
from its own seed, models/init.py) and the same global batches (the loader's batches depend on
its stream count dp x max(data.workers, 1) alone, so the twin reads that many streams with dp=1).
Both sides run in fp32, whatever train.precision says: bf16 rounds each op at ~4e-3, which would
need a tolerance wide enough to hide a small layout error; what is checked is the layout (splits,
collectives, scales), not the precision. Everything else (ZeRO stage under the layout, clipping,
kernels, recomputation, the schedule) is as configured.

Gradient norms are read after the step's last backward and before the update, before clipping,
whole (launcher/train/grad_norms.py). The two runs are separate torchrun jobs started by the CLI (a
one-rank twin cannot share a job whose megatron-core and DeepSpeed groups are the layout's); each
writes its steps as JSON (`record_steps`), and `compare` reads them side by side.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ithaca.launcher.config.schema import RunConfig

DEFAULT_STEPS = 3
"""Step 1 compares gradients at the same weights; steps 2-3 also the updates made from them."""
LOSS_RTOL = 1e-4
"""Both sides are fp32 and differ only in reduction order (all-reduce sums, split matmuls): at most
9e-8 apart over 3 steps in 14 debug layouts (dp, tp, pp, sp of every method, ZeRO 1-3, linear
and hybrid models), ~1e-6 after 10 (tests/dist/test_layout_parity.py). A token counted twice in
a 256-token batch moves it by ~1/256."""
GRAD_RTOL = 1e-3
"""Each parameter's gradient norm: at most 2e-6 apart over 3 steps in the same 14 layouts (a
gated linear layer's gate bias, AdamW amplifying the weights' 1e-7 drift at a small gradient);
the whole-model norm was seen 4e-4 apart after 10 steps with retention decay, so --steps 10 stays
clear of false alarms. A gradient scaled by sp=2 is 50% off, one sp rank's share alone ~30%."""
LAYOUT_OVERRIDES = ("train.precision=fp32",)
"""All the check changes in the configured layout (see the module docstring)."""
@dataclass(frozen=True)
class StepGrads:
    loss: float
    grad_norms: dict[str, float]
    """Single-process parameter name -> its whole gradient's norm, before the update."""


def twin_overrides(cfg: RunConfig) -> list[str]:
    """`--set` items that turn the layout `cfg` into its one-process twin (same weights, same batches)."""
    streams = cfg.parallel.dp * max(cfg.data.workers, 1)
    return ["parallel.dp=1", "parallel.tp=1", "parallel.pp=1", "parallel.sp=1", "parallel.sp_method=ulysses",
            "parallel.ulysses_degree=null", "parallel.pp_split=null", "train.zero_stage=0", *LAYOUT_OVERRIDES,
            f"data.workers={streams}"]


def record_steps(cfg: RunConfig, steps: int) -> list[StepGrads]:
    """Train `steps` steps of `cfg` from its seed (no checkpoint, no tracking) in an initialized
    torchrun environment, reading every parameter's gradient norm before each update. Every rank
    returns the same records."""
    import torch  # heavy imports here: the parent process, which only compares, needs none of them

    from ithaca.launcher.runtime.distributed import init_distributed
    from ithaca.launcher.train.engine import build_engine
    from ithaca.launcher.runtime.faults import break_for_tests
    from ithaca.launcher.train.grad_norms import full_grad_norms
    from ithaca.launcher.train.loop import build_loader, train_step
    from ithaca.parallel.parallelize import parallelize_llama

    if cfg.train.precision != "fp32":
        raise ValueError(f"train.precision={cfg.train.precision}: the check compares fp32 runs; set it to fp32")
    p, n_layers = cfg.parallel, cfg.model.n_layers
    ctx = init_distributed(dp=p.dp, pp=p.pp, tp=p.tp, sequence=cfg.sequence,
                           collective_timeout=cfg.train.collective_timeout)
    mesh = ctx.mesh
    model = parallelize_llama(cfg.model, mesh, seed=cfg.train.seed, dtype=torch.float32,
                              pp_split=None if p.pp_split is None else list(p.pp_split))
    break_for_tests(model, mesh.sp, mesh.rank("sp"), n_layers)
    engine = build_engine(cfg, model, mesh)
    norms: dict[str, float] = {}

    def read_norms(_loss: float | None = None) -> None:
        norms.update(full_grad_norms(engine.module, mesh, n_layers))

    if mesh.pp > 1:
        run_before_pipeline_update(engine, read_norms)
    records, loader = [], build_loader(cfg, mesh, None)
    try:
        for _ in range(steps):
            loss, _ = train_step(engine, loader.next_batches(), mesh, ctx.device, read_norms)
            records.append(StepGrads(loss=loss, grad_norms=dict(norms)))
            norms.clear()
    finally:
        loader.close()
    return records


def record_to(path: Path, cfg: RunConfig, steps: int) -> None:
    """`record_steps` on every rank; rank 0 writes them to `path` (JSON) for `ithaca check` to compare."""
    import torch.distributed as dist

    records = record_steps(cfg, steps)
    if dist.get_rank() == 0:
        path.write_text(json.dumps([{"loss": r.loss, "grad_norms": r.grad_norms} for r in records]))


def run_before_pipeline_update(engine, hook: Callable[[], None]) -> None:
    """Run `hook` on every rank of a DeepSpeed PipelineEngine after a step's last backward and its
    gradient reductions (tied weights included), before the update.

    The pipeline engine runs forward, backward and update in one `train_batch`, dispatching each
    schedule instruction through the class's `_INSTRUCTION_MAP`; this engine gets its own copy of
    the map whose OptimizerStep calls `hook` first. OptimizerStep is the last instruction of every
    stage's schedule, so each rank's sends and receives are done when the hook communicates.
    """
    from deepspeed.runtime.pipe.schedule import OptimizerStep

    instructions = type(engine)._INSTRUCTION_MAP
    optimizer_step = instructions[OptimizerStep]

    def hooked_step(self, **kwargs) -> None:
        hook()
        optimizer_step(self, **kwargs)

    engine._INSTRUCTION_MAP = {**instructions, OptimizerStep: hooked_step}


def read_record(path: Path) -> list[StepGrads]:
    return [StepGrads(loss=r["loss"], grad_norms=r["grad_norms"]) for r in json.loads(path.read_text())]


def relative_difference(a: float, b: float) -> float:
    """|a - b| / max(|a|, |b|): 0 when both are 0, inf when either is not finite."""
    if not (math.isfinite(a) and math.isfinite(b)):
        return math.inf
    scale = max(abs(a), abs(b))
    return abs(a - b) / scale if scale else 0.0


@dataclass(frozen=True)
class StepComparison:
    step: int
    loss: float
    twin_loss: float
    grad_diffs: dict[str, float]
    """Parameter -> relative difference of its gradient norm, in the model's order."""

    @property
    def loss_diff(self) -> float:
        return relative_difference(self.loss, self.twin_loss)

    @property
    def worst(self) -> tuple[str, float]:
        """The parameter whose gradient norm differs most, and by how much."""
        return max(self.grad_diffs.items(), key=lambda item: item[1])

    @property
    def diverged(self) -> list[str]:
        """Parameters beyond GRAD_RTOL, nearest the loss first: a wrong gradient flows back into
        every layer before the one that made it, so the first of these is where it starts."""
        return [name for name, diff in reversed(self.grad_diffs.items()) if not diff <= GRAD_RTOL]

    @property
    def passed(self) -> bool:
        return self.loss_diff <= LOSS_RTOL and not self.diverged


def compare(layout: list[StepGrads], twin: list[StepGrads]) -> list[StepComparison]:
    """Step by step; raises ValueError if the two runs do not hold the same parameters."""
    comparisons = []
    for step, (ours, theirs) in enumerate(zip(layout, twin, strict=True), start=1):
        if ours.grad_norms.keys() != theirs.grad_norms.keys():
            only_ours = sorted(ours.grad_norms.keys() - theirs.grad_norms.keys())
            only_theirs = sorted(theirs.grad_norms.keys() - ours.grad_norms.keys())
            raise ValueError(f"step {step}: the layout's gradients are not the one process's: only in the layout "
                             f"{only_ours}, only in one process {only_theirs}")
        diffs = {name: relative_difference(ours.grad_norms[name], norm) for name, norm in theirs.grad_norms.items()}
        comparisons.append(StepComparison(step=step, loss=ours.loss, twin_loss=theirs.loss, grad_diffs=diffs))
    return comparisons


def format_table(comparisons: list[StepComparison]) -> str:
    rows = [f"{'step':>4}  {'loss layout':>12}  {'loss 1 proc':>12}  {'loss rel':>8}  {'grad rel max':>12}  parameter"]
    for c in comparisons:
        name, diff = c.worst
        rows.append(f"{c.step:>4}  {c.loss:>12.6f}  {c.twin_loss:>12.6f}  {c.loss_diff:>8.1e}  {diff:>12.1e}  {name}")
    return "\n".join(rows)


def first_divergence(comparisons: list[StepComparison]) -> str | None:
    """One line naming the first step beyond tolerance and what differs there; None if none is."""
    bad = next((c for c in comparisons if not c.passed), None)
    if bad is None:
        return None
    if not bad.loss_diff <= LOSS_RTOL:
        grads = f"; gradients first diverge at {bad.diverged[0]}" if bad.diverged else ""
        return (f"step {bad.step}: loss {bad.loss:.6g} under the layout, {bad.twin_loss:.6g} in one process "
                f"(relative difference {bad.loss_diff:.1e} > {LOSS_RTOL:.0e}): the forward pass or the loss "
                f"differs{grads}")
    name = bad.diverged[0]
    return (f"step {bad.step}: the gradient of {name} differs (its norm by {bad.grad_diffs[name]:.2g} relative > "
            f"{GRAD_RTOL:.0e}); {len(bad.diverged)} of {len(bad.grad_diffs)} parameters beyond tolerance, this "
            "one the nearest the loss")


@dataclass(frozen=True)
class CheckResult:
    layout: str
    """The layout's degrees, e.g. "dp=1 tp=1 pp=1 sp=2 sp_method=ulysses zero_stage=1"."""
    comparisons: list[StepComparison]

    @property
    def failure(self) -> str | None:
        """One line: the layout and where it first differs from one process; None if it does not."""
        found = first_divergence(self.comparisons)
        return None if found is None else f"{self.layout}: {found}"

    def report(self) -> str:
        """The table, and under it what passed when it did."""
        table = format_table(self.comparisons)
        if self.failure is not None:
            return table
        return (f"{table}\ncheck passed: {self.layout} matches one process over {len(self.comparisons)} steps (fp32; "
                f"loss within {LOSS_RTOL:.0e}, every parameter's gradient norm within {GRAD_RTOL:.0e})")


def run_check(config: str, overrides: list[str], steps: int, nproc: int | None,
              start: Callable[[int, list[str]], int]) -> CheckResult:
    """Run `steps` steps of the layout (on `nproc` processes, default its world size) and of its
    twin, each as `ithaca check --record` started by `start(nproc, argv)` (the CLI's torchrun
    starter), and compare them. Raises ConfigError before starting anything if either cannot run,
    ValueError if a run fails."""
    from ithaca.launcher.config.load import load_config
    from ithaca.launcher.config.preflight import check_kernels_here, preflight

    cfg = load_config(config, overrides)
    sides = {"layout": list(LAYOUT_OVERRIDES), "one process": twin_overrides(cfg)}
    nprocs = {"layout": nproc or cfg.parallel.world_size, "one process": 1}
    for side, extra in sides.items():
        side_cfg = load_config(config, [*overrides, *extra])
        check_kernels_here(side_cfg)
        preflight(side_cfg, nprocs[side])
    records = {}
    with tempfile.TemporaryDirectory(prefix="ithaca-check-") as tmp:
        for side, extra in sides.items():
            path = Path(tmp) / f"{side.replace(' ', '-')}.json"
            argv = ["check", "--config", config, *(f"--set={o}" for o in [*overrides, *extra]),
                    "--steps", str(steps), "--record", str(path)]
            code = start(nprocs[side], argv)
            if code != 0 or not path.is_file():
                raise ValueError(f"check: the {side} run failed (exit {code}); its output is above")
            records[side] = read_record(path)
    p = cfg.parallel
    layout = (f"dp={p.dp} tp={p.tp} pp={p.pp} sp={p.sp} sp_method={p.sp_method} "
              f"zero_stage={cfg.train.zero_stage}")
    return CheckResult(layout=layout, comparisons=compare(records["layout"], records["one process"]))
