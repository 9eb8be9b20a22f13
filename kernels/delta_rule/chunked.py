"""The gated delta rule chunk by chunk in PyTorch (fp32 math), and the affine map a chunk applies
to the state: the pair (A, B) that sequence parallelism composes across ranks (issue #15).

The WY representation / UT transform of DeltaNet (arXiv:2406.06484, sec. 3) with Gated DeltaNet's
decay (arXiv:2412.06464, sec. 3.3), derived here with resets. A chunk of C tokens receives the
state S_0. With g_i the inclusive cumulative log decay inside the chunk and seg_i the number of
resets in the chunk up to and including token i (segment 0 continues S_0's document), define

    D_ij    = exp(g_i - g_j) [j <= i, seg_j = seg_i]   decay from just after token j to token i
    reach_i = exp(g_i) [seg_i = 0]                      how much of S_0 reaches token i
    end_j   = exp(g_C - g_j) [seg_j = seg_C]            how much of token j's write leaves the chunk
    carry   = exp(g_C) [seg_C = 0]                      how much of S_0 leaves the chunk

(all exponents <= 0; the brackets are masks, never a -inf in a cumulative sum). Unrolling
reference.py's steps, the state token i's delta reads (decayed, before i writes) is
reach_i S_0 + sum_{j<i} D_ij k_j u_j^T, so u_i = beta_i (v_i - reach_i S_0^T k_i - sum_{j<i} D_ij (k_i.k_j) u_j):

    (I + L) U = diag(beta) V - diag(beta reach) K S_0,   L_ij = beta_i D_ij (k_i . k_j) for j < i

L is strictly lower triangular, so T = (I + L)^-1 is unit lower triangular (a forward substitution,
`solve_triangular`), and U = U_0 - W S_0 with W = T diag(beta reach) K [C, d_k], U_0 = T diag(beta) V
[C, d_v]. Then, with K_end = diag(end) K,

    O   = diag(reach) (scale Q) S_0 + ((scale Q K^T) * D) U
    S_C = carry S_0 + K_end^T U = A S_0 + B,   A = carry I - K_end^T W  [d_k, d_k],   B = K_end^T U_0  [d_k, d_v]

A acts on the d_k side only, so column blocks of S pass through it independently. A run of chunks
composes in order: (A2, B2) after (A1, B1) is (A2 A1, A2 B1 + B2).

Resets: L_ij = 0 across a reset, so T is block diagonal over segments; W's rows vanish outside
segment 0 (reach does) and K_end's outside the last segment. A chunk holding a reset therefore has
carry = 0 and K_end^T W = 0: A is exactly zero (no rounding), B is the state its last document
builds, and the state received has no effect on anything after the reset. So a part of the
sequence with a reset anywhere has A = 0.

Cost per chunk and head: O(C^2 (d_k + d_v)) for the substitution and the scores, O(C d_k d_v) for
the state, O(C^2) memory.
Backward is autograd through these ops (solve_triangular included); triton.py has its own.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ithaca.kernels.linear_attention import expand_log_decay, state_reach


class _ChunkFactors(NamedTuple):
    """One chunk's UT-transform factors (module docstring), head-major: [b, h, ...], fp32."""

    decay: torch.Tensor  # D [b, h, C, C]
    reach: torch.Tensor  # [b, h, C, 1]
    carry: torch.Tensor  # [b, h, 1, 1]
    w: torch.Tensor  # W [b, h, C, d_k]
    u0: torch.Tensor  # U_0 [b, h, C, d_v]
    k_end: torch.Tensor  # K_end [b, h, C, d_k]


def _chunk_factors(k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, log_decay: torch.Tensor,
                   resets: torch.Tensor | None) -> _ChunkFactors:
    """k [b, C, h, d_k], v [b, C, h, d_v], beta [b, C, h], log_decay [b, C, h] fp32 (expanded), resets [b, C]."""
    c, d_v = k.shape[1], v.shape[-1]
    g = log_decay.cumsum(dim=1)  # [b, C, h], inclusive
    reach, carry, seg = state_reach(log_decay, resets)
    causal = torch.ones(c, c, dtype=torch.bool, device=k.device).tril()
    same = causal & (seg[:, :, None] == seg[:, None, :])  # [b, i, j]: j <= i, no reset in (j, i]
    decay = (g[:, :, None, :] - g[:, None, :, :]).masked_fill(~same[..., None], float("-inf")).exp()
    decay = decay.permute(0, 3, 1, 2)  # [b, i, j, h] -> [b, h, i, j]
    kf = k.float().transpose(1, 2)  # [b, h, C, d_k]
    beta_col = beta.float().transpose(1, 2)[..., None]  # [b, h, C, 1]
    reach = reach.transpose(1, 2)[..., None]  # [b, h, C, 1]
    lower = beta_col * (kf @ kf.transpose(-1, -2)) * decay.tril(diagonal=-1)  # L [b, h, C, C]
    rhs = torch.cat([beta_col * v.float().transpose(1, 2), beta_col * reach * kf], dim=-1)  # [b, h, C, d_v + d_k]
    # solves (I + L) [U_0 | W] = rhs by forward substitution: unitriangular takes the diagonal as ones,
    # so passing L (zero diagonal) means I + L
    u0, w = torch.linalg.solve_triangular(lower, rhs, upper=False, unitriangular=True).split([d_v, kf.shape[-1]], -1)
    last_doc = (seg == seg[:, -1:])[..., None]  # [b, C, 1]: tokens whose writes reach the chunk's end
    end = (g[:, -1:, :] - g).masked_fill(~last_doc, float("-inf")).exp()  # [b, C, h]
    k_end = end.transpose(1, 2)[..., None] * kf
    return _ChunkFactors(decay, reach, carry[..., None, None], w, u0, k_end)


def _chunks(s: int, chunk_size: int) -> list[slice]:
    """The token ranges of the chunks, in order; the last is shorter when chunk_size does not divide s."""
    if chunk_size < 1:
        raise ValueError(f"delta_rule: chunk_size={chunk_size}; a chunk holds at least one token")
    return [slice(start, start + chunk_size) for start in range(0, s, chunk_size)]


def delta_rule_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, *,
                       log_decay: torch.Tensor | None = None, scale: float | None = None,
                       resets: torch.Tensor | None = None, initial_state: torch.Tensor | None = None,
                       output_final_state: bool = False,
                       chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The chunked form, chunk by chunk; reference.py's contract: q, k [b, s, h, d_k], v [b, s, h, d_v],
    beta [b, s, h] -> (o [b, s, h, d_v] in q's dtype, final state [b, h, d_k, d_v] fp32 or None)."""
    b, s, h, d_k = q.shape
    scale = d_k ** -0.5 if scale is None else scale
    log_decay = expand_log_decay(log_decay, b, s, h, q.device)
    state = q.new_zeros(b, h, d_k, v.shape[-1], dtype=torch.float32) if initial_state is None else initial_state.float()
    outs = []
    for part in _chunks(s, chunk_size):
        f = _chunk_factors(k[:, part], v[:, part], beta[:, part], log_decay[:, part],
                           None if resets is None else resets[:, part])
        u = f.u0 - f.w @ state  # [b, h, C, d_v]: the deltas, given the state received
        qs = scale * q[:, part].float().transpose(1, 2)  # [b, h, C, d_k]
        kf = k[:, part].float().transpose(1, 2)
        outs.append((f.reach * qs) @ state + ((qs @ kf.transpose(-1, -2)) * f.decay) @ u)
        state = f.carry * state + f.k_end.transpose(-1, -2) @ u
    out = torch.cat(outs, dim=2).transpose(1, 2)  # [b, h, s, d_v] -> [b, s, h, d_v]
    return out.to(q.dtype), state if output_final_state else None


def delta_rule_transition_chunked(k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, *,
                                  log_decay: torch.Tensor | None = None, resets: torch.Tensor | None = None,
                                  chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The affine map S_out = A S_in + B of tokens k, v [b, s, h, d], beta [b, s, h] -> (A [b, h, d_k, d_k],
    B [b, h, d_k, d_v]) fp32, differentiable; chunk pairs composed in order (module docstring)."""
    b, s, h, d_k = k.shape
    log_decay = expand_log_decay(log_decay, b, s, h, k.device)
    a = torch.eye(d_k, device=k.device).expand(b, h, d_k, d_k)
    b_state = k.new_zeros(b, h, d_k, v.shape[-1], dtype=torch.float32)
    for part in _chunks(s, chunk_size):
        f = _chunk_factors(k[:, part], v[:, part], beta[:, part], log_decay[:, part],
                           None if resets is None else resets[:, part])
        k_end_t = f.k_end.transpose(-1, -2)
        # A_c X = carry X - K_end^T (W X): applied to A and B without forming A_c (C d_k^2, not d_k^3)
        a = f.carry * a - k_end_t @ (f.w @ a)
        b_state = f.carry * b_state + k_end_t @ (f.u0 - f.w @ b_state)
    return a, b_state
