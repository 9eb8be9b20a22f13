"""The blocked loss (chunked.py's loop) with each block's softmax work fused in Triton.

The split is Liger's: the matmuls (logits = h_t @ W_v^T, dlogits @ W_v, dlogits^T @ h_t) are
cuBLAS's through torch; the element-wise softmax parts are ours, one pass over the block each:
  _fold_block      folds a logits block into each row's running (max, sum-exp) and picks the
                   target logit where the label falls in the block (forward)
  _dlogits_block   turns a logits block into g * (exp(logit - lse) - onehot) in place, in the
                   matmul dtype (backward), ready for the two matmuls
One program per token row walks the block's columns BLOCK_V at a time, in fp32.

Names follow fla: p_ pointers, b_ blocks, o_ offsets, m_ masks, CAPS constexprs.
Never run on a GPU yet: tested under TRITON_INTERPRET=1 only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ithaca.kernels._backend import interpreting
from ithaca.kernels.linear_cross_entropy.chunked import BlockSteps


@triton.jit
def _fold_block(logits, labels, row_max, row_sum, target, stride, V, col0, BLOCK_V: tl.constexpr):
    i_t = tl.program_id(0)
    p_row = logits + i_t.to(tl.int64) * stride
    b_max = tl.load(row_max + i_t)  # running max; -inf before the first block
    b_sum = tl.load(row_sum + i_t)
    for start in range(0, V, BLOCK_V):
        o_v = start + tl.arange(0, BLOCK_V)
        b_x = tl.load(p_row + o_v, mask=o_v < V, other=float("-inf")).to(tl.float32)
        b_new = tl.maximum(b_max, tl.max(b_x, 0))  # finite: every step holds a real column
        b_sum = b_sum * tl.exp(b_max - b_new) + tl.sum(tl.exp(b_x - b_new), 0)
        b_max = b_new
    col = tl.load(labels + i_t) - col0
    is_hit = (col >= 0) & (col < V)
    b_t = tl.load(p_row + tl.where(is_hit, col, 0), mask=is_hit, other=0.0).to(tl.float32)
    tl.store(target + i_t, tl.load(target + i_t) + b_t)
    tl.store(row_max + i_t, b_max)
    tl.store(row_sum + i_t, b_sum)


@triton.jit
def _dlogits_block(logits, labels, lse, grad, stride, V, col0, BLOCK_V: tl.constexpr):
    i_t = tl.program_id(0)
    p_row = logits + i_t.to(tl.int64) * stride
    b_lse = tl.load(lse + i_t)
    b_g = tl.load(grad + i_t)  # 0 for ignored tokens
    col = tl.load(labels + i_t) - col0
    for start in range(0, V, BLOCK_V):
        o_v = start + tl.arange(0, BLOCK_V)
        m_v = o_v < V
        b_x = tl.load(p_row + o_v, mask=m_v, other=0.0).to(tl.float32)
        b_d = b_g * (tl.exp(b_x - b_lse) - tl.where(o_v == col, 1.0, 0.0))
        tl.store(p_row + o_v, b_d.to(logits.dtype.element_ty), mask=m_v)


def _column_block(v: int) -> int:
    """Columns per step: small under the interpreter, so tests walk several steps per row."""
    return 16 if interpreting() else min(1024, triton.next_power_of_2(v))


def _fold_triton(logits: torch.Tensor, labels: torch.Tensor, col0: int, row_max: torch.Tensor,
                 row_sum: torch.Tensor, target: torch.Tensor) -> None:
    t, v = logits.shape
    assert logits.stride(1) == 1, "the loop's logits blocks are fresh, row-major matmul outputs"
    _fold_block[(t,)](logits, labels.contiguous(), row_max, row_sum, target, logits.stride(0), v, col0,
                      BLOCK_V=_column_block(v))


def _dlogits_triton(logits: torch.Tensor, labels: torch.Tensor, col0: int, lse: torch.Tensor,
                    grad: torch.Tensor) -> torch.Tensor:
    t, v = logits.shape
    assert logits.stride(1) == 1, "the loop's logits blocks are fresh, row-major matmul outputs"
    _dlogits_block[(t,)](logits, labels.contiguous(), lse, grad, logits.stride(0), v, col0, BLOCK_V=_column_block(v))
    return logits  # overwritten with dlogits


TRITON_STEPS = BlockSteps(fold=_fold_triton, dlogits=_dlogits_triton)
