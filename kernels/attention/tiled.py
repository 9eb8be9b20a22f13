"""Attention with log-sum-exp, tile by tile in PyTorch: the exact path for document masks off CUDA.

The math is reference.py's; this form never holds more than one [tile x tile] block of scores per
head (flash-attention's online softmax, arXiv:2205.14135, written with torch ops), so memory is
O(s) per call instead of O(s_q * s_k). Tiles that no query may read (above the causal diagonal, or
whose documents do not meet the queries') are skipped, so packed short documents cost little.
"""

from __future__ import annotations

import torch

TILE = 256
"""Queries and keys per tile; scores held at once: b * h * TILE^2 fp32."""


def _tiles(n: int, tile: int) -> list[tuple[int, int]]:
    return [(start, min(start + tile, n)) for start in range(0, n, tile)]


def _doc_ranges(doc_ids: torch.Tensor | None, tiles: list[tuple[int, int]]) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """Per tile, the smallest and largest document id of each batch row ([b] each)."""
    if doc_ids is None:
        return [None] * len(tiles)
    return [(doc_ids[:, a:e].amin(1), doc_ids[:, a:e].amax(1)) for a, e in tiles]


def _tile_mask(qt: tuple[int, int], kt: tuple[int, int], offset: int, is_causal: bool, q_doc_ids: torch.Tensor | None,
               k_doc_ids: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """[b or 1, tq, tk] bool: which keys of tile kt each query of tile qt may read (None: all)."""
    mask = None
    if is_causal:  # bottom-right aligned: query i reads keys j <= i + s_k - s_q
        q_pos = torch.arange(*qt, device=device)
        mask = (torch.arange(*kt, device=device)[None, :] <= q_pos[:, None] + offset)[None]
    if q_doc_ids is not None:
        same = q_doc_ids[:, qt[0]:qt[1], None] == k_doc_ids[:, None, kt[0]:kt[1]]
        mask = same if mask is None else mask & same
    return mask


def _tile_pairs(s_q: int, s_k: int, is_causal: bool, q_doc_ids: torch.Tensor | None,
                k_doc_ids: torch.Tensor | None, tile: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """The (query tile, key tile) pairs that hold at least one allowed pair in some batch row."""
    q_tiles, k_tiles, offset = _tiles(s_q, tile), _tiles(s_k, tile), s_k - s_q
    q_docs, k_docs = _doc_ranges(q_doc_ids, q_tiles), _doc_ranges(k_doc_ids, k_tiles)
    pairs = []
    for qt, qd in zip(q_tiles, q_docs):
        for kt, kd in zip(k_tiles, k_docs):
            if is_causal and kt[0] > qt[1] - 1 + offset:
                continue
            if qd is not None and not bool(((qd[0] <= kd[1]) & (kd[0] <= qd[1])).any()):
                continue
            pairs.append((qt, kt))
    return pairs


def _grouped(x: torch.Tensor, h_kv: int) -> torch.Tensor:
    """[b, s, h, d] -> [b, s, h_kv, group, d] fp32: query heads gathered under the kv head they read."""
    b, s, h, d = x.shape
    return x.float().view(b, s, h_kv, h // h_kv, d)


def attention_lse_fwd_tiled(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, is_causal: bool, scale: float,
                            q_doc_ids: torch.Tensor | None = None, k_doc_ids: torch.Tensor | None = None,
                            tile: int = TILE) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (out [b, s_q, h, d] in q's dtype, lse [b, h, s_q] fp32); reference.py's contract."""
    b, s_q, h, d = q.shape
    s_k, h_kv = k.shape[1], k.shape[2]
    qg = _grouped(q, h_kv)
    acc = q.new_zeros(b, h_kv, h // h_kv, s_q, d, dtype=torch.float32)
    row_max = q.new_full((b, h_kv, h // h_kv, s_q), float("-inf"), dtype=torch.float32)
    row_sum = torch.zeros_like(row_max)
    for qt, kt in _tile_pairs(s_q, s_k, is_causal, q_doc_ids, k_doc_ids, tile):
        rows = slice(*qt)
        scores = torch.einsum("bqngd,bknd->bngqk", qg[:, rows], k[:, kt[0]:kt[1]].float()) * scale
        mask = _tile_mask(qt, kt, s_k - s_q, is_causal, q_doc_ids, k_doc_ids, q.device)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, None], float("-inf"))
        new_max = torch.maximum(row_max[..., rows], scores.amax(-1))
        safe_max = torch.where(torch.isinf(new_max), 0.0, new_max)  # a row with no key yet: keep zeros
        probs = torch.exp(scores - safe_max[..., None])
        rescale = torch.exp(row_max[..., rows] - safe_max)
        row_sum[..., rows] = row_sum[..., rows] * rescale + probs.sum(-1)
        acc[..., rows, :] = acc[..., rows, :] * rescale[..., None] + torch.einsum(
            "bngqk,bknd->bngqd", probs, v[:, kt[0]:kt[1]].float())
        row_max[..., rows] = new_max
    empty = row_sum == 0
    out = acc / torch.where(empty, 1.0, row_sum)[..., None]  # rows with no key keep 0
    lse = torch.where(empty, float("-inf"), row_max + torch.log(row_sum))
    return out.permute(0, 3, 1, 2, 4).reshape(b, s_q, h, d).to(q.dtype), lse.reshape(b, h, s_q)


def attention_lse_bwd_tiled(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                            lse: torch.Tensor, *, is_causal: bool, scale: float, q_doc_ids: torch.Tensor | None = None,
                            k_doc_ids: torch.Tensor | None = None,
                            tile: int = TILE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients from the final (out, lse) -> (dq, dk, dv) fp32; reference.py's contract."""
    b, s_q, h, d = q.shape
    s_k, h_kv = k.shape[1], k.shape[2]
    group = h // h_kv
    qg, dog = _grouped(q, h_kv), _grouped(dout, h_kv)
    delta = (dog * _grouped(out, h_kv)).sum(-1).permute(0, 2, 3, 1)  # D = rowsum(dO * O): [b, h_kv, group, s_q]
    # a row with lse -inf read no key: exp(scores - inf) makes its probabilities 0
    lse = torch.where(torch.isinf(lse), float("inf"), lse).view(b, h_kv, group, s_q)
    dq = torch.zeros_like(qg)
    dk = k.new_zeros(k.shape, dtype=torch.float32)
    dv = torch.zeros_like(dk)
    for qt, kt in _tile_pairs(s_q, s_k, is_causal, q_doc_ids, k_doc_ids, tile):
        rows, cols = slice(*qt), slice(*kt)
        k_t, v_t = k[:, cols].float(), v[:, cols].float()
        scores = torch.einsum("bqngd,bknd->bngqk", qg[:, rows], k_t) * scale
        mask = _tile_mask(qt, kt, s_k - s_q, is_causal, q_doc_ids, k_doc_ids, q.device)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, None], float("-inf"))
        probs = torch.exp(scores - lse[..., rows, None])  # [b, h_kv, group, tq, tk]
        dv[:, cols] += torch.einsum("bngqk,bqngd->bknd", probs, dog[:, rows])
        dscores = probs * (torch.einsum("bqngd,bknd->bngqk", dog[:, rows], v_t) - delta[..., rows, None])
        dq[:, rows] += torch.einsum("bngqk,bknd->bqngd", dscores, k_t) * scale
        dk[:, cols] += torch.einsum("bngqk,bqngd->bknd", dscores, qg[:, rows]) * scale
    return dq.view(b, s_q, h, d), dk, dv
