"""Linear attention chunk by chunk in PyTorch (fp32 math): the exact path off CUDA, and the two
pieces LASP-2 composes across ranks (`state_reach`, `chunk_memory`).

For a chunk of C tokens with incoming state S_0, inclusive cumulative log decay g_i inside the
chunk and segment seg_i = the number of resets in the chunk up to and including token i
(segment 0 is the incoming state's document):

    o_i = [seg_i = 0] exp(g_i) (scale q_i) S_0 + sum_{j <= i, seg_j = seg_i} exp(g_i - g_j) (scale q_i . k_j) v_j
    S_C = [seg_C = 0] exp(g_C) S_0 + sum_{seg_j = seg_C} exp(g_C - g_j) k_j^T v_j

Every exponent is <= 0 (log decays are), so nothing overflows; the brackets are the resets (a
decay of exactly zero) applied as masks, never as a -inf inside a cumulative sum (that gives NaN).
Memory is O(C^2) per head for the within-chunk scores, not O(s^2). Differentiable through autograd.
"""

from __future__ import annotations

import torch

from ithaca.kernels.linear_attention.reference import expand_log_decay


def state_reach(log_decay: torch.Tensor,
                resets: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """How a state entering a chunk reaches the chunk's tokens, and how much of it leaves the chunk.

    log_decay [b, C, h] fp32 (<= 0, expanded: see expand_log_decay); resets [b, C] bool or None.
    Returns (reach [b, C, h] fp32: exp(g_i), 0 from the chunk's first reset on; carry [b, h] fp32:
    exp(g_C), 0 if a document starts in the chunk; seg [b, C] long: the segment of each token, 0
    for the incoming state's document; tokens of different segments never interact).
    An entering state S adds reach_i * (scale q_i) S to token i's output and leaves as carry * S.
    """
    g = log_decay.cumsum(dim=1)  # [b, C, h], inclusive
    if resets is None:
        seg = torch.zeros(log_decay.shape[:2], dtype=torch.long, device=log_decay.device)
    else:
        seg = resets.long().cumsum(dim=1)  # a reset on the first token already leaves segment 0
    reach = g.exp() * (seg == 0)[..., None]
    carry = g[:, -1].exp() * (seg[:, -1:] == 0)
    return reach, carry, seg


def chunk_memory(k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
                 resets: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The state a chunk hands on from a zero start, and its carry.

    k [b, C, h, d_k], v [b, C, h, d_v]; log_decay [b, C, h] fp32 (<= 0, expanded); resets [b, C]
    bool or None. Returns (memory [b, h, d_k, d_v] fp32: M = sum_j exp(g_C - g_j) k_j^T v_j over
    the chunk's last document; carry [b, h] fp32, as state_reach's). The state leaving the chunk
    is carry * S_in + M. O(C d_k d_v): cheap next to the chunk's output, so LASP-2 sends it first.
    """
    g = log_decay.cumsum(dim=1)
    _, carry, seg = state_reach(log_decay, resets)
    last_doc = (seg == seg[:, -1:])[..., None]  # [b, C, 1]: tokens whose keys reach the chunk's end
    to_end = (g[:, -1:, :] - g).masked_fill(~last_doc, float("-inf")).exp()  # [b, C, h]
    return torch.einsum("bjh,bjhk,bjhv->bhkv", to_end, k.float(), v.float()), carry


def _chunk_output(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, *, scale: float,
                  resets: torch.Tensor | None, state: torch.Tensor) -> torch.Tensor:
    """One chunk's output [b, C, h, d_v] fp32, given the state entering it [b, h, d_k, d_v]."""
    c = q.shape[1]
    g = log_decay.cumsum(dim=1)  # [b, C, h]
    reach, _, seg = state_reach(log_decay, resets)
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    same = causal & (seg[:, :, None] == seg[:, None, :])  # [b, C, C]: j <= i, no reset in (j, i]
    log_weights = (g[:, :, None, :] - g[:, None, :, :]).masked_fill(~same[..., None], float("-inf"))  # [b, i, j, h]
    qf = scale * q.float()
    scores = torch.einsum("bihd,bjhd->bijh", qf, k.float()) * log_weights.exp()
    intra = torch.einsum("bijh,bjhv->bihv", scores, v.float())
    return intra + torch.einsum("bihk,bhkv->bihv", qf * reach[..., None], state)


def linear_attention_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             log_decay: torch.Tensor | None = None, *, scale: float, chunk_size: int = 64,
                             initial_state: torch.Tensor | None = None,
                             resets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunked form, chunk by chunk (the last chunk may be shorter); reference.py's contract:
    q, k [b, s, h, d_k], v [b, s, h, d_v] -> (o [b, s, h, d_v] in q's dtype, final state
    [b, h, d_k, d_v] fp32)."""
    b, s, h, d_k = q.shape
    log_decay = expand_log_decay(log_decay, b, s, h, q.device)
    state = q.new_zeros(b, h, d_k, v.shape[-1], dtype=torch.float32) if initial_state is None else initial_state.float()
    outs = []
    for start in range(0, s, chunk_size):
        part = slice(start, start + chunk_size)
        chunk_resets = None if resets is None else resets[:, part]
        outs.append(_chunk_output(q[:, part], k[:, part], v[:, part], log_decay[:, part], scale=scale,
                                  resets=chunk_resets, state=state))
        memory, carry = chunk_memory(k[:, part], v[:, part], log_decay[:, part], chunk_resets)
        state = carry[..., None, None] * state + memory
    return torch.cat(outs, dim=1).to(q.dtype), state
