"""DeepSpeed-Ulysses sequence parallelism (arXiv:2309.14509); math in DESIGN.md, "Ulysses".

The all-to-all itself is DeepSpeed's `_SeqAllToAll` (forward: all-to-all scattering heads and
gathering sequence; backward: the inverse all-to-all). What we add around it: our [b, s, h, d]
layout, packed documents (ids gathered over the group, read by the attention kernel per tile),
and grouped-query attention with fewer kv heads than ranks, where each kv head is repeated so
that every rank holds the kv head its query heads read.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ithaca.kernels.attention import AttentionImpl, attention, check_attention_inputs, repeat_kv_heads

_HEAD_DIM, _SEQ_DIM, _BATCH_DIM = 2, 1, 0


def _all_to_all() -> type:
    """DeepSpeed's all-to-all, which goes through deepspeed.comm: that must wrap torch.distributed first.

    Imported and set up on first use, so a model without Ulysses layers needs no DeepSpeed, and the
    function works in any model whose author started torch.distributed but not DeepSpeed (DeepSpeed
    adopts the existing default group; nothing new is created).
    """
    import deepspeed
    import deepspeed.comm
    from deepspeed.sequence.layer import _SeqAllToAll

    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
    return _SeqAllToAll


def seq_to_heads(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[b, s, h, d] (a sequence slice, all heads) -> [b, s*P, h/P, d] (whole sequence, a head slice)."""
    return _all_to_all().apply(group, x.contiguous(), _HEAD_DIM, _SEQ_DIM, _BATCH_DIM)


def heads_to_seq(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """The inverse: [b, s*P, h/P, d] -> [b, s, h, d]."""
    return _all_to_all().apply(group, x.contiguous(), _SEQ_DIM, _HEAD_DIM, _BATCH_DIM)


def gather_doc_ids(doc_ids: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[b, s] document ids of this rank's slice -> [b, s*P] for the group's whole (contiguous) sequence.

    Integers, no gradient: one all-gather of b*s ids, small beside the q/k/v exchange.
    """
    parts = [torch.empty_like(doc_ids) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, doc_ids.contiguous(), group=group)
    return torch.cat(parts, dim=1)


def kv_repeat_factor(n_heads: int, n_kv_heads: int, sp: int) -> int:
    """How many times each kv head is repeated so that sp divides the kv heads.

    Raises ValueError when neither sp divides n_kv_heads nor n_kv_heads divides sp.
    """
    if n_heads % sp:
        raise ValueError(f"ulysses_attention: q heads {n_heads} must be divisible by the sp group size {sp}")
    if n_kv_heads % sp == 0:
        return 1
    if sp % n_kv_heads == 0:
        return sp // n_kv_heads
    raise ValueError(f"ulysses_attention: kv heads {n_kv_heads} and sp group size {sp}: one must divide "
                     "the other so kv heads can be split or repeated")


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup, *,
                      causal: bool = True, doc_ids: torch.Tensor | None = None,
                      impl: AttentionImpl = "auto") -> torch.Tensor:
    """Exact softmax attention over a sequence split contiguously across `group`.

    q [b, s, h, d], k and v [b, s, h_kv, d]: this rank's slice of the sequence (rank r holds
    positions [r*s, (r+1)*s)). Returns this rank's [b, s, h, d] slice of the output.
    Communication: two all-to-alls in forward (q, k, v in; output back) and two in backward;
    each rank sends about (2h + 2h_kv') * b * s * d * (P-1)/P elements per direction, where
    h_kv' = max(h_kv, P). `doc_ids` [b, s] (int, this rank's slice) marks packed documents: no
    query reads another document's keys. `impl` picks the attention kernel (kernels/attention).
    Raises ValueError if h is not divisible by P or kv heads can be neither split nor repeated over P.
    """
    check_attention_inputs("ulysses_attention", q, k, v, doc_ids=doc_ids, same_length=True)
    sp = dist.get_world_size(group)
    repeat = kv_repeat_factor(q.shape[2], k.shape[2], sp)
    if sp == 1:
        return attention(q, k, v, is_causal=causal, doc_ids=doc_ids, impl=impl)
    k, v = repeat_kv_heads(k, repeat), repeat_kv_heads(v, repeat)
    whole_doc_ids = None if doc_ids is None else gather_doc_ids(doc_ids, group)
    out = attention(seq_to_heads(q, group), seq_to_heads(k, group), seq_to_heads(v, group),
                    is_causal=causal, doc_ids=whole_doc_ids, impl=impl)
    return heads_to_seq(out, group)
