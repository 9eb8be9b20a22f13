"""Config loading and validation: each bad value is a ConfigError naming its field."""

from __future__ import annotations

from pathlib import Path

import pytest

from ithaca import configs
from ithaca.launcher.config.schema import ConfigError
from ithaca.launcher.config.load import load_config


CONFIG_DIR = Path(configs.__file__).parent


def load(*overrides: str):
    return load_config("debug-cpu", list(overrides))


def test_a_mixture_replaces_the_path():
    cfg = load("data.path=null", "data.mixture={runs/web: 3, runs/code: 1}")
    assert cfg.data.sources == {"runs/web": 3.0, "runs/code": 1.0}
    with pytest.raises(ConfigError, match="data.mixture=.*weight > 0"):
        load("data.path=null", "data.mixture={runs/web: 0}")


def test_shipped_debug_config_loads_with_overrides():
    cfg = load("train.steps=7", "optim.lr=1e-3", "model.n_kv_heads=null")
    assert cfg.train.steps == 7 and cfg.optim.lr == 1e-3 and cfg.model.kv_heads == cfg.model.n_heads
    assert cfg.grad_accum_steps == cfg.train.global_batch // (cfg.train.micro_batch * cfg.parallel.dp)


@pytest.mark.parametrize("override, field, fix", [
    ("train.stpes=3", "train.stpes", "did you mean 'steps'"),
    ("modle.dim=3", "modle", "did you mean 'model'"),
    ("train.steps=many", "train.steps", "expected int"),
    ("train.precision=fp8", "train.precision", "choose one of 'fp32', 'bf16'"),
    ("train.zero_stage=4", "train.zero_stage", "choose one of"),
    ("optim.lr=-1.0", "optim.lr", "> 0"),
    ("parallel.sp=0", "parallel.sp", ">= 1"),
    ("parallel.pp=3", "parallel.pp", "more stages than model.n_layers=2"),
    ("parallel.pp_split=[1,1]", "parallel.pp_split", "give pp=1 block counts"),
    ("parallel.pp_split=3", "parallel.pp_split", "expected a list of int"),
    ("model.activation_checkpointing=some", "model.activation_checkpointing", "choose one of 'none', 'full'"),
    ("parallel.tp=3", "parallel", "n_heads=4 must be divisible by tp\\*ulysses=3"),
    ("parallel.tp=4", "parallel.tp", "n_kv_heads=2 must be divisible by tp"),
    ("data.seq_len=1", "data.seq_len", "at least 2"),
    ("train.global_batch=3", "train.global_batch", "multiple of micro_batch\\*dp=4"),
    ("model.dim=66", "model", "divisible by n_heads"),
    ("model.n_kv_heads=3", "model", "must divide n_heads"),
    ("model.layer_pattern=LSX", "model", "layer_pattern='LSX': use the letters S .*unknown: X"),
    ("model.layer_pattern=LLS", "model", "its length must divide n_layers=2"),
    ("model.delta_conv_size=0", "model", "delta_conv_size=0: must be >= 1"),
    ("model.linear_decay=cosine", "model.linear_decay", "choose one of 'plain', 'retention', 'gated'"),
    ("steps=3", "--set", "section.key=value"),
    ("data.mixture=[a, b]", "data.mixture", "expected a mapping of str to float"),
    ("data.mixture={a: lots}", "data.mixture.a", "expected a number"),
    ("data.workers=-1", "data.workers", "use 0"),
    ("data.on_error=ignore", "data.on_error", "choose one of 'raise', 'skip'"),
])
def test_bad_values_name_their_field_and_fix(override, field, fix):
    with pytest.raises(ConfigError, match=rf"^{field}=.*{fix}"):
        load(override)


def test_sequence_length_must_split_over_sp():
    with pytest.raises(ConfigError, match=r"^data.seq_len=127: must be divisible by 2 \(sp=2, sp_method=ulysses\)"):
        load("parallel.sp=2", "parallel.dp=1", "data.seq_len=127")


def test_delta_layers_need_pieces_as_long_as_their_convolution_reads_back():
    with pytest.raises(ConfigError, match=r"^data.seq_len=8: cuts pieces of 2 tokens \(sp=4, sp_method=ulysses\), "
                                          r"shorter than the 3 tokens D layers' convolution reads"):
        load("model.layer_pattern=DS", "parallel.sp=4", "parallel.dp=1", "data.seq_len=8")
    load("model.layer_pattern=DS", "parallel.sp=4", "parallel.dp=1", "data.seq_len=12")  # pieces of 3: enough


def test_kv_heads_that_can_be_neither_split_nor_repeated_over_sp():
    with pytest.raises(ConfigError, match=r"^parallel.sp=2: Ulysses splits n_kv_heads/tp=3 kv heads over 2 ranks"):
        load("model.n_heads=6", "model.n_kv_heads=3", "model.dim=96", "parallel.sp=2", "parallel.dp=1")


@pytest.mark.parametrize("overrides, field, fix", [
    (("parallel.sp_method=usp", "parallel.sp=4", "parallel.dp=1"), "parallel.ulysses_degree", "dividing sp=4"),
    (("parallel.sp_method=usp", "parallel.sp=4", "parallel.dp=1", "parallel.ulysses_degree=3"),
     "parallel.ulysses_degree", "ulysses_degree x ring degree = sp"),
    (("parallel.sp=2", "parallel.dp=1", "parallel.ulysses_degree=2"), "parallel.ulysses_degree",
     "only used with sp_method: usp"),
    (("parallel.sp_method=ring", "parallel.sp=2", "parallel.dp=1", "data.seq_len=126"), "data.seq_len",
     "divisible by 4 \\(sp=2, sp_method=ring\\)"),
    (("parallel.sp_method=usp", "parallel.sp=8", "parallel.dp=1", "parallel.ulysses_degree=8"), "parallel",
     "n_heads=4 must be divisible by tp\\*ulysses=8"),
])
def test_sequence_parallel_method_checks(overrides, field, fix):
    with pytest.raises(ConfigError, match=rf"^{field}=.*{fix}"):
        load(*overrides)


def test_ring_lifts_the_head_limit_and_usp_splits_sp():
    ring = load("parallel.sp_method=ring", "parallel.sp=8", "parallel.dp=1")  # 4 heads, sp 8: fine for a ring
    assert (ring.sequence.ring, ring.sequence.ulysses) == (8, 1)
    usp = load("parallel.sp_method=usp", "parallel.sp=4", "parallel.dp=1", "parallel.ulysses_degree=2")
    assert (usp.sequence.ring, usp.sequence.ulysses) == (2, 2)


def test_zero3_is_accepted_with_sequence_parallelism():  # parallel/zero3.py makes its gradients exact
    assert load("train.zero_stage=3", "parallel.sp=2", "parallel.dp=1").train.zero_stage == 3


def test_world_size_must_equal_the_product_of_degrees():
    cfg = load("parallel.dp=2", "parallel.sp=2")
    cfg.check_world(4)
    with pytest.raises(ConfigError, match=r"^parallel=.*dp\*tp\*pp\*sp=4 must equal the world size 3"):
        cfg.check_world(3)


def test_missing_required_field_and_missing_file(tmp_path):
    (tmp_path / "c.yaml").write_text("model: {vocab_size: 8, dim: 8, n_layers: 1, n_heads: 2, ffn_dim: 8}\n"
                                     "train: {steps: 1}\n")
    with pytest.raises(ConfigError, match=r"^data=None: required"):
        load_config(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match=r"^--config='nope.yaml': no such file"):
        load_config("nope.yaml")


@pytest.mark.parametrize("overrides, field, fix", [
    (("parallel.pp=2", "model.n_layers=4", "parallel.pp_split=[1,2]"), "parallel.pp_split",
     "the block counts sum to 3, not model.n_layers=4"),
    (("parallel.pp_split=[3]",), "parallel.pp_split", "the block counts sum to 3, not model.n_layers=2"),
    (("parallel.pp=2", "parallel.pp_split=[2,0]"), "parallel.pp_split", "each >= 1"),
    (("parallel.pp=2", "train.zero_stage=2"), "train.zero_stage", "ZeRO stage 0 or 1 only"),
    (("parallel.pp=2", "train.global_batch=4"), "train.global_batch",
     "1 micro-batches per step, fewer than pp=2 stages.*global_batch >= 8"),
])
def test_pipeline_checks(overrides, field, fix):
    with pytest.raises(ConfigError, match=rf"^{field}=.*{fix}"):
        load(*overrides)


def test_a_pipeline_split_loads_and_round_trips_to_yaml():
    import yaml

    cfg = load("parallel.pp=2", "model.n_layers=4", "parallel.pp_split=[1, 3]")
    assert cfg.parallel.pp_split == (1, 3)
    assert yaml.safe_load(yaml.safe_dump(cfg.to_dict()))["parallel"]["pp_split"] == [1, 3]



@pytest.mark.parametrize("name", sorted(path.stem for path in CONFIG_DIR.glob("*.yaml")))
def test_every_shipped_config_loads(name):
    load_config(name)  # the model, parallel and data checks all run in the dataclasses
