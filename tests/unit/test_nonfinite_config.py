"""Bad numbers refused at load (every float field, in the loader's float conversion), the
train.on_nonfinite / max_skipped / spike_factor checks, and the loss-spike warning."""

from __future__ import annotations

import pytest

from ithaca.launcher.config.schema import ConfigError
from ithaca.launcher.config.load import load_config
from ithaca.launcher.train.nonfinite import SPIKE_MIN_STEPS, SpikeWatch


def load(*overrides: str):
    return load_config("debug-cpu", list(overrides))


@pytest.mark.parametrize("override, field", [
    ("optim.lr=.nan", "optim.lr"),  # passed the `lr <= 0` check before (NaN compares False)
    ("optim.lr=.inf", "optim.lr"),  # trained 40 steps at loss=nan before
    ("optim.lr=-.inf", "optim.lr"),
    ("optim.lr=nan", "optim.lr"),  # a string, through float()
    ("optim.lr=1e999", "optim.lr"),  # a string that overflows to inf
    ("optim.grad_clip=.inf", "optim.grad_clip"),  # a `float | None` field
    ("optim.beta2=.nan", "optim.beta2"),
    ("model.rope_theta=.inf", "model.rope_theta"),  # a section outside launcher/
    ("train.spike_factor=.nan", "train.spike_factor"),
    ("train.peak_tflops=.inf", "train.peak_tflops"),
    ("data.mixture={runs/web: .nan}", "data.mixture.runs/web"),  # dict[str, float] values
])
def test_a_float_that_is_not_finite_is_refused_naming_its_field(override, field):
    extra = ("data.path=null",) if override.startswith("data.mixture") else ()
    with pytest.raises(ConfigError, match=f"^{field}=.*: expected a finite number, not nan or inf"):
        load(*extra, override)


def test_finite_floats_still_load_from_numbers_and_strings():
    cfg = load("optim.lr=3e-4", "optim.grad_clip=2", "train.spike_factor=1.5")
    assert cfg.optim.lr == 3e-4 and cfg.optim.grad_clip == 2.0 and cfg.train.spike_factor == 1.5


def test_nonfinite_defaults_and_checks():
    t = load().train
    assert (t.on_nonfinite, t.max_skipped, t.spike_factor) == ("stop", 10, 3.0)
    assert load("train.spike_factor=null").train.spike_factor is None
    for override, field, fix in [("train.on_nonfinite=ignore", "train.on_nonfinite", "choose one of 'stop', 'skip'"),
                                 ("train.max_skipped=0", "train.max_skipped", "use 1 or more"),
                                 ("train.spike_factor=1.0", "train.spike_factor", "a factor > 1")]:
        with pytest.raises(ConfigError, match=f"^{field}=.*{fix}"):
            load(override)


def test_a_loss_above_factor_times_the_running_mean_warns(caplog):
    watch = SpikeWatch(3.0)
    assert not any(watch.see(step, 2.0) for step in range(1, SPIKE_MIN_STEPS + 1))  # too few steps to compare
    assert not watch.see(SPIKE_MIN_STEPS + 1, 5.9)  # under 3 x 2.0
    assert watch.see(9, 9.0)  # the window's mean is now (5 x 2.0 + 5.9) / 6 = 2.65
    assert [r.getMessage() for r in caplog.records] == [
        "step=9 loss spike: loss=9.0000 is 3.4x the mean 2.6500 of the last 6 steps (train.spike_factor=3.0)"]
    assert not SpikeWatch(None).see(1, 1e9)
