"""`ithaca check`'s verdict from two runs' records, its names for pipeline parameters, its twin's
data streams, and its usage errors (one process, no training)."""

from __future__ import annotations

import math

import pytest

from ithaca.launcher.train.check import StepGrads, compare, first_divergence, twin_overrides
from ithaca.launcher.cli.main import main
from ithaca.launcher.config.load import load_config

NAMES = ["embed.weight", "blocks.0.attn.qkv.weight", "blocks.1.attn.qkv.weight", "head.weight"]


def steps(loss: float, **scaled: float) -> list[StepGrads]:
    """One step whose gradient norms are 1, times `scaled[name]` (dots written as __)."""
    factors = {name.replace("__", "."): f for name, f in scaled.items()}
    return [StepGrads(loss=loss, grad_norms={name: factors.get(name, 1.0) for name in NAMES})]


def test_names_the_diverging_parameter_nearest_the_loss():
    # a wrong gradient in block 1 flows back into block 0: block 1 is where it starts
    layout = steps(5.0, blocks__0__attn__qkv__weight=1.5, blocks__1__attn__qkv__weight=2.0)
    found = first_divergence(compare(layout, steps(5.0)))
    assert found.startswith("step 1: the gradient of blocks.1.attn.qkv.weight differs (its norm by 0.5 relative")
    assert "2 of 4 parameters beyond tolerance" in found


def test_a_different_loss_is_named_before_the_gradients():
    found = first_divergence(compare(steps(5.01, head__weight=1.1), steps(5.0)))
    assert "loss 5.01 under the layout, 5 in one process" in found and "the forward pass or the loss" in found
    assert "gradients first diverge at head.weight" in found


@pytest.mark.parametrize("loss, factor, passes", [
    (5.0 * (1 + 5e-5), 1 + 5e-4, True),  # reduction-order noise, inside both tolerances
    (5.0 * (1 + 5e-4), 1.0, False),
    (5.0, 1 + 5e-3, False),
    (math.nan, 1.0, False),
    (5.0, math.inf, False),
])
def test_tolerances_and_non_finite_numbers(loss, factor, passes):
    found = first_divergence(compare(steps(loss, embed__weight=factor), steps(5.0)))
    assert (found is None) == passes, found


def test_the_runs_must_hold_the_same_parameters():
    layout = [StepGrads(loss=5.0, grad_norms={"embed.weight": 1.0})]
    with pytest.raises(ValueError, match=r"only in one process \['blocks.0.attn.qkv.weight'"):
        compare(layout, steps(5.0))


def test_pipeline_names_are_the_single_process_names():
    from ithaca.models.state_layout import canonical_name

    # [embedding, blocks 0..3, final norm, loss] of a 4-layer model; a tied embedding sits apart
    pipeline = {"0.embed.weight": "embed.weight", "3.block.ffn.down.weight": "blocks.2.ffn.down.weight",
                "5.norm.weight": "norm.weight", "6.head.weight": "head.weight",
                "tied_modules.embedding.embed.weight": "embed.weight"}
    assert {name: canonical_name(name, 4) for name in pipeline} == pipeline
    assert canonical_name("blocks.0.attn.qkv.weight", 4) == "blocks.0.attn.qkv.weight"


@pytest.mark.parametrize("dp, workers, streams", [(2, 1, 2), (2, 0, 2), (2, 3, 6), (1, 0, 1)])
def test_the_twin_reads_as_many_data_streams_as_the_layout(dp, workers, streams):
    cfg = load_config("debug-cpu", [f"parallel.dp={dp}", f"data.workers={workers}", "train.global_batch=12",
                                    "parallel.sp=2", "train.zero_stage=3", "train.precision=bf16"])
    twin = load_config("debug-cpu", [f"parallel.dp={dp}", f"data.workers={workers}", "train.global_batch=12",
                                     *twin_overrides(cfg)])
    assert twin.data.workers == streams and twin.parallel.world_size == 1
    assert (twin.train.zero_stage, twin.train.precision) == (0, "fp32")


TORCHRUN_ENV = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}


@pytest.mark.parametrize("argv, under_torchrun, message", [
    (["check", "--config", "debug-cpu", "--steps", "0"], False, "--steps=0: use 1 or more"),
    (["check", "--config", "debug-cpu"], True, "run it without torchrun"),
    (["train", "--config", "debug-cpu", "--check-first"], True, "--check-first=True: the check starts its own"),
])
def test_usage_errors_exit_2_with_one_line(capsys, monkeypatch, argv, under_torchrun, message):
    for name, value in TORCHRUN_ENV.items():
        if under_torchrun:
            monkeypatch.setenv(name, value)
        else:
            monkeypatch.delenv(name, raising=False)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
