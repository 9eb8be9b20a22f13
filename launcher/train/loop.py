"""The training loop: one DeepSpeed step per global batch, logged, tracked and checkpointed.

A step, from shard to loss: the loader's whole micro-batches (data/loader.py: packed windows made
Batches, data/batch.py) -> `train_step`: this rank's piece of each (`Batch.part`, the mesh's
sequence layout), the global real-token count and the loss scale (parallel/loss_scale.py: the
rule of DESIGN.md, "Loss and counts under SP") -> forward and backward through the DeepSpeed
engine: the model (models/llama.py) or, with pp > 1, the pipeline stages (parallel/pipeline.py,
1F1B) -> the update.

`run_training` reads in one screen: `set_up` (process groups, model, engine), `resume_state`,
then per step `run_step` (the step and the non-finite guard's verdict), `log_step` and
`save_if_due`. After each step every rank agrees whether its loss and gradient norm were finite,
and goes on, skips or stops together (launcher/train/nonfinite.py, `train.on_nonfinite`); a bad
step is never checkpointed.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
import yaml

from ithaca.data.batch import Batch
from ithaca.data.loader import PackedLoader, Source
from ithaca.data.remote import shard_folder
from ithaca.launcher.checkpoint.reshard import checkpoint_facts
from ithaca.launcher.checkpoint.store import load_checkpoint, save_checkpoint
from ithaca.launcher.config.schema import RunConfig
from ithaca.launcher.eval.run import TrainingEval
from ithaca.launcher.runtime import faults
from ithaca.launcher.runtime.distributed import init_distributed, restart_attempt
from ithaca.launcher.runtime.preemption import StopOnSignal, clear_marker, write_marker
from ithaca.launcher.runtime.watchdog import StepWatchdog
from ithaca.launcher.tracking.journal import newest_run_key
from ithaca.launcher.tracking.tracker import Tracker
from ithaca.launcher.train.engine import build_engine
from ithaca.launcher.train.metrics import StepMeter
from ithaca.launcher.train.nonfinite import NonFiniteGuard
from ithaca.log import get_logger
from ithaca.parallel.loss_scale import loss_scale
from ithaca.parallel.mesh import ParallelMesh
from ithaca.parallel.parallelize import parallelize_llama

log = get_logger(__name__)


@dataclass(frozen=True)
class StepRecord:
    step: int
    loss: float
    lr: float
    grad_norm: float
    tokens: int
    seconds: float


def train_step(engine: deepspeed.DeepSpeedEngine, micro_batches: list[Batch], mesh: ParallelMesh,
               device: torch.device, before_update: Callable[[float], None] | None = None) -> tuple[float, int]:
    """Forward/backward every micro-batch and update; returns (global mean token loss, global token count).

    `micro_batches`: this dp rank's whole Batches of the step (every sp rank of a replica holds the
    same; each takes its piece here). `before_update(loss)` runs on every rank after the last
    backward and before the update, with the global loss (pp = 1 only: the pipeline engine updates
    inside `train_batch`). The two branches differ only where DeepSpeed's engines do: the pipeline
    engine runs every micro-batch and the update in one call, its last stage's loss function
    applying the scale.
    """
    pieces = [b.part(mesh.sequence, sp_rank=mesh.rank("sp")).to(device) for b in micro_batches]
    count = torch.tensor([sum(b.real_tokens for b in pieces)], dtype=torch.float64, device=device)
    dist.all_reduce(count, group=mesh.group("dp_sp"))  # each token once: tp ranks and stages hold copies
    global_tokens = count.item()
    pipelined = mesh.pp > 1
    scale = loss_scale(mesh, pipelined=pipelined, micro_batches=len(pieces), global_tokens=global_tokens)
    loss_sum = torch.zeros(1, dtype=torch.float64, device=device)
    if pipelined:
        loss_fn = engine.module.loss_fn
        loss_fn.start_step(scale)
        engine.train_batch(iter([b.pipeline_inputs() for b in pieces]))
        if engine.is_last_stage():
            loss_sum[0] = loss_fn.step_sum
        dist.all_reduce(loss_sum, group=mesh.group("pp"))  # the last stage's sum, to every stage
    else:
        for i, piece in enumerate(pieces):
            losses = engine(piece).sum()
            engine.backward(losses * scale)
            loss_sum += losses.detach().double()
            if i < len(pieces) - 1:
                engine.step()  # inside the accumulation DeepSpeed only counts the micro-batch
    dist.all_reduce(loss_sum, group=mesh.group("dp_sp"))  # before the update, for before_update
    loss = loss_sum.item() / global_tokens
    if not pipelined:
        if before_update is not None:
            before_update(loss)
        engine.step()  # the accumulation boundary: the update
    return loss, int(global_tokens)


@dataclass(frozen=True)
class Run:
    """What every step of a run uses, made once by `set_up`."""

    cfg: RunConfig
    mesh: ParallelMesh
    device: torch.device
    engine: deepspeed.DeepSpeedEngine
    meter: StepMeter
    output: Path
    config_yaml: str
    rank: int


def run_training(cfg: RunConfig, *, resume: str | None = None) -> list[StepRecord]:
    """Train `cfg` in an initialized torchrun environment; returns rank 0's step records."""
    run = set_up(cfg, resume)
    step, loader_states, run_key = resume_state(run, resume)
    # Handlers first: the loader's worker processes are forked with them, so a stop signal sent to
    # every process of the job (as SLURM does) does not kill them under the training process.
    stopper = StopOnSignal()
    loader, tracker, watchdog, records, status = None, None, None, [], "FAILED"
    try:
        watchdog = StepWatchdog(run.output, run.rank, cfg.train.step_timeout)
        loader = build_loader(cfg, run.mesh, loader_states)
        tracker = Tracker(cfg, run.config_yaml, run_key) if run.rank == 0 else None
        guard = NonFiniteGuard(cfg, run.engine, dist.group.WORLD, run.device)  # after a resume: it reads skipped_steps
        evaluator = None if cfg.eval.every is None else TrainingEval(cfg, run.engine, run.mesh, run.device,
                                                                     run.output, run.rank)
        while step < cfg.train.steps:
            step += 1
            watchdog.begin(step)
            record, speed = run_step(run, loader, guard, step)
            records.append(record)
            log_step(run, record, speed, guard.skipped, loader, tracker)
            if evaluator:
                evaluator.after_step(step, tracker)  # forward only: the weights and the next steps are untouched
            stop = stopper.agreed(run.device) if step < cfg.train.steps else None
            save_if_due(run, step, stop, loader, tracker)
            watchdog.end(step)
            if stop:
                if run.rank == 0:
                    write_marker(run.output, step, stop)
                log.info(f"stopped by {stop.name} at step={step} after its checkpoint; continue with --resume")
                break
        status = "KILLED" if step < cfg.train.steps else "FINISHED"
    finally:
        if watchdog:
            watchdog.close()
        if loader:
            loader.close()
        stopper.restore()
        if tracker:
            tracker.finish(status)
    return records


def set_up(cfg: RunConfig, resume: str | None) -> Run:
    """Process groups and mesh, the output folder with the resolved config, the model and its engine."""
    p = cfg.parallel
    ctx = init_distributed(dp=p.dp, pp=p.pp, tp=p.tp, sequence=cfg.sequence,
                           collective_timeout=cfg.train.collective_timeout)
    rank = dist.get_rank()
    config_yaml = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    output = Path(cfg.train.output_dir)
    if rank == 0:
        output.mkdir(parents=True, exist_ok=True)
        clear_marker(output)
        (output / "config.yaml").write_text(config_yaml)
        log.info(f"resolved config:\n{config_yaml}")
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    # A resumed run's weights come from its checkpoint: model.init_from's folder is not read again.
    model_args = cfg.model if resume is None else dataclasses.replace(cfg.model, init_from=None)
    model = parallelize_llama(model_args, ctx.mesh, seed=cfg.train.seed, dtype=dtype,
                              pp_split=None if p.pp_split is None else list(p.pp_split))
    engine = build_engine(cfg, model, ctx.mesh)
    meter = StepMeter(cfg.model, cfg.data.seq_len, ctx.device, dist.get_world_size(), cfg.train.peak_tflops)
    return Run(cfg=cfg, mesh=ctx.mesh, device=ctx.device, engine=engine, meter=meter, output=output,
               config_yaml=config_yaml, rank=rank)


def resume_state(run: Run, resume: str | None) -> tuple[int, list[dict] | None, str | None]:
    """(the last step done, every dp rank's loader state, the tracking run key to continue): from the
    checkpoint `resume` names, else a fresh start."""
    if resume is not None:
        # verified; 'latest' may fall back; another layout's checkpoint is resharded (launcher/checkpoint/reshard.py)
        path, client = load_checkpoint(run.engine, run.cfg.checkpoint_dir, resume, cfg=run.cfg, mesh=run.mesh)
        log.info(f"resumed from {path} at step={client['step']}")
        return client["step"], client["loader"], client["tracking_run_key"]  # the journal's key (tracking/tracker.py)
    if run.rank == 0 and restart_attempt() > 0:
        # torchrun restarted the job before its first checkpoint: continue the same MLflow run, whose
        # journal drops the replayed steps (they are bit-identical, as after any resume)
        return 0, None, newest_run_key(run.output)
    return 0, None, None


def run_step(run: Run, loader: PackedLoader, guard: NonFiniteGuard,
             step: int) -> tuple[StepRecord, dict[str, float]]:
    """Step `step` and the guard's verdict on it: (its record, its memory and speed figures).
    Raises NonFiniteStep, on every rank at once, when the verdict is to stop."""
    faults.at_step_start(step, run.rank)  # tests only (ITHACA_TEST_FAULT): nothing otherwise
    start = time.perf_counter()
    batches = loader.next_batches()
    loss, tokens = train_step(run.engine, batches, run.mesh, run.device, guard.before_update)
    seconds = time.perf_counter() - start
    speed = run.meter.read(tokens, seconds)  # peak memory, and MFU where the device's peak is known
    norm = run.engine.get_global_grad_norm()  # None: fp32 without ZeRO computes none
    grad_norm = None if norm is None else float(norm)
    verdict = guard.after_step(step, loss, grad_norm, run.engine.was_step_applied())  # collective
    if verdict.action == "stop":
        bad_gradient = verdict.bad_gradient
        if bad_gradient is None and run.mesh.pp == 1:
            # The update was skipped: the same step at the same weights, looked at before its update.
            train_step(run.engine, batches, run.mesh, run.device, lambda _: guard.look_for_bad_gradient())
            bad_gradient = guard.gather_bad_gradient()
        raise verdict.error(bad_gradient)
    record = StepRecord(step=step, loss=loss, lr=run.engine.get_lr()[0], grad_norm=grad_norm or 0.0,
                        tokens=tokens, seconds=seconds)
    return record, speed


def log_step(run: Run, record: StepRecord, speed: dict[str, float], skipped: int, loader: PackedLoader,
             tracker: Tracker | None) -> None:
    """The step line (every train.log_every steps and the last) and the tracker's metrics (every step)."""
    cfg, step, tok_s = run.cfg, record.step, record.tokens / record.seconds
    if step % cfg.train.log_every == 0 or step == cfg.train.steps:
        log.info(f"step={step} loss={record.loss:.4f} lr={record.lr:.3e} grad_norm={record.grad_norm:.3f} "
                 f"tok_s={tok_s:.0f} s_step={record.seconds:.3f} "
                 + " ".join(f"{k}={v:.3f}" for k, v in speed.items())
                 + (f" skipped_steps={skipped}" if skipped else ""))
    data_metrics = _data_metrics(cfg, loader, run.mesh, run.device, step)
    if tracker:
        tracker.log_step(step, {"loss": record.loss, "lr": record.lr, "grad_norm": record.grad_norm,
                                "skipped_steps": skipped, "tokens_per_s": tok_s, "s_per_step": record.seconds,
                                **speed, **data_metrics})


def save_if_due(run: Run, step: int, stop: signal.Signals | None, loader: PackedLoader,
                tracker: Tracker | None) -> None:
    """A checkpoint (collective) every checkpoint.every steps, at the last step and before a stop."""
    every = run.cfg.checkpoint.every
    if stop or step == run.cfg.train.steps or (every and step % every == 0):
        client = {"step": step, "loader": _gather_loader_states(loader, run.mesh),
                  "tracking_run_key": tracker.run_id if tracker else None, **checkpoint_facts(run.cfg)}
        path = save_checkpoint(run.engine, run.cfg.checkpoint_dir, step, client, keep=run.cfg.checkpoint.keep)
        log.info(f"checkpoint step={step} path={path}")


def build_loader(cfg: RunConfig, mesh: ParallelMesh, states: list[dict] | None) -> PackedLoader:
    """This rank's loader; `states` (one per dp rank of the run that saved them, from a checkpoint) continue
    where they stopped, under this run's dp x data.workers whatever theirs was (data/resplit.py)."""
    d = cfg.data
    return PackedLoader([Source(shard_folder(p), w) for p, w in d.sources.items()], seq_len=d.seq_len,
                        micro_batch=cfg.train.micro_batch, grad_accum=cfg.grad_accum_steps, dp=mesh.dp,
                        dp_rank=mesh.rank("dp"), workers=d.workers, seed=cfg.train.seed, shuffle=d.shuffle,
                        on_error=d.on_error, document_mask=d.document_mask, state=states)


def _gather_loader_states(loader: PackedLoader, mesh: ParallelMesh) -> list[dict]:
    """Every dp rank's loader position (tp and sp ranks of a replica hold the same one): the whole list
    is what a resumed run needs to re-divide the epoch under another dp x data.workers."""
    states = [None] * mesh.dp
    dist.all_gather_object(states, loader.state_dict(), group=mesh.group("dp"))
    return states


def _data_metrics(cfg: RunConfig, loader: PackedLoader, mesh: ParallelMesh, device: torch.device,
                  step: int) -> dict[str, float]:
    metrics = {"tokens_seen": step * cfg.train.global_batch * cfg.data.seq_len, "data_epoch": loader.epoch}
    if cfg.data.on_error == "skip":  # a collective on every rank, only when there can be something to count
        skipped = torch.tensor([loader.skipped_shards], dtype=torch.float64, device=device)
        dist.all_reduce(skipped, group=mesh.group("dp"))
        metrics["data_skipped_shards"] = skipped.item()
    return metrics
