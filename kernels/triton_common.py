"""What our Triton kernels share: the dot product and the launch settings that hold on a GPU and
under the interpreter, and the chunk pieces of the linear-attention family (linear_attention and
delta_rule read decays, document resets and [b, s, h, d] tokens through the same helpers, so the
two ops cannot read them differently). Imported only where a Triton implementation has been chosen."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ithaca.kernels._backend import interpreting


def exact_dots(dtype: torch.dtype) -> bool:
    """Whether `dot` upcasts its operands to fp32 and multiplies in IEEE fp32.

    True for fp32 inputs (tests hold them to ~1e-5; TF32 would not meet that) and under the
    interpreter, which in triton 3.9 multiplies bf16 operands as their raw uint16 bits.
    """
    return dtype == torch.float32 or interpreting()


@triton.jit
def dot(a, b, EXACT: tl.constexpr):
    """a @ b with an fp32 accumulator; EXACT (see exact_dots) upcasts both operands first."""
    if EXACT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


def block_size(n: int, *, lo: int = 16, hi: int = 128) -> int:
    """A power-of-two block covering `n` elements, clamped to [lo, hi] (tl.dot needs >= 16)."""
    return max(lo, min(hi, triton.next_power_of_2(n)))


# ---- chunked linear attention (linear_attention, delta_rule) -----------------------------------
#
# Per (batch row, head) the sequence is cut into chunks of BT tokens; the last chunk may be shorter
# and is masked. Torch prepares, per token:
#
#     g [b, s, h] fp32    inclusive cumsum of log_decay inside each chunk (chunk_cumsum)
#     seg [b, s] int32    cumsum of resets along s: each token's document segment (segment_ids)
#
# For chunk c with tokens i, j, last token L and sigma_c = the seg of the token before the chunk
# (0 for the first chunk), resets act only through these masks, never as -inf inside a cumsum:
#
#     reach_i = [seg_i = sigma_c]         token i reads the incoming state
#     same_ij = [j <= i] [seg_i = seg_j]  pairs inside the chunk
#     leave_j = [seg_j = seg_L]           key j is in the state leaving the chunk
#     keep_c  = [seg_L = sigma_c]         the incoming state survives the chunk
#
# and chunk_weights returns r_i = reach_i exp(g_i), w_j = leave_j exp(g_L - g_j), keep_c exp(g_L)
# and A_ij = same_ij exp(g_i - g_j), all in [0, 1] (log decays are <= 0, so nothing overflows).


@triton.jit
def chunk_weights(g, seg, i_b, i_h, i_t, S, H, BT: tl.constexpr):
    """Chunk i_t of row i_b, head i_h (g [b, s, h] fp32 and seg [b, s] int32, contiguous): token
    offsets o_t [BT], their mask m_t, and r [BT], w [BT], keep (a scalar) and A [BT, BT] (the
    comment above), fp32; zero where a token is past S or a reset cuts the term."""
    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < S
    i_last = tl.minimum(i_t * BT + BT, S) - 1
    b_g = tl.load(g + (i_b * S + o_t) * H + i_h, mask=m_t, other=0.0)
    b_seg = tl.load(seg + i_b * S + o_t, mask=m_t, other=-1)
    g_last = tl.load(g + (i_b * S + i_last) * H + i_h)
    seg_last = tl.load(seg + i_b * S + i_last)
    seg_before = tl.where(i_t > 0, tl.load(seg + i_b * S + tl.maximum(i_t * BT - 1, 0)), 0)
    b_r = tl.where(m_t & (b_seg == seg_before), tl.exp(b_g), 0.0)
    b_w = tl.where(m_t & (b_seg == seg_last), tl.exp(g_last - b_g), 0.0)
    b_keep = tl.where(seg_last == seg_before, tl.exp(g_last), 0.0)
    m_a = (o_t[:, None] >= o_t[None, :]) & (b_seg[:, None] == b_seg[None, :])
    b_a = tl.exp(tl.where(m_a, b_g[:, None] - b_g[None, :], float("-inf")))  # masked before exp: no overflow
    return o_t, m_t, b_r, b_w, b_keep, b_a


@triton.jit
def token_pointers(x, i_b, i_h, o_t, m_t, o_d, m_d, S, H, D):
    """Pointers [BT, BD] into a contiguous [b, s, h, D] tensor at tokens o_t and channels o_d, and their mask."""
    return x + ((i_b * S + o_t[:, None]) * H + i_h) * D + o_d[None, :], m_t[:, None] & m_d[None, :]


@triton.jit
def state_pointers(x, i_state, o_k, m_k, o_v, m_v, DK, DV):
    """Pointers [BK, BV] into state i_state of a contiguous [n, DK, DV] tensor, and their mask."""
    return x + i_state * DK * DV + o_k[:, None] * DV + o_v[None, :], m_k[:, None] & m_v[None, :]


def segment_ids(resets: torch.Tensor | None, b: int, s: int, device: torch.device) -> torch.Tensor:
    """seg [b, s] int32, each token's document segment: the cumsum of resets [b, s] bool along s
    (zeros when resets is None: one document per row)."""
    if resets is None:
        return torch.zeros(b, s, dtype=torch.int32, device=device)
    return resets.cumsum(1, dtype=torch.int32)


def chunk_cumsum(x: torch.Tensor, chunk: int, *, reverse: bool = False) -> torch.Tensor:
    """[b, s, h] -> the inclusive cumsum inside each chunk of `chunk` tokens along s (reverse: from
    the chunk's end). Forward it turns log_decay into g; reversed, it turns dg into d log_decay."""
    b, s, h = x.shape
    n = triton.cdiv(s, chunk) * chunk
    x = F.pad(x, (0, 0, 0, n - s)).view(b, n // chunk, chunk, h)  # zeros after the end change no sum
    x = x.flip(2).cumsum(2).flip(2) if reverse else x.cumsum(2)
    return x.reshape(b, n, h)[:, :s]
