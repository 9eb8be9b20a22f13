"""LASP-2: sequence parallelism for linear attention with one all-gather of memory states (arXiv:2502.07563).

Math in DESIGN.md, "LASP-2". Rank t holds chunk t of the sequence (contiguous). Each rank computes
from its own chunk, with no incoming state: its output o_local, its memory state M_t (the state
the chunk would hand on) and the carry a_t = exp(g_C) (how much of an incoming state survives the
chunk; 0 when a document starts in it). One all-gather of every (M_j, a_j) lets each rank form
the state entering its chunk,

    S_t = sum_{j<t} (prod_{j<m<t} a_m) M_j,

and add exp(g_i) (scale q_i) S_t to each token's output. Backward goes through the same
operations; the all-gather's backward is one reduce-scatter of the state gradients. Per layer and
direction that is P * b * h * (d_k*d_v + 1) elements, whatever the sequence length.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ithaca.kernels.linear_attention import expand_log_decay, linear_attention_chunked, state_reach
from ithaca.parallel.gather import gather_states

CHUNK = 64
"""Sub-chunk length for the local chunked computation (memory O(CHUNK^2) per head, not O(s^2))."""


def _prefix_weights(carries: torch.Tensor, rank: int) -> torch.Tensor:
    """[P, b, h] carries -> [P, b, h] weights w_j = prod_{j<m<rank} a_m for j < rank, else 0.

    Every rank, rank 0 too, uses all gathered states (some with weight 0): the all-gather's
    backward is a collective, and a rank whose graph skipped it would leave the others waiting.
    """
    weights = torch.zeros_like(carries)
    for j in range(rank):
        weights[j] = carries[j + 1:rank].prod(dim=0)  # empty product (j = rank-1) is 1
    return weights


def lasp2_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup, *,
                    log_decay: torch.Tensor | None = None, scale: float | None = None,
                    resets: torch.Tensor | None = None) -> torch.Tensor:
    """Exact linear attention with decay over a sequence split contiguously across `group`.

    q, k [b, s, h, d_k] and v [b, s, h, d_v]: this rank's chunk (rank t holds positions
    [t*s, (t+1)*s)). `log_decay` (<= 0) is None (plain), [h] (fixed per-head decay) or
    [b, s, h] (per-token gates, this rank's chunk); `scale` defaults to d_k^-0.5, applied to q;
    `resets` [b, s] bool marks tokens that start a document. Returns o [b, s, h, d_v] in q's dtype.
    Raises ValueError on shapes that do not fit.
    """
    b, s, h, d_k = q.shape if q.dim() == 4 else (None,) * 4
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"lasp2_attention: want q = k [b, s, h, d_k], v [b, s, h, d_v]; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if log_decay is not None and tuple(log_decay.shape) not in ((h,), (b, s, h)):
        raise ValueError(f"lasp2_attention: log_decay must be [h]={(h,)} or [b, s, h]={(b, s, h)}; "
                         f"got {tuple(log_decay.shape)}")
    if resets is not None and tuple(resets.shape) != (b, s):
        raise ValueError(f"lasp2_attention: resets must be [b, s]={(b, s)}; got {tuple(resets.shape)}")
    scale = d_k ** -0.5 if scale is None else scale
    log_decay = expand_log_decay(log_decay, b, s, h, q.device)
    out_local, memory = linear_attention_chunked(q, k, v, log_decay, scale=scale, chunk_size=CHUNK, resets=resets)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if world == 1:
        return out_local
    reach, carry, _ = state_reach(log_decay, resets)
    # one all-gather carries both: the d_k x d_v states and their carries
    packed = gather_states(torch.cat([memory.flatten(1), carry], dim=1), group)  # [P, b, h*d_k*d_v + h]
    memories = packed[:, :, : memory[0].numel()].view(world, *memory.shape)
    carries = packed[:, :, memory[0].numel():]
    state = torch.einsum("pbh,pbhkv->bhkv", _prefix_weights(carries, rank), memories)
    inter = torch.einsum("bshk,bhkv->bshv", scale * q.float() * reach[..., None], state)
    return (out_local.float() + inter).to(q.dtype)
