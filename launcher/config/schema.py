"""The run config: one YAML file -> typed, frozen dataclasses, checked before any process starts.

Each section checks what it alone knows in `__post_init__`; `RunConfig.check_world` checks what
needs the run (the world size). Every failure is a `ConfigError` reading `field=value: fix`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ithaca.models.llama_args import LlamaArgs
from ithaca.parallel.sequence_layout import LayoutError, SequenceLayout, SoftmaxMethod, StateExchange


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field, the value and the fix."""

    def __init__(self, field: str, value: object, fix: str):
        super().__init__(f"{field}={value!r}: {fix}")


def sequence_layout(p: "ParallelConfig", linear_sp_exchange: StateExchange) -> SequenceLayout:
    """The layout `p` describes; its LayoutError becomes a ConfigError naming the config key."""
    try:
        return SequenceLayout(sp=p.sp, sp_method=p.sp_method, ulysses_degree=p.ulysses_degree,
                              linear_sp_exchange=linear_sp_exchange)
    except LayoutError as err:
        section = "model" if err.field == "linear_sp_exchange" else "parallel"
        raise ConfigError(f"{section}.{err.field}", err.value, err.fix) from None


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    sp: int = 1
    sp_method: SoftmaxMethod = "ulysses"
    """How softmax attention splits the sequence over the sp ranks: Ulysses all-to-all (needs heads
    divisible by sp), ring attention (any head count), usp: Ulysses inside groups of
    ulysses_degree ranks and a ring across the groups, or allgather: every rank gathers all K/V
    (LASP-2H's choice for the few softmax layers of a hybrid). Linear layers always use LASP-2,
    in the sequence layout this choice implies."""
    ulysses_degree: int | None = None
    """usp only: ranks per Ulysses group (the same node); the ring spans sp / ulysses_degree groups."""
    pp_split: tuple[int, ...] | None = None
    """Blocks per pipeline stage, e.g. [3, 5] for pp=2 (the embedding sits on the first stage, the
    final norm and the output loss on the last); omitted balances stages by parameter count."""

    def __post_init__(self) -> None:
        for name in ("dp", "tp", "pp", "sp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name}", getattr(self, name), "a degree is >= 1")
        if self.pp_split is not None and (len(self.pp_split) != self.pp or min(self.pp_split) < 1):
            raise ConfigError("parallel.pp_split", list(self.pp_split),
                              f"give pp={self.pp} block counts, each >= 1 (every stage holds a block)")
        sequence_layout(self, "allgather")  # its checks, here where the fields are read


    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp * self.sp


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    path: str | None = None
    """Folder of shards written by `ithaca prep` (holds manifest.json); or give `mixture`."""
    mixture: dict[str, float] | None = None
    """Several shard folders and their weights, e.g. {runs/web: 0.7, runs/code: 0.3}: each
    sequence comes from one folder, drawn with these odds. Replaces `path`."""
    seq_len: int = 128
    """Tokens per training sequence; documents are packed end to end with EOS between them."""
    document_mask: bool = True
    """Attention stays inside each packed document and positions restart at each; false treats
    the whole window as one sequence."""
    workers: int = 1
    """Dataloader worker processes per data-parallel rank (0: read in the training process). The
    data is read as dp x max(workers, 1) streams, which needs at least that many shards; runs with
    the same stream count see the same batches."""
    shuffle: bool = True
    """Shuffle shards and the documents inside them, anew each epoch, from train.seed."""
    on_error: Literal["raise", "skip"] = "raise"
    """An unreadable shard (missing, corrupt, truncated) stops the run naming the file (raise), or
    is passed over and counted in the log and MLflow's data_skipped_shards (skip)."""
    tokenizer: str | None = None
    """'byte' or a tokenizer.json path: when given, the run refuses shards prepped with another."""

    def __post_init__(self) -> None:
        if (self.path is None) == (self.mixture is None):
            raise ConfigError("data.path", self.path, "give either data.path or data.mixture (not both)")
        if self.mixture is not None and (not self.mixture or min(self.mixture.values()) <= 0):
            raise ConfigError("data.mixture", self.mixture, "give one or more folders, each with a weight > 0")
        if self.seq_len < 2:
            raise ConfigError("data.seq_len", self.seq_len, "use at least 2 tokens per sequence")
        if self.workers < 0:
            raise ConfigError("data.workers", self.workers, "use 0 (read in the training process) or more")

    @property
    def sources(self) -> dict[str, float]:
        """Shard folder -> weight."""
        return self.mixture if self.mixture is not None else {self.path: 1.0}


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    """The cosine decays the learning rate to lr * min_lr_ratio."""
    warmup_steps: int = 10
    decay_steps: int | None = None
    """Steps of warmup + cosine; omitted means train.steps. Set it to stop a run early and
    extend it later on the same schedule."""
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float | None = 1.0
    """Clip the global gradient norm to this; omitted means no clipping."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError("optim.lr", self.lr, "the learning rate must be > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("optim.min_lr_ratio", self.min_lr_ratio, "use a ratio in [0, 1]")
        if self.warmup_steps < 0:
            raise ConfigError("optim.warmup_steps", self.warmup_steps, "use 0 or more steps")
        if self.decay_steps is not None and self.decay_steps < 1:
            raise ConfigError("optim.decay_steps", self.decay_steps, "use >= 1 or omit it")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError("optim.grad_clip", self.grad_clip, "use a norm > 0, or omit it for no clipping")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    steps: int
    global_batch: int = 8
    """Sequences per optimizer step, summed over data-parallel ranks and micro-batches."""
    micro_batch: int = 1
    """Sequences per forward pass on one rank; gradient accumulation makes up the rest."""
    seed: int = 0
    precision: Literal["fp32", "bf16"] = "fp32"
    zero_stage: Literal[0, 1, 2, 3] = 1
    log_every: int = 1
    output_dir: str = "runs/default"
    """Where checkpoints, the resolved config and the local MLflow store go."""
    peak_tflops: float | None = None
    """One device's dense bf16 peak in TFLOP/s, the denominator of the logged MFU; omitted means
    looked up from the GPU's name (launcher/train/metrics.py), and no MFU where it is not known."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A NaN or inf in a step's loss or gradient norm (DeepSpeed's overflow skip included), decided
    on every rank at the same step: stop the run there with an error naming the step and the first
    non-finite gradient (the last checkpoint is kept, this step is not saved), or skip the update,
    count it (MLflow skipped_steps) and go on (launcher/train/nonfinite.py)."""
    max_skipped: int = 10
    """skip: stop as `stop` does after this many non-finite steps in a row."""
    spike_factor: float | None = 3.0
    """Warn when a step's loss exceeds this many times the mean of the last 20 steps' losses;
    omitted means no check."""
    collective_timeout: float = 600.0
    """Seconds a collective may wait for the other ranks before it fails (every process group of
    the run); a rank that died or hangs then stops the others instead of blocking them forever.
    It must cover the longest wait of a healthy run: the first step's kernel compilation, a
    checkpoint save."""
    step_timeout: float = 1800.0
    """Seconds one step (the first one's compilation included) may take before the rank's
    watchdog names the step and the call it is stuck in, and stops the rank
    (launcher/runtime/watchdog.py)."""
    network_interface: str = ""
    """The network interface (e.g. eth0, ib0) every rank's gloo and NCCL bind to: it sets
    GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME, over any value they had; every node must have it.
    Empty: the interface that routes to the rendezvous host (launcher/runtime/network_interface.py)."""

    def __post_init__(self) -> None:
        for name in ("steps", "global_batch", "micro_batch", "log_every", "max_skipped"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}", getattr(self, name), "use 1 or more")
        for name in ("collective_timeout", "step_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"train.{name}", getattr(self, name), "use a number of seconds > 0")
        if self.peak_tflops is not None and not 0 < self.peak_tflops < float("inf"):  # NaN fails too
            raise ConfigError("train.peak_tflops", self.peak_tflops, "use a finite number > 0 (TFLOP/s), or "
                              "omit it to look the peak up from the GPU's name")
        if self.spike_factor is not None and not self.spike_factor > 1:
            raise ConfigError("train.spike_factor", self.spike_factor, "use a factor > 1 (e.g. 3.0), or omit it "
                              "for no spike check")


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    every: int | None = None
    """Save every this many steps (and at the end); omitted means only at the end."""
    dir: str | None = None
    """Omitted means <train.output_dir>/checkpoints."""
    keep: int | None = None
    """After each save, keep this many complete checkpoints (the one `latest` names and those of
    the steps before it) and delete older ones; omitted means keep all."""

    def __post_init__(self) -> None:
        if self.every is not None and self.every < 1:
            raise ConfigError("checkpoint.every", self.every, "use 1 or more, or omit it")
        if self.keep is not None and self.keep < 1:
            raise ConfigError("checkpoint.keep", self.keep, "use 1 or more, or omit it to keep every checkpoint")


@dataclass(frozen=True, kw_only=True)
class TrackingConfig:
    uri: str | None = None
    """MLflow tracking URI (e.g. http://host:5000, sqlite:///PATH/mlflow.db); omitted means a local
    SQLite store, <train.output_dir>/mlflow/mlflow.db. A file store (`file:PATH`, or a bare path) is
    refused: MLflow 3 raises on it unless MLFLOW_ALLOW_FILE_STORE=true is set, and the run's journal
    would only reach it by `ithaca track-sync` to another URI."""
    experiment: str = "ithaca"
    run_name: str | None = None
    flush_timeout: float = 60.0
    """Seconds the end of a run waits for its tracking journal (<train.output_dir>/tracking/) to
    reach MLflow; what is left then stays in the journal for `ithaca track-sync`."""

    def __post_init__(self) -> None:
        if self.flush_timeout < 0:
            raise ConfigError("tracking.flush_timeout", self.flush_timeout, "use 0 or more seconds")
        file_store = self.uri is not None and (self.uri.startswith("file:") or "://" not in self.uri)
        if file_store and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() != "true":
            raise ConfigError("tracking.uri", self.uri, "MLflow 3 no longer takes a file store; use "
                              "sqlite:///PATH/mlflow.db or a server http://HOST:PORT, or omit it for a SQLite "
                              "store in train.output_dir")


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    every: int | None = None
    """Evaluate held-out loss every this many steps and at the last step (launcher/eval/);
    omitted means no evaluation during training."""
    batches: int = 2
    """Eval batches of train.global_batch windows each: the first ones of the eval data, the same
    at every eval, under every layout and across resumes."""
    path: str | None = None
    """A folder written by `ithaca prep` to evaluate on; omitted means the holdout that
    `ithaca prep --holdout` wrote beside data.path."""
    seq_len: int | None = None
    """Tokens per eval window; omitted means data.seq_len."""
    metrics: tuple[Literal["loss", "positions", "passkey"], ...] = ("loss", "positions")
    """What each eval scores, one or more of: loss (eval_loss and eval_ppl, the `eval step=N ...`
    line), positions (the loss by position in the document: eval_loss_pos_<first>_<last> and
    loss_by_position.png; the same forward pass as loss), passkey (passkey retrieval,
    launcher/eval/passkey.py: a key of 5 digits hidden at depths 0, 25, 50, 75 and 100 % of filler
    from the eval data, in prompts of powers-of-two lengths up to eval.seq_len, answered
    teacher-forced; logged as passkey_acc_<length>_<depth> (share of keys whose every token is the
    argmax) and passkey_ll_<length>_<depth> (the key tokens' mean log-likelihood), with a heatmap
    PNG; a tokenizer.json eval set needs data.tokenizer). E.g. [loss, positions, passkey]."""
    passkey_samples: int = 4
    """Passkey prompts (each its own key and filler) per length and depth."""

    def __post_init__(self) -> None:
        for name in ("every", "batches", "seq_len", "passkey_samples"):
            value = getattr(self, name)
            if value is not None and value < (2 if name == "seq_len" else 1):
                raise ConfigError(f"eval.{name}", value, "use 1 or more (seq_len: 2 or more), or omit it")
        if not self.metrics or len(set(self.metrics)) < len(self.metrics):
            raise ConfigError("eval.metrics", list(self.metrics), "list each of loss, positions, passkey at most "
                              "once, and at least one of them")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    model: LlamaArgs
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        p = self.parallel
        tp, sp, ulysses = p.tp, p.sp, self.sequence.ulysses
        heads, kv_heads = self.model.n_heads, self.model.kv_heads
        if heads % (tp * ulysses):
            raise ConfigError("parallel", {"tp": tp, "sp": sp, "sp_method": p.sp_method},
                              f"model.n_heads={heads} must be divisible by tp*ulysses={tp * ulysses} (tp={tp}, "
                              f"Ulysses ranks={ulysses}); pick degrees whose product divides it, or sp_method: ring")
        if kv_heads % tp:
            raise ConfigError("parallel.tp", tp, f"model.n_kv_heads={kv_heads} must be divisible by tp; "
                              "pick tp dividing it")
        local_kv = kv_heads // tp
        if local_kv % ulysses and ulysses % local_kv:
            raise ConfigError("parallel.sp", sp,
                              f"Ulysses splits n_kv_heads/tp={local_kv} kv heads over {ulysses} ranks, repeating "
                              f"them when there are fewer: one must divide the other; pick a Ulysses degree "
                              f"dividing {local_kv} or a multiple of it, or sp_method: ring")
        if self.model.vocab_size % tp:
            raise ConfigError("model.vocab_size", self.model.vocab_size,
                              f"must be divisible by tp={tp}; pad it to a multiple of {tp}")
        chunks = self.sequence.chunks  # the ring's zigzag cuts 2 chunks per rank
        if self.data.seq_len % chunks:
            raise ConfigError("data.seq_len", self.data.seq_len,
                              f"must be divisible by {chunks} (sp={sp}, sp_method={p.sp_method})")
        if self.eval_seq_len % chunks:
            raise ConfigError("eval.seq_len", self.eval_seq_len,
                              f"must be divisible by {chunks} (sp={sp}, sp_method={p.sp_method})")
        halo = self.model.delta_conv_size - 1
        for name, length in (("data.seq_len", self.data.seq_len), ("eval.seq_len", self.eval_seq_len)):
            if "D" in self.model.layer_pattern and sp > 1 and length // chunks < halo:
                raise ConfigError(name, length,
                                  f"cuts pieces of {length // chunks} tokens (sp={sp}, sp_method={p.sp_method}), "
                                  f"shorter than the {halo} tokens D layers' convolution reads from the previous "
                                  f"piece (model.delta_conv_size={self.model.delta_conv_size}); use a longer "
                                  "seq_len or a smaller sp")
        per_step = self.train.micro_batch * self.parallel.dp
        if self.train.global_batch % per_step:
            raise ConfigError("train.global_batch", self.train.global_batch,
                              f"must be a multiple of micro_batch*dp={per_step}")
        if p.pp_split is not None and sum(p.pp_split) != self.model.n_layers:
            raise ConfigError("parallel.pp_split", list(p.pp_split), f"the block counts sum to {sum(p.pp_split)}, "
                              f"not model.n_layers={self.model.n_layers}")
        if p.pp > 1:
            self._check_pipeline()

    def _check_pipeline(self) -> None:
        p, layers = self.parallel, self.model.n_layers
        if p.pp > layers:
            raise ConfigError("parallel.pp", p.pp, f"more stages than model.n_layers={layers}: every stage "
                              "needs a block; use pp <= n_layers")
        if self.train.zero_stage > 1:
            raise ConfigError("train.zero_stage", self.train.zero_stage,
                              f"DeepSpeed's pipeline engine (pp={p.pp}) supports ZeRO stage 0 or 1 only; set "
                              "train.zero_stage=1, or pp=1 for ZeRO-2/3")
        if self.grad_accum_steps < p.pp:
            raise ConfigError("train.global_batch", self.train.global_batch,
                              f"gives {self.grad_accum_steps} micro-batches per step, fewer than pp={p.pp} stages "
                              f"(the pipeline would idle most of each step); use global_batch >= "
                              f"{p.pp * self.train.micro_batch * p.dp} (pp*micro_batch*dp)")

    @property
    def sequence(self) -> SequenceLayout:
        """The run's sequence layout: `parallel.sp`, `sp_method`, `ulysses_degree` and `model.linear_sp_exchange`."""
        return sequence_layout(self.parallel, self.model.linear_sp_exchange)

    @property
    def eval_seq_len(self) -> int:
        """Tokens per eval window: eval.seq_len, else data.seq_len."""
        return self.eval.seq_len or self.data.seq_len

    @property
    def grad_accum_steps(self) -> int:
        return self.train.global_batch // (self.train.micro_batch * self.parallel.dp)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir or Path(self.train.output_dir) / "checkpoints")

    def check_world(self, world_size: int) -> None:
        """Check the layout against the world the run was started with."""
        if self.parallel.world_size != world_size:
            p = self.parallel
            raise ConfigError("parallel", {"dp": p.dp, "tp": p.tp, "pp": p.pp, "sp": p.sp},
                              f"dp*tp*pp*sp={p.world_size} must equal the world size {world_size}; "
                              f"change the degrees or start {p.world_size} processes")

    def to_dict(self) -> dict:
        """Plain YAML-safe values (tuples become lists)."""
        return dataclasses.asdict(self, dict_factory=lambda items: {k: list(v) if isinstance(v, tuple) else v
                                                                     for k, v in items})
