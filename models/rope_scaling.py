"""RoPE context extension: the schemes that stretch a trained model's positions to longer sequences.

Each scheme changes only RoPE's frequencies (and YaRN the scale of cos and sin), computed once per
model by `rope_frequencies` and handed to every rope kernel path (ithaca.kernels.rope). Names and
defaults are Hugging Face's `rope_scaling` keys, so a config.json round trip is exact
(ithaca.models.hf_llama): an omitted optional key stays None and is written back omitted.

- linear position interpolation (arXiv:2306.15595): every frequency divided by `factor`;
- llama3 (Llama 3.1): wavelengths longer than original/low_freq_factor divided by `factor`, shorter
  than original/high_freq_factor kept, a smooth blend between;
- yarn (arXiv:2309.00071, sections 3.2-3.4): "NTK-by-parts" blend of interpolated and original
  frequencies over a ramp of rotation counts [beta_slow, beta_fast], and cos/sin multiplied by the
  attention factor 0.1 ln(factor) + 1 (the paper's sqrt(1/t)).
A new base alone is `rope_theta` (LlamaArgs), with no scaling.

torch is imported inside the functions that compute frequencies: configs load this class (through
LlamaArgs) without importing torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

RopeType = Literal["linear", "llama3", "yarn"]
_USES = {  # the optional keys each scheme reads; others must stay None
    "linear": set(),
    "llama3": {"original_max_position_embeddings", "low_freq_factor", "high_freq_factor"},
    "yarn": {"original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor", "mscale",
             "mscale_all_dim", "truncate"},
}
_REQUIRED = {"linear": set(), "llama3": {"original_max_position_embeddings", "low_freq_factor", "high_freq_factor"},
             "yarn": {"original_max_position_embeddings"}}


@dataclass(frozen=True, kw_only=True)
class RopeScaling:
    rope_type: RopeType
    factor: float
    """How many times longer the new context is than the original (>= 1)."""
    original_max_position_embeddings: int | None = None
    """llama3, yarn: the context length the model was pretrained at."""
    low_freq_factor: float | None = None
    """llama3: wavelengths above original / low_freq_factor are interpolated by `factor` (Llama 3.1: 1)."""
    high_freq_factor: float | None = None
    """llama3: wavelengths below original / high_freq_factor are kept (Llama 3.1: 4)."""
    beta_fast: float | None = None
    """yarn: rotations over the original context above which a frequency is kept; omitted means 32."""
    beta_slow: float | None = None
    """yarn: rotations below which a frequency is interpolated; omitted means 1."""
    attention_factor: float | None = None
    """yarn: the factor on cos and sin; omitted means derived from `factor` (and mscale, mscale_all_dim)."""
    mscale: float | None = None
    """yarn (DeepSeek's form): with mscale_all_dim, attention factor = m(factor, mscale) / m(factor, mscale_all_dim)."""
    mscale_all_dim: float | None = None
    truncate: bool | None = None
    """yarn: round the ramp's ends to whole dimensions (floor, ceil); omitted means true."""

    def __post_init__(self) -> None:
        if not self.factor >= 1:
            raise ValueError(f"rope_scaling.factor={self.factor}: use a factor >= 1 (new context / original context)")
        for name in sorted(_REQUIRED[self.rope_type]):
            if getattr(self, name) is None:
                raise ValueError(f"rope_scaling.{name}: required for rope_type {self.rope_type}; add it")
        for name in sorted(self.given() - _USES[self.rope_type] - {"rope_type", "factor"}):
            raise ValueError(f"rope_scaling.{name}={getattr(self, name)!r}: not used by rope_type {self.rope_type}; "
                             f"remove it (it reads {', '.join(sorted(_USES[self.rope_type])) or 'only factor'})")
        if self.original_max_position_embeddings is not None and self.original_max_position_embeddings < 1:
            raise ValueError(f"rope_scaling.original_max_position_embeddings={self.original_max_position_embeddings}: "
                             "use the pretraining context length (>= 1)")
        if self.rope_type == "llama3" and not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ValueError(f"rope_scaling.high_freq_factor={self.high_freq_factor}: must exceed "
                             f"low_freq_factor={self.low_freq_factor} > 0 (Llama 3.1 uses 1 and 4)")
        if self.rope_type == "yarn" and not self._beta_fast > self._beta_slow > 0:
            raise ValueError(f"rope_scaling.beta_fast={self.beta_fast}: must exceed beta_slow={self.beta_slow} > 0 "
                             "(omitted: 32 and 1)")

    def given(self) -> set[str]:
        """The keys that are set (not None): what a Hugging Face config.json holds."""
        return {f.name for f in fields(self) if getattr(self, f.name) is not None}

    @property
    def _beta_fast(self) -> float:
        return 32.0 if self.beta_fast is None else self.beta_fast

    @property
    def _beta_slow(self) -> float:
        return 1.0 if self.beta_slow is None else self.beta_slow

    def cos_sin_scale(self) -> float:
        """The factor on cos and sin: YaRN's attention factor, 1 for the other schemes."""
        if self.rope_type != "yarn":
            return 1.0
        if self.attention_factor is not None:
            return self.attention_factor
        if self.mscale and self.mscale_all_dim:
            return _yarn_mscale(self.factor, self.mscale) / _yarn_mscale(self.factor, self.mscale_all_dim)
        return _yarn_mscale(self.factor, 1.0)

    def scale_frequencies(self, inv_freq: torch.Tensor, theta: float) -> torch.Tensor:
        """The scheme applied to plain RoPE's inv_freq [d/2] fp32 (base theta) -> [d/2] fp32."""
        if self.rope_type == "linear":
            return inv_freq / self.factor
        if self.rope_type == "llama3":
            return self._llama3(inv_freq)
        return self._yarn(inv_freq, theta)

    def _llama3(self, inv_freq: torch.Tensor) -> torch.Tensor:
        import torch

        original = self.original_max_position_embeddings
        wavelength = 2 * math.pi / inv_freq
        long, short = original / self.low_freq_factor, original / self.high_freq_factor
        # between the two wavelengths, blend interpolated and kept by how many turns fit the original context
        smooth = (original / wavelength - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
        blended = (1 - smooth) * inv_freq / self.factor + smooth * inv_freq
        scaled = torch.where(wavelength > long, inv_freq / self.factor, blended)
        return torch.where(wavelength < short, inv_freq, scaled)

    def _yarn(self, inv_freq: torch.Tensor, theta: float) -> torch.Tensor:
        import torch

        d = 2 * inv_freq.numel()
        original = self.original_max_position_embeddings

        def dim_of(rotations: float) -> float:  # the dimension whose wavelength fits `rotations` turns in `original`
            return d * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = dim_of(self._beta_fast), dim_of(self._beta_slow)
        if self.truncate is not False:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, d - 1)
        if low == high:
            high += 0.001  # a ramp of zero width would divide by zero
        ramp = ((torch.arange(d // 2, dtype=torch.float32, device=inv_freq.device) - low) / (high - low)).clamp(0, 1)
        # ramp 0 (fast rotations, low dims): keep; ramp 1 (slow rotations): interpolate by factor
        return inv_freq / self.factor * ramp + inv_freq * (1 - ramp)


def _yarn_mscale(factor: float, mscale: float) -> float:
    """YaRN's sqrt(1/t) = 0.1 ln(s) + 1 (arXiv:2309.00071, eq. 22), with DeepSeek's multiplier on ln."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim/2] fp32 on the CPU, the factor on cos and sin) for RoPE with base `theta`
    extended by `scaling` (None: plain RoPE)."""
    from ithaca.kernels.rope import rope_inv_freq

    inv_freq = rope_inv_freq(head_dim, theta)
    if scaling is None:
        return inv_freq, 1.0
    return scaling.scale_frequencies(inv_freq, theta), scaling.cos_sin_scale()
