"""The training loop: one DeepSpeed step per global batch, logged, tracked and checkpointed.

Loss under sequence and data parallelism (DESIGN.md, "Loss and counts under SP"): the loss is
the sum of token losses over every dp x sp rank and micro-batch, divided by the number of real
tokens in the global batch. Each rank backpropagates its share scaled so that DeepSpeed's own
averaging (÷ dp over the dp x sp reduction, ÷ dp x sp under the pipeline engine, ÷ micro-batches)
leaves exactly that gradient. With pp > 1 the pipeline engine runs the micro-batches (1F1B) and
the last stage's loss function applies the same scale (parallel/pipeline.py).

After each step every rank agrees whether its loss and gradient norm were finite, and stops or
skips together (launcher/train/nonfinite.py, `train.on_nonfinite`); a bad step is never checkpointed.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from ithaca.data.loader import PackedLoader, Source
from ithaca.data.packing import document_ids, document_positions, document_starts
from ithaca.launcher.checkpoint.store import load_checkpoint, save_checkpoint
from ithaca.launcher.config.schema import RunConfig
from ithaca.launcher.runtime.distributed import init_distributed, restart_attempt
from ithaca.launcher.train.engine import build_engine
from ithaca.launcher.runtime.faults import planned_fault
from ithaca.launcher.tracking.journal import newest_run_key
from ithaca.launcher.train.nonfinite import NonFiniteGuard
from ithaca.launcher.runtime.preemption import StopOnSignal, clear_marker, write_marker
from ithaca.launcher.checkpoint.reshard import checkpoint_facts
from ithaca.launcher.train.metrics import StepMeter
from ithaca.launcher.tracking.tracker import Tracker
from ithaca.launcher.runtime.watchdog import StepWatchdog
from ithaca.log import get_logger
from ithaca.parallel.mesh import ParallelMesh
from ithaca.parallel.parallelize import parallelize_llama
from ithaca.parallel.pipeline import gradient_divisor, micro_batch_inputs

log = get_logger(__name__)


@dataclass(frozen=True)
class StepRecord:
    step: int
    loss: float
    lr: float
    grad_norm: float
    tokens: int
    seconds: float


def sequence_slice(window: torch.Tensor, mesh: ParallelMesh, eos_id: int | None) -> list[torch.Tensor | None]:
    """A window [b, L+1] -> this sp rank's [tokens, labels, positions, doc_ids, resets], each
    [b, L/sp], in the layout its attention expects (parallel/sequence_layout.py).

    Labels are shifted on the whole window before the split, so the label at each part's edge is kept.
    With `eos_id`, documents are found on the whole window too: doc_ids mark them, resets their
    first tokens, and positions restart at each; without it those two are None and positions
    run 0..L-1.
    """
    tokens, labels = window[:, :-1], window[:, 1:]
    doc_ids = resets = None
    if eos_id is None:
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    else:
        doc_ids = document_ids(tokens, eos_id)
        positions, resets = document_positions(doc_ids), document_starts(doc_ids)
    return [None if t is None else mesh.sequence.part(t, sp_rank=mesh.rank("sp"))
            for t in (tokens, labels, positions, doc_ids, resets)]


def train_step(engine, micro_batches: list[torch.Tensor], mesh: ParallelMesh, device: torch.device,
               eos_id: int | None, before_update: Callable[[float], None] | None = None) -> tuple[float, int]:
    """Forward/backward every micro-batch and step; returns (global mean token loss, global token count).

    `eos_id` turns on document masking (see sequence_slice). `before_update(loss)` runs on every
    rank after the last backward and before the update, with the global loss (pp=1 only: the
    pipeline engine updates inside `train_batch`)."""
    slices = [[None if t is None else t.to(device) for t in sequence_slice(w, mesh, eos_id)] for w in micro_batches]
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # [loss sum, real-token count]
    sums[1] = sum(int((labels >= 0).sum()) for _, labels, *_ in slices)
    dist.all_reduce(sums[1:], group=mesh.group("dp_sp"))
    global_tokens = sums[1].item()
    # DeepSpeed averages the summed gradients (gradient_divisor) and divides by the micro-batch count.
    scale = gradient_divisor(mesh, pipelined=mesh.pp > 1) * len(slices) / global_tokens
    if mesh.pp > 1:
        loss_fn = engine.module.loss_fn
        loss_fn.start_step(scale)
        engine.train_batch(iter([micro_batch_inputs(*s) for s in slices]))
        sums[0] = loss_fn.step_sum if engine.is_last_stage() else 0.0
        dist.all_reduce(sums[:1], group=mesh.group("pp"))  # the last stage's sum, to every stage
        dist.all_reduce(sums[:1], group=mesh.group("dp_sp"))
        return sums[0].item() / global_tokens, int(global_tokens)
    for i, (tokens, labels, positions, doc_ids, resets) in enumerate(slices):
        loss_sum = engine(tokens, positions, labels, doc_ids, resets).sum()
        engine.backward(loss_sum * scale)
        sums[0] += loss_sum.detach().double()
        if i < len(slices) - 1:
            engine.step()  # inside the accumulation DeepSpeed only counts the micro-batch
    dist.all_reduce(sums[:1], group=mesh.group("dp_sp"))  # before the update, for before_update
    loss = sums[0].item() / global_tokens
    if before_update is not None:
        before_update(loss)
    engine.step()  # the accumulation boundary: the update
    return loss, int(global_tokens)


def run_training(cfg: RunConfig, *, resume: str | None = None) -> list[StepRecord]:
    """Train `cfg` in an initialized torchrun environment; returns rank 0's step records."""
    p = cfg.parallel
    ctx = init_distributed(dp=p.dp, pp=p.pp, tp=p.tp, sequence=cfg.sequence,
                           collective_timeout=cfg.train.collective_timeout)
    mesh, rank = ctx.mesh, dist.get_rank()
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
    model = parallelize_llama(model_args, mesh, seed=cfg.train.seed, dtype=dtype,
                              pp_split=None if p.pp_split is None else list(p.pp_split))
    engine = build_engine(cfg, model, mesh)
    meter = StepMeter(cfg.model, cfg.data.seq_len, ctx.device, dist.get_world_size(), cfg.train.peak_tflops)

    step, loader_states, run_id = 0, None, None
    if resume is not None:
        # verified; 'latest' may fall back; another layout's checkpoint is resharded (launcher/checkpoint/reshard.py)
        path, client = load_checkpoint(engine, cfg.checkpoint_dir, resume, cfg=cfg, mesh=mesh)
        # the tracking journal's run key (launcher/tracking/tracker.py); checkpoints before journals held the MLflow id
        step, loader_states = client["step"], client["loader"]
        run_id = client.get("tracking_run_key", client.get("mlflow_run_id"))
        log.info(f"resumed from {path} at step={step}")
    elif rank == 0 and restart_attempt() > 0:
        # torchrun restarted the job before its first checkpoint: continue the same MLflow run, whose
        # journal drops the replayed steps (they are bit-identical, as after any resume)
        run_id = newest_run_key(output)
    # Handlers first: the loader's worker processes are forked with them, so a stop signal sent to
    # every process of the job (as SLURM does) does not kill them under the training process.
    stopper = StopOnSignal()
    loader, tracker, watchdog, records, status = None, None, None, [], "FAILED"
    try:
        watchdog = StepWatchdog(output, rank, cfg.train.step_timeout)
        fault = planned_fault(rank)  # tests only (ITHACA_TEST_FAULT)
        loader = build_loader(cfg, mesh, loader_states)
        eos_id = loader.spec.manifests[0].tokenizer["eos_id"]
        mask_eos = eos_id if cfg.data.document_mask else None
        tracker = Tracker(cfg, config_yaml, run_id) if rank == 0 else None
        guard = NonFiniteGuard(cfg, engine, dist.group.WORLD, ctx.device)  # after a resume: it reads skipped_steps
        while step < cfg.train.steps:
            step += 1
            watchdog.begin(step)
            if fault:
                fault.at_step_start(step)
            start = time.perf_counter()
            batch = loader.next_step()
            loss, tokens = train_step(engine, batch, mesh, ctx.device, mask_eos, guard.before_update)
            seconds = time.perf_counter() - start
            speed = meter.read(tokens, seconds)  # peak memory, and MFU where the device's peak is known
            norm = engine.get_global_grad_norm()  # None: fp32 without ZeRO computes none
            grad_norm = None if norm is None else float(norm)
            # Collective: every rank stops (raises NonFiniteStep) or skips at the same step.
            recompute = None if mesh.pp > 1 else (
                lambda: train_step(engine, batch, mesh, ctx.device, mask_eos, lambda _: guard.look_for_bad_gradient()))
            guard.after_step(step, loss, grad_norm, engine.was_step_applied(), recompute)
            record = StepRecord(step=step, loss=loss, lr=engine.get_lr()[0], grad_norm=grad_norm or 0.0,
                                tokens=tokens, seconds=seconds)
            records.append(record)
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                log.info(f"step={step} loss={loss:.4f} lr={record.lr:.3e} grad_norm={record.grad_norm:.3f} "
                         f"tok_s={tokens / seconds:.0f} s_step={seconds:.3f} "
                         + " ".join(f"{k}={v:.3f}" for k, v in speed.items())
                         + (f" skipped_steps={guard.skipped}" if guard.skipped else ""))
            data_metrics = _data_metrics(cfg, loader, mesh, ctx.device, step)
            if tracker:
                tracker.log_step(step, {"loss": loss, "lr": record.lr, "grad_norm": record.grad_norm,
                                        "skipped_steps": guard.skipped, "tokens_per_s": tokens / seconds,
                                        "s_per_step": seconds, **speed, **data_metrics})
            stop = stopper.agreed(ctx.device) if step < cfg.train.steps else None
            every = cfg.checkpoint.every
            if stop or step == cfg.train.steps or (every and step % every == 0):
                client = {"step": step, "loader": _gather_loader_states(loader, mesh),
                          "tracking_run_key": tracker.run_id if tracker else None, **checkpoint_facts(cfg)}
                path = save_checkpoint(engine, cfg.checkpoint_dir, step, client, keep=cfg.checkpoint.keep)
                log.info(f"checkpoint step={step} path={path}")
            watchdog.end(step)
            if stop:
                if rank == 0:
                    write_marker(output, step, stop)
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


def build_loader(cfg: RunConfig, mesh: ParallelMesh, states: list[dict] | None) -> PackedLoader:
    """This rank's loader; `states` (one per dp rank of the run that saved them, from a checkpoint) continue
    where they stopped, under this run's dp x data.workers whatever theirs was (data/resplit.py)."""
    d = cfg.data
    return PackedLoader([Source(Path(p), w) for p, w in d.sources.items()], seq_len=d.seq_len,
                        micro_batch=cfg.train.micro_batch, grad_accum=cfg.grad_accum_steps, dp=mesh.dp,
                        dp_rank=mesh.rank("dp"), workers=d.workers, seed=cfg.train.seed, shuffle=d.shuffle,
                        on_error=d.on_error, state=states)


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
