"""Linear attention with per-head decay, in plain PyTorch (fp32 math): the recurrence and the chunked form.

Recurrence, per batch row and head, with state S (d_k x d_v), decay lambda_i = exp(log_decay_i):

    S_i = lambda_i * S_{i-1} + k_i^T v_i          o_i = (scale * q_i) S_i

log_decay is None (plain linear attention, lambda = 1), [h] (a fixed per-head decay: retention,
arXiv:2307.08621 / lightning attention, arXiv:2401.04658), or [b, s, h] (data-dependent gates:
GLA, arXiv:2312.06635, per-head scalar gates as in its simple-GLA form). `resets` [b, s] bool
marks tokens that start a new document: the state before them is dropped (a decay of exactly
zero, applied as a mask because a literal -inf in a cumulative log sum gives NaN).

Chunked form (what LASP-2 and a future fused kernel compute), for a chunk with incoming state S_0
and inclusive cumulative log decay g_i inside the chunk:

    o_i = exp(g_i) (scale q_i) S_0 + sum_{j<=i} exp(g_i - g_j) (scale q_i . k_j) v_j
    S_C = exp(g_C) S_0 + sum_j exp(g_C - g_j) k_j^T v_j

with every term that crosses a reset dropped.
"""

from __future__ import annotations

import torch


def expand_log_decay(log_decay: torch.Tensor | None, b: int, s: int, h: int,
                     device: torch.device) -> torch.Tensor:
    """None | [h] | [b, s, h] -> [b, s, h] fp32 log decays."""
    if log_decay is None:
        return torch.zeros(b, s, h, device=device)
    if log_decay.dim() == 1:
        return log_decay.float().expand(b, s, h)
    return log_decay.float()


def linear_attention_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               log_decay: torch.Tensor | None = None, *, scale: float,
                               initial_state: torch.Tensor | None = None,
                               resets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token by token. q, k [b, s, h, d_k]; v [b, s, h, d_v] -> (o [b, s, h, d_v] in q's dtype,
    final state [b, h, d_k, d_v] fp32)."""
    b, s, h, d_k = q.shape
    decay = expand_log_decay(log_decay, b, s, h, q.device).exp()
    state = q.new_zeros(b, h, d_k, v.shape[-1], dtype=torch.float32) if initial_state is None else initial_state.float()
    outs = []
    for i in range(s):
        keep = decay[:, i, :, None, None]
        if resets is not None:
            keep = keep * (~resets[:, i, None, None, None]).float()
        state = keep * state + torch.einsum("bhk,bhv->bhkv", k[:, i].float(), v[:, i].float())
        outs.append(torch.einsum("bhk,bhkv->bhv", scale * q[:, i].float(), state))
    return torch.stack(outs, dim=1).to(q.dtype), state


def state_reach(log_decay: torch.Tensor, resets: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """How an incoming state reaches a chunk's tokens, and how much of it leaves the chunk.

    log_decay [b, C, h] fp32 -> (reach [b, C, h]: exp(g_i), 0 past a reset; carry [b, h]: exp(g_C),
    0 if any reset; seg [b, C]: segment index, tokens interact only inside one segment).
    A reset on the chunk's first token drops the incoming state but starts no new segment.
    """
    b, c, _ = log_decay.shape
    g = log_decay.cumsum(dim=1)  # inclusive
    if resets is None:
        seg = torch.zeros(b, c, dtype=torch.long, device=log_decay.device)
        first_reset = torch.zeros(b, 1, dtype=torch.bool, device=log_decay.device)
    else:
        seg = resets.long().cumsum(dim=1)
        seg, first_reset = seg - seg[:, :1], resets[:, :1]
    reach = g.exp() * ((seg == 0) & ~first_reset)[..., None]
    carry = g[:, -1].exp() * ((seg[:, -1:] == 0) & ~first_reset)
    return reach, carry, seg


def chunk_memory(k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
                 resets: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The state a chunk hands on from a zero start, M = sum_j exp(g_C - g_j) k_j^T v_j over the
    chunk's last document, and its carry: -> (memory [b, h, d_k, d_v], carry [b, h]) fp32.
    O(C d_k d_v): cheap next to the chunk's output, so LASP-2 sends it first."""
    g = log_decay.cumsum(dim=1)
    _, carry, seg = state_reach(log_decay, resets)
    to_end = (g[:, -1:, :] - g).masked_fill(~(seg == seg[:, -1:])[..., None], float("-inf")).exp()  # [b, C, h]
    return torch.einsum("bjh,bjhk,bjhv->bhkv", to_end, k.float(), v.float()), carry


def chunk_terms(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, *, scale: float,
                resets: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """One chunk's parts that do not depend on the incoming state (all fp32):

    intra [b, C, h, d_v]      the masked within-chunk output
    memory [b, h, d_k, d_v]   M = sum_j exp(g_C - g_j) k_j^T v_j (the state this chunk adds)
    carry [b, h]              exp(g_C), or 0 when a document starts inside the chunk
    q_decayed [b, C, h, d_k]  exp(g_i) scale q_i, zero for tokens the incoming state must not reach
    """
    c = q.shape[1]
    g = log_decay.cumsum(dim=1)  # [b, C, h], inclusive
    reach, _, seg = state_reach(log_decay, resets)
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    same = causal & (seg[:, :, None] == seg[:, None, :])  # [b, C, C]: no reset in (j, i]
    log_weights = (g[:, :, None, :] - g[:, None, :, :]).masked_fill(~same[..., None], float("-inf"))  # [b, i, j, h]
    qf = scale * q.float()
    scores = torch.einsum("bihd,bjhd->bijh", qf, k.float()) * log_weights.exp()
    intra = torch.einsum("bijh,bjhv->bihv", scores, v.float())
    memory, carry = chunk_memory(k, v, log_decay, resets)
    return {"intra": intra, "memory": memory, "carry": carry, "q_decayed": qf * reach[..., None]}


def linear_attention_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             log_decay: torch.Tensor | None = None, *, scale: float, chunk_size: int = 64,
                             initial_state: torch.Tensor | None = None,
                             resets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunked form, chunk by chunk (the last chunk may be shorter); same contract as the recurrence."""
    b, s, h, d_k = q.shape
    log_decay = expand_log_decay(log_decay, b, s, h, q.device)
    state = q.new_zeros(b, h, d_k, v.shape[-1], dtype=torch.float32) if initial_state is None else initial_state.float()
    outs = []
    for start in range(0, s, chunk_size):
        part = slice(start, start + chunk_size)
        t = chunk_terms(q[:, part], k[:, part], v[:, part], log_decay[:, part], scale=scale,
                        resets=None if resets is None else resets[:, part])
        outs.append(t["intra"] + torch.einsum("bihk,bhkv->bihv", t["q_decayed"], state))
        state = t["carry"][..., None, None] * state + t["memory"]
    return torch.cat(outs, dim=1).to(q.dtype), state
