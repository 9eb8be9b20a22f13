"""The Llama architecture's numbers, kept free of heavy imports so configs load fast."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ithaca.models.rope_scaling import RopeScaling

MIXERS = {"S": "softmax attention", "L": "linear attention", "D": "Gated DeltaNet"}
KernelChoice = Literal["auto", "triton", "reference"]
"""What a run may force for every op at once (`model.kernels`); ops accept more names of their own."""
Recompute = Literal["none", "full", "selective"]
"""What the backward pass recomputes instead of keeping it from the forward (`model.activation_checkpointing`):
nothing, whole blocks, or each mixer's interior."""


@dataclass(frozen=True, kw_only=True)
class LlamaArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None
    """Omitted means n_heads (no grouped-query attention)."""
    ffn_dim: int
    """Hidden size of the SwiGLU feed-forward block."""
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    """RoPE's base; raising it (e.g. 10000 -> 500000) is the simplest context extension."""
    rope_scaling: RopeScaling | None = None
    """A context-extension scheme on top of rope_theta (models/rope_scaling.py): linear, llama3 or
    yarn, with Hugging Face's keys, e.g. {rope_type: llama3, factor: 8, low_freq_factor: 1,
    high_freq_factor: 4, original_max_position_embeddings: 8192}."""
    tie_embeddings: bool = False
    init_std: float = 0.02
    layer_pattern: str = "S"
    """Each layer's token mixer, the pattern repeated over n_layers: S softmax attention, L linear
    attention, D Gated DeltaNet (the delta rule, models/delta_net.py); "L" is a linear-attention
    model, "LLLS" a hybrid with one softmax layer in four, "DDDS" a Gated DeltaNet hybrid."""
    linear_decay: Literal["plain", "retention", "gated"] = "retention"
    """Linear (L) layers' decay: none (arXiv:2006.16236), a fixed per-head decay 1 - 2^(-5-head)
    (RetNet, arXiv:2307.08621), or a per-token, per-head sigmoid gate (GLA, arXiv:2312.06635).
    D layers read it too: plain is DeltaNet, retention the same fixed decays, gated Gated DeltaNet's
    gate (models/delta_net.py)."""
    delta_conv_size: int = 4
    """Taps of D layers' short causal convolution on q, k and v (Gated DeltaNet uses 4); under
    sequence parallelism each piece of the sequence must be at least this minus one tokens long."""
    linear_feature_map: Literal["identity", "elu1", "silu"] = "identity"
    """Applied to L layers' q and k: identity (RetNet, GLA), elu+1 (arXiv:2006.16236), silu (D layers
    L2-normalise q and k instead)."""
    linear_output_norm: bool = True
    """Per-head RMSNorm, gains per channel, of the L and D layers' output (RetNet's group norm, GLA,
    lightning attention)."""
    linear_output_gate: bool = True
    """Multiply the L and D layers' output by silu(x W) before the output projection (RetNet, GLA)."""
    linear_sp_exchange: Literal["allgather", "scan"] = "allgather"
    """How L and D layers under sp > 1 share their states (parallel/lasp2.py, parallel/delta_rule.py):
    allgather (LASP-2: every rank receives all P states; D layers' (A, B) transition pairs) or scan (each rank receives one state from its
    predecessor per piece it holds and sends one on, whatever P; every sp_method)."""
    init_from: str | None = None
    """A Hugging Face Llama folder (config.json, *.safetensors) whose weights the model starts from,
    instead of drawing them from the seed; the numbers above must match its config.json (a mismatch
    is refused naming the field), except rope_theta and rope_scaling, which context extension changes."""
    kernels: KernelChoice = "auto"
    """Which implementation every fused op runs (norms, RoPE, SwiGLU, the loss, softmax and linear
    attention; ithaca.kernels): auto = our Triton kernels (flash-attn for softmax attention where it
    applies) on CUDA and the best exact PyTorch path elsewhere; triton forces ours (a CUDA run, or
    TRITON_INTERPRET=1 on the CPU: slow, for tests); reference = the plain PyTorch specs (dense
    attention scores, full logits: small models only). Each op logs once which one runs and why."""
    activation_checkpointing: Recompute = "none"
    """Recompute activations in the backward pass instead of keeping them from the forward: none;
    full (each block keeps only its two inputs, the previous block's output and the residual stream,
    and runs again in the backward pass: two [b, s, dim] tensors per layer stay); selective (each mixer's interior, between its input and output
    projections, is recomputed: RoPE and attention, or linear attention with its chunk states,
    feature maps, decays, output norm and gate; the projections' outputs are kept, as Megatron's
    selective recompute does). Exact either way: the same loss and gradients."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "ffn_dim", "delta_conv_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim}: must be divisible by n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"dim={self.dim}: dim/n_heads={self.head_dim} must be even for RoPE")
        if self.kv_heads < 1 or self.n_heads % self.kv_heads:
            raise ValueError(f"n_kv_heads={self.n_kv_heads}: must divide n_heads={self.n_heads}")
        unknown = set(self.layer_pattern) - set(MIXERS)
        if not self.layer_pattern or unknown:
            raise ValueError(f"layer_pattern={self.layer_pattern!r}: use the letters "
                             f"{', '.join(f'{k} ({v})' for k, v in MIXERS.items())}; unknown: {''.join(sorted(unknown))}")
        if self.n_layers % len(self.layer_pattern):
            raise ValueError(f"layer_pattern={self.layer_pattern!r}: its length must divide n_layers={self.n_layers}")

    def part_parameters(self) -> list[int]:
        """Parameters of each part in model order, whole (before any tp split): the embedding, each
        block, then the final norm with the output head (what pipeline stages are balanced by)."""
        d, hd, h = self.dim, self.head_dim, self.n_heads
        ffn_and_norms = 3 * d * self.ffn_dim + 2 * d
        softmax = d * (h + 2 * self.kv_heads) * hd + h * hd * d
        linear = (4 if self.linear_output_gate else 3) * d * h * hd + h * hd * d
        linear += (d * h + h if self.linear_decay == "gated" else 0) + (h * hd if self.linear_output_norm else 0)
        delta = linear + d * h + 3 * h * hd * self.delta_conv_size + (h if self.linear_decay == "gated" else 0)
        mixers = {"S": softmax, "L": linear, "D": delta}
        blocks = [ffn_and_norms + mixers[self.mixer(i)] for i in range(self.n_layers)]
        head = d + (0 if self.tie_embeddings else self.vocab_size * d)
        return [self.vocab_size * d, *blocks, head]

    def mixer(self, layer: int) -> str:
        """The letter of layer `layer`'s mixer."""
        return self.layer_pattern[layer % len(self.layer_pattern)]

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads
