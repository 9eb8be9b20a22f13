"""Softmax attention in plain PyTorch, fp32 math: the spec every fast path matches.

    out = softmax(scale * q k^T [masked]) v           lse = logsumexp(scale * q k^T [masked])

and the backward from the final (out, lse), as ring attention uses it for each block (DESIGN.md,
"Ring attention"): each block's gradients use the *merged* output and log-sum-exp,

    P = exp(scale * q k^T - lse)       dV = P^T dO        D = rowsum(dO * O)
    dS = P * (dO V^T - D)              dQ = scale * dS K  dK = scale * dS^T Q

Layout [b, s, h, d]; k and v may have fewer heads (query head i reads kv head i // (h / h_kv));
lse is [b, h, s_q] fp32. Masks: causal is aligned to the bottom right (query i of s_q reads keys
j <= i + s_k - s_q, as flash-attn does), and with document ids (`q_doc_ids` [b, s_q],
`k_doc_ids` [b, s_k]) a query reads only keys of its own document. A query with no key left
gets out 0 and lse -inf, which a log-sum-exp merge then ignores.
"""

from __future__ import annotations

import torch

from ithaca.kernels.attention.shapes import repeat_kv_heads


def allowed_keys(s_q: int, s_k: int, *, is_causal: bool, q_doc_ids: torch.Tensor | None,
                 k_doc_ids: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """Which keys each query may read, [b or 1, s_q, s_k] bool, or None when all of them."""
    allowed = None
    if is_causal:
        allowed = torch.ones(s_q, s_k, dtype=torch.bool, device=device).tril(s_k - s_q)[None]
    if q_doc_ids is not None:
        same_doc = q_doc_ids[:, :, None] == k_doc_ids[:, None, :]
        allowed = same_doc if allowed is None else allowed & same_doc
    return allowed


def _scores(q: torch.Tensor, k: torch.Tensor, is_causal: bool, scale: float, q_doc_ids: torch.Tensor | None,
            k_doc_ids: torch.Tensor | None) -> torch.Tensor:
    """scale * q k^T, masked entries -inf: [b, h, s_q, s_k] fp32."""
    k = repeat_kv_heads(k.float(), q.shape[2] // k.shape[2])
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k) * scale
    allowed = allowed_keys(q.shape[1], k.shape[1], is_causal=is_causal, q_doc_ids=q_doc_ids, k_doc_ids=k_doc_ids,
                           device=q.device)
    return scores if allowed is None else scores.masked_fill(~allowed[:, None], float("-inf"))


def _probs(scores: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """exp(scores - lse); rows whose lse is -inf (no key at all) give 0, not NaN."""
    return torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse)[..., None])


def attention_lse_fwd_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, is_causal: bool,
                                scale: float, q_doc_ids: torch.Tensor | None = None,
                                k_doc_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (out [b, s_q, h, d] in q's dtype, lse [b, h, s_q] fp32). Differentiable (plain autograd ops)."""
    scores = _scores(q, k, is_causal, scale, q_doc_ids, k_doc_ids)
    has_key = ~torch.isinf(scores).all(dim=-1)  # [b, h, s_q]
    # logsumexp of an all -inf row is -inf with a NaN gradient: take it of zeros there instead
    lse = torch.logsumexp(torch.where(has_key[..., None], scores, 0.0), dim=-1)
    lse = torch.where(has_key, lse, float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", _probs(scores, lse),
                       repeat_kv_heads(v.float(), q.shape[2] // k.shape[2]))
    return out.to(q.dtype), lse


def attention_lse_bwd_reference(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                out: torch.Tensor, lse: torch.Tensor, *, is_causal: bool, scale: float,
                                q_doc_ids: torch.Tensor | None = None,
                                k_doc_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one block given the final out and lse -> (dq, dk, dv) fp32, shaped like q, k, v."""
    b, s_k, h_kv, d = k.shape
    group = q.shape[2] // h_kv
    probs = _probs(_scores(q, k, is_causal, scale, q_doc_ids, k_doc_ids), lse)  # [b, h, s_q, s_k]
    dout32 = dout.float()
    dv = torch.einsum("bhqk,bqhd->bkhd", probs, dout32)
    row_dot = (dout32 * out.float()).sum(-1).transpose(1, 2)  # D: [b, h, s_q]
    dscores = probs * (torch.einsum("bqhd,bkhd->bhqk", dout32, repeat_kv_heads(v.float(), group)) - row_dot[..., None])
    dq = torch.einsum("bhqk,bkhd->bqhd", dscores, repeat_kv_heads(k.float(), group)) * scale
    dk = torch.einsum("bhqk,bqhd->bkhd", dscores, q.float()) * scale
    # kv head j served `group` query heads: its gradient is their sum
    return dq, dk.view(b, s_k, h_kv, group, d).sum(3), dv.view(b, s_k, h_kv, group, d).sum(3)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, is_causal: bool,
                        doc_ids: torch.Tensor | None = None, kv_doc_ids: torch.Tensor | None = None,
                        scale: float | None = None) -> torch.Tensor:
    """softmax(scale q k^T [masked]) v -> [b, s, h, d] in q's dtype; `doc_ids` [b, s] are the
    queries' documents, `kv_doc_ids` the keys' (default: the same, when s_k == s)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k_doc_ids = doc_ids if kv_doc_ids is None else kv_doc_ids
    return attention_lse_fwd_reference(q, k, v, is_causal=is_causal, scale=scale, q_doc_ids=doc_ids,
                                       k_doc_ids=k_doc_ids)[0]
