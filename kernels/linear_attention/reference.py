"""Linear attention with decay, token by token in plain PyTorch (fp32 math): the spec every other path matches.

Recurrence, per batch row and head, with state S (d_k x d_v), decay lambda_i = exp(log_decay_i):

    S_i = lambda_i * S_{i-1} + k_i^T v_i          o_i = (scale * q_i) S_i

log_decay is None (plain linear attention, lambda = 1), [h] (a fixed per-head decay: retention,
arXiv:2307.08621 / lightning attention, arXiv:2401.04658), or [b, s, h] (data-dependent gates:
GLA, arXiv:2312.06635, per-head scalar gates as in its simple-GLA form). `resets` [b, s] bool
marks tokens that start a new document: the state before them is dropped (a decay of exactly
zero, applied as a mask because a literal -inf in a cumulative log sum gives NaN).
"""

from __future__ import annotations

import torch


def expand_log_decay(log_decay: torch.Tensor | None, b: int, s: int, h: int,
                     device: torch.device) -> torch.Tensor:
    """None | [h] | [b, s, h] -> [b, s, h] fp32 log decays (zeros for None; [h] broadcast, not copied).

    Differentiable: the gradient of an [h] decay is the sum over b and s of the expanded one's.
    """
    if log_decay is None:
        return torch.zeros(b, s, h, device=device)
    if log_decay.dim() == 1:
        return log_decay.float().expand(b, s, h)
    return log_decay.float()


def linear_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               log_decay: torch.Tensor | None = None, *, scale: float,
                               initial_state: torch.Tensor | None = None,
                               resets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token by token, O(s) sequential steps. q, k [b, s, h, d_k]; v [b, s, h, d_v]; initial_state
    [b, h, d_k, d_v] or None (zeros) -> (o [b, s, h, d_v] in q's dtype, final state [b, h, d_k, d_v] fp32).
    Differentiable through autograd."""
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
