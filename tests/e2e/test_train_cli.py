"""End to end: `ithaca train` on prep's shards with 2 CPU processes, through both ways of starting it.

One uninterrupted 20-step run (bare `ithaca train --nproc 2`, which starts torchrun itself) is
shared by the tests; the resume test runs the same config under torchrun directly, stopped at
step 10 and resumed.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import failure_text, run_cli

STEPS = 20


def common_args(shards: Path, out: Path) -> list[str]:
    return ["--config", "debug-cpu", "--set", f"data.path={shards}", "--set", f"train.output_dir={out}",
            "--set", "train.log_every=1", "--set", "checkpoint.every=10", "--set", "data.seq_len=64",
            "--set", "train.global_batch=4"]


def mlflow_runs(out: Path) -> list:
    client = MlflowClient(tracking_uri=f"sqlite:///{out.resolve() / 'mlflow' / 'mlflow.db'}")
    experiments = client.search_experiments()
    return client, client.search_runs([e.experiment_id for e in experiments])


def loss_history(out: Path) -> dict[int, float]:
    client, (run,) = mlflow_runs(out)
    return {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}


@pytest.fixture(scope="module")
def full_run(debug_shards, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("full")
    done = run_cli("train", *common_args(debug_shards, out), "--nproc", "2", "--set", f"train.steps={STEPS}")
    assert done.returncode == 0, failure_text(done.stderr)
    return out, done


def test_loss_falls_and_step_lines_are_printed(full_run):
    _, done = full_run
    losses = [float(x) for x in re.findall(r"step=\d+ loss=([\d.]+) lr=\S+ grad_norm=\S+ tok_s=\d+ s_step=\S+",
                                           done.stderr)]
    assert len(losses) == STEPS
    # Byte-level text starts near ln(320) = 5.8 nats; 20 steps at lr 3e-3 reach about 3.3.
    assert losses[-1] < losses[0] - 1.5, losses


def test_mlflow_run_holds_params_metrics_and_config(full_run):
    out, _ = full_run
    client, (run,) = mlflow_runs(out)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == str(STEPS) and run.data.params["parallel.dp"] == "2"
    assert sorted(loss_history(out)) == list(range(1, STEPS + 1))
    for metric in ("lr", "grad_norm", "tokens_per_s", "tokens_seen"):
        assert len(client.get_metric_history(run.info.run_id, metric)) == STEPS
    assert "train:" in Path(client.download_artifacts(run.info.run_id, "config.yaml")).read_text()


def test_checkpoints_are_complete_and_latest_points_at_the_last(full_run):
    out, _ = full_run
    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text() == "step_00000020"
    for tag in ("step_00000010", "step_00000020"):
        assert any((ckpt / tag).glob("mp_rank_*_model_states.pt"))
        assert sorted(p.name for p in (ckpt / tag).glob("rng_rank*.pt")) == ["rng_rank0.pt", "rng_rank1.pt"]
    assert not list(ckpt.glob("*.partial"))
    assert (out / "config.yaml").is_file()


def torchrun(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "ithaca", "train", *args], capture_output=True, text=True, timeout=600)


def test_resumed_run_continues_the_uninterrupted_loss_curve(full_run, debug_shards, tmp_path):
    full_out, _ = full_run
    # Stop at step 10 on the 20-step schedule, then resume to step 20 (decay_steps keeps the lr curve).
    args = [*common_args(debug_shards, tmp_path), "--set", f"optim.decay_steps={STEPS}"]
    first = torchrun(*args, "--set", "train.steps=10")
    assert first.returncode == 0, failure_text(first.stderr)
    second = torchrun(*args, "--set", f"train.steps={STEPS}", "--resume")
    assert second.returncode == 0, failure_text(second.stderr)
    assert "resumed from" in second.stderr
    resumed, uninterrupted = loss_history(tmp_path), loss_history(full_out)
    assert sorted(resumed) == list(range(1, STEPS + 1))  # the same MLflow run continued
    # Same processes, same reduction order, state restored exactly: the curves are bit-identical.
    assert [resumed[s] for s in range(11, STEPS + 1)] == [uninterrupted[s] for s in range(11, STEPS + 1)]


def test_two_torchrun_nodes_on_this_machine_give_the_one_node_curve(full_run, debug_shards, tmp_path):
    """The multi-node path (what each SLURM node runs): 2 torchrun "nodes" of 1 process, c10d on localhost."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                               f"--node_rank={rank}", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
                               "--rdzv_id=two-nodes", "-m", "ithaca", "train", *common_args(debug_shards, tmp_path),
                               "--set", f"train.steps={STEPS}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), outputs[0][-3000:] + outputs[1][-3000:]
    # 2 ranks either way; a two-term sum is the same in any order, so the curves are bit-identical
    assert loss_history(tmp_path) == loss_history(full_run[0])


def test_an_unreadable_shard_stops_the_run_or_is_skipped_and_counted(debug_shards, tmp_path):
    import shutil

    from ithaca.data import read_manifest
    from ithaca.data.split import stream_shards

    shards = tmp_path / "shards"
    shutil.copytree(debug_shards, shards)
    manifest = read_manifest(shards)
    first = manifest.shards[stream_shards(len(manifest.shards), 2, 0, epoch=0, seed=0, shuffle=True)[0]].name
    (shards / first).write_bytes((shards / first).read_bytes()[:100_000])  # truncated: stream 0 reads it first
    args = [*common_args(shards, tmp_path / "run"), "--nproc", "2", "--set", "train.steps=3"]
    failed = run_cli("train", *args)
    assert failed.returncode != 0 and f"shard {shards / first}: corrupt or truncated" in failed.stderr
    skipped = run_cli("train", *args, "--set", "data.on_error=skip", "--set", f"train.output_dir={tmp_path / 'skip'}")
    assert skipped.returncode == 0, failure_text(skipped.stderr)
    assert f"data.on_error=skip: skipping shard {shards / first}" in skipped.stderr
    client, (run,) = mlflow_runs(tmp_path / "skip")
    assert [m.value for m in client.get_metric_history(run.info.run_id, "data_skipped_shards")] == [1.0, 1.0, 1.0]


def test_sigterm_to_torchrun_stops_every_rank_after_a_checkpoint(debug_shards, tmp_path):
    import json
    import signal

    run = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "-m", "ithaca", "train", *common_args(debug_shards, tmp_path), "--set", "train.steps=5000",
                            "--set", "checkpoint.every=100000"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    lines = []
    for line in run.stdout:  # until training is under way
        lines.append(line)
        if "step=20 " in line:
            break
    run.send_signal(signal.SIGTERM)  # torchrun hands SIGTERM to its workers (and DataLoader workers get it too)
    output = "".join(lines) + run.communicate(timeout=120)[0]
    stopped = int(re.search(r"stopped by SIGTERM at step=(\d+) after its checkpoint", output).group(1))
    assert 20 <= stopped < 5000
    assert (tmp_path / "checkpoints" / "latest").read_text() == f"step_{stopped:08d}"
    assert json.loads((tmp_path / "preempted.json").read_text()) == {"step": stopped, "signal": "SIGTERM"}
    client, (mlflow_run,) = mlflow_runs(tmp_path)
    assert mlflow_run.info.status == "KILLED"  # reopened by --resume
