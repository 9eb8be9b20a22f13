"""A NaN or inf in a step (train.on_nonfinite), injected for real: every rank stops or skips at the
same step, the update is never applied, the checkpoint kept is the last good one.

The fault is test-only and lives here: `_inject` replaces `ithaca.launcher.train.loop.train_step` in
the rank process with a wrapper that, for the chosen steps, makes one parameter's gradient NaN (a
tensor hook) or the embedding's output NaN (a forward hook, so the loss is NaN), then calls the
real step. A faulty step's batch stays faulty if the loop computes it again, as a NaN that comes
from the data and the weights would; production code knows nothing about it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import run_ranks

GRAD_PARAM = "blocks.1.attn.qkv.weight"


def _inject(kind: str, steps: set[int], ranks: set[int] | None, param_name: str | None = GRAD_PARAM):
    """Make step `steps`' gradient of `param_name` (None: this rank's first parameter) NaN ("grad"),
    or the embedding's output NaN ("loss"), on `ranks` (None: all); returns the undo."""
    import torch.distributed as dist

    from ithaca.launcher.train import loop

    real_step, seen = loop.train_step, {"step": 0, "batch": None}

    def faulty_step(engine, micro_batches, mesh, device, before_update=None):
        if micro_batches is not seen["batch"]:  # a new step, not the loop computing this one again
            seen["step"], seen["batch"] = seen["step"] + 1, micro_batches
        if seen["step"] not in steps or (ranks is not None and dist.get_rank() not in ranks):
            return real_step(engine, micro_batches, mesh, device, before_update)
        if kind == "grad":
            params = dict(engine.module.named_parameters())
            param = params[param_name] if param_name else next(iter(params.values()))
            hook = param.register_hook(lambda grad: grad * float("nan"))
        else:
            hook = engine.module.get_submodule("embed").register_forward_hook(lambda m, i, out: out * float("nan"))
        try:
            return real_step(engine, micro_batches, mesh, device, before_update)
        finally:
            hook.remove()

    loop.train_step = faulty_step
    return lambda: setattr(loop, "train_step", real_step)


def _train(data: str, out: str, overrides: tuple[str, ...]) -> dict:
    import math

    from ithaca.launcher.config.load import load_config
    from ithaca.launcher.train.nonfinite import NonFiniteStep
    from ithaca.launcher.train.loop import run_training

    cfg = load_config("debug-cpu", [
        f"data.path={data}", "data.seq_len=64", f"train.output_dir={out}", "train.steps=5", "train.global_batch=4",
        "train.micro_batch=2", "train.log_every=100", "checkpoint.every=2", "parallel.dp=1", "data.workers=1",
        *overrides])
    try:
        records = run_training(cfg)
    except NonFiniteStep as err:
        return {"error": str(err)}
    return {"error": None, "loss": [r.loss for r in records], "lr": [r.lr for r in records],
            "finite_loss": [math.isfinite(r.loss) for r in records]}


def _scenarios(data: str, out: str, cases: dict[str, tuple]) -> dict[str, dict]:
    """Several short runs in one process (one start-up): name -> (overrides, fault or None)."""
    results = {}
    for name, (overrides, fault) in cases.items():
        undo = _inject(*fault) if fault else None
        try:
            results[name] = _train(data, f"{out}/{name}", overrides)
        finally:
            if undo:
                undo()
    return results


ONE_RANK = {
    # ZeRO-1 (the debug config): the loss stays finite, DeepSpeed skips the update for its inf
    # gradient norm, and the loop computes the step again to name the gradient
    "stop": ((), ("grad", {3}, None)),
    "max-skipped": (("train.on_nonfinite=skip", "train.max_skipped=2"), ("grad", {2, 3, 4, 5}, None)),
    # measured before: grad_norm=inf and "OVERFLOW! Skipping step" every step, rc=0, MLflow FINISHED
    "lr-overflow": (("optim.lr=1e6",), None),
}
TWO_RANKS = {
    # fp32 without ZeRO: torch's AdamW would apply the NaN; guard_plain_optimizer refuses it. The
    # NaN is in rank 1's forward only.
    "skip-dp2-zero0": (("parallel.dp=2", "train.zero_stage=0", "train.on_nonfinite=skip"), ("loss", {3}, {1})),
    # pipeline stages: the NaN is in stage 0's gradient only, the loss (on stage 1) is finite
    "stop-pp2": (("parallel.pp=2",), ("grad", {2}, {0}, None)),
}


@pytest.fixture(scope="module")
def one_rank(short_doc_shards, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("nonfinite-1")
    (results,) = run_ranks(_scenarios, 1, str(short_doc_shards), str(out), ONE_RANK)
    return out, results


@pytest.fixture(scope="module")
def two_ranks(short_doc_shards, tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("nonfinite-2")
    return out, run_ranks(_scenarios, 2, str(short_doc_shards), str(out), TWO_RANKS)


def _mlflow_run(out: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("debug-cpu").experiment_id])
    return client, run


def _latest(out: Path) -> str:
    return (out / "checkpoints" / "latest").read_text().strip()


def test_stop_names_the_step_and_gradient_and_keeps_the_last_good_checkpoint(one_rank):
    out, results = one_rank
    error = results["stop"]["error"]
    assert error.startswith("step=3 loss=")
    assert f"grad_norm=inf: not finite; first non-finite gradient: {GRAD_PARAM} (rank 0)" in error
    assert f"the last checkpoint is {out}/stop/checkpoints/step_00000002 (--resume continues there)" in error
    assert _latest(out / "stop") == "step_00000002"
    assert not list((out / "stop" / "checkpoints").glob("step_00000003*"))  # the bad step is not saved
    assert _mlflow_run(out / "stop")[1].info.status == "FAILED"


def test_max_skipped_in_a_row_stops_the_run(one_rank):
    out, results = one_rank
    error = results["max-skipped"]["error"]
    assert error.startswith("step=3 ")
    assert "not finite for 2 steps in a row (train.max_skipped=2)" in error
    assert f"first non-finite gradient: {GRAD_PARAM} (rank 0)" in error
    assert _latest(out / "max-skipped") == "step_00000002"  # step 2 was skipped: its weights are step 1's
    assert _mlflow_run(out / "max-skipped")[1].info.status == "FAILED"


def test_a_learning_rate_that_overflows_stops_at_the_first_inf_gradient(one_rank):
    _, results = one_rank
    error = results["lr-overflow"]["error"]
    assert error.startswith("step=2 loss=") and "grad_norm=inf: not finite" in error
    assert "first non-finite gradient: unknown" not in error  # found by computing step 2 again
    assert error.endswith("no checkpoint was written before it")


def test_a_nan_on_one_rank_is_skipped_on_every_rank_and_counted(two_ranks):
    from ithaca.launcher.train.schedule import WarmupCosine

    out, per_rank = two_ranks
    results = [r["skip-dp2-zero0"] for r in per_rank]
    assert results[0]["error"] is None
    assert results[0]["finite_loss"] == [True, True, False, True, True] == results[1]["finite_loss"]
    assert results[0]["loss"][4] < results[0]["loss"][0]  # the weights stayed good: it still trains
    # a skipped step keeps the lr the function of the step number (the loop steps the schedule)
    schedule = WarmupCosine(5, 5, 0.1)  # debug-cpu: warmup_steps 5, min_lr_ratio 0.1, decay over train.steps
    assert results[0]["lr"] == pytest.approx([3e-3 * schedule(step) for step in range(1, 6)], rel=1e-6)
    client, run = _mlflow_run(out / "skip-dp2-zero0")
    assert run.info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "skipped_steps")] == [0, 0, 1, 1, 1]


def test_pipeline_stages_stop_at_the_same_step(two_ranks):
    out, per_rank = two_ranks
    errors = [r["stop-pp2"]["error"] for r in per_rank]
    assert errors[0] is not None and errors[0] == errors[1]  # both stages: the same step, the same numbers
    assert errors[0].startswith("step=2 ") and "first non-finite gradient: unknown" in errors[0]
    assert errors[0].endswith("no checkpoint was written before it")
