"""Fused kernels, each a folder with a plain-PyTorch reference and one dispatch point."""

from ithaca.kernels.attention import attention

__all__ = ["attention"]
