"""The gated delta rule, token by token in plain PyTorch (fp32 math): the spec the chunked form matches.

Recurrence, per batch row and head, with state S (d_k x d_v), as Gated DeltaNet (arXiv:2412.06464,
eq. 10) and fla write it, with gamma_t = exp(log_decay_t) and r_t = 1 if token t starts a document:

    S <- (1 - r_t) gamma_t S             decay; a reset drops the state (as linear_attention's resets)
    u_t = beta_t (v_t - S^T k_t)         the delta: what the decayed state mispredicts for k_t
    S <- S + k_t u_t^T
    o_t = S^T (scale q_t)

so S_t = M_t S_{t-1} + beta_t k_t v_t^T with M_t = (1 - r_t) gamma_t (I - beta_t k_t k_t^T): the
step is affine in the state, and so is any run of steps (`delta_rule_transition_reference`). With
||k_t|| <= 1 and beta_t in (0, 1) (Gated DeltaNet L2-normalises keys, sigmoid beta) M_t has norm
<= 1 and the recurrence is stable; nothing here enforces that.
"""

from __future__ import annotations

import torch

from ithaca.kernels.linear_attention import expand_log_decay


def _keeps(log_decay: torch.Tensor | None, resets: torch.Tensor | None, b: int, s: int, h: int,
           device: torch.device) -> torch.Tensor:
    """[b, s, h] fp32: (1 - r_t) gamma_t, how much of the state before token t survives into it."""
    keep = expand_log_decay(log_decay, b, s, h, device).exp()
    if resets is not None:
        keep = keep * (~resets)[..., None].float()
    return keep


def delta_rule_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, *,
                         log_decay: torch.Tensor | None = None, scale: float | None = None,
                         resets: torch.Tensor | None = None, initial_state: torch.Tensor | None = None,
                         output_final_state: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token by token, O(s) sequential steps. q, k [b, s, h, d_k]; v [b, s, h, d_v]; beta [b, s, h];
    log_decay None | [h] | [b, s, h] (<= 0); scale None = d_k ** -0.5; resets [b, s] bool or None;
    initial_state [b, h, d_k, d_v] or None (zeros) -> (o [b, s, h, d_v] in q's dtype, final state
    [b, h, d_k, d_v] fp32 if output_final_state else None). Differentiable through autograd."""
    b, s, h, d_k = q.shape
    scale = d_k ** -0.5 if scale is None else scale
    keep = _keeps(log_decay, resets, b, s, h, q.device)
    state = q.new_zeros(b, h, d_k, v.shape[-1], dtype=torch.float32) if initial_state is None else initial_state.float()
    outs = []
    for t in range(s):
        k_t = k[:, t].float()  # [b, h, d_k]
        state = keep[:, t, :, None, None] * state
        u = beta[:, t, :, None].float() * (v[:, t].float() - torch.einsum("bhkv,bhk->bhv", state, k_t))
        state = state + torch.einsum("bhk,bhv->bhkv", k_t, u)
        outs.append(torch.einsum("bhkv,bhk->bhv", state, scale * q[:, t].float()))
    return torch.stack(outs, dim=1).to(q.dtype), state if output_final_state else None


def delta_rule_transition_reference(k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, *,
                                    log_decay: torch.Tensor | None = None,
                                    resets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The affine map a run of tokens applies to the state it receives, S_out = A S_in + B, step by step.

    k [b, s, h, d_k], v [b, s, h, d_v], beta [b, s, h], log_decay and resets as in
    delta_rule_reference -> (A [b, h, d_k, d_k] = M_s ... M_1, B [b, h, d_k, d_v]: the final state
    from a zero start), both fp32 and differentiable. A token that starts a document makes its
    M_t, and so A, exactly zero.
    """
    b, s, h, d_k = k.shape
    keep = _keeps(log_decay, resets, b, s, h, k.device)
    eye = torch.eye(d_k, device=k.device)
    a = eye.expand(b, h, d_k, d_k)
    state = k.new_zeros(b, h, d_k, v.shape[-1], dtype=torch.float32)
    for t in range(s):
        k_t, beta_t = k[:, t].float(), beta[:, t, :, None, None].float()
        m = keep[:, t, :, None, None] * (eye - beta_t * torch.einsum("bhi,bhj->bhij", k_t, k_t))  # M_t
        a = m @ a
        state = m @ state + beta_t * torch.einsum("bhk,bhv->bhkv", k_t, v[:, t].float())
    return a, state
