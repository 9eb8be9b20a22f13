"""Bytes each rank sends per step, by collective, and whether they cross nodes.

The sequence-parallel formulas are per layer, forward + backward, the most any rank of the group
sends (what bench/sp_attention.py counts at torch.distributed, bench/comm_counter.py), for a
[b, n, h, d] layer split over P = sp ranks, s = n / P tokens each:

    Ulysses (U ranks)  2 passes x (2h + 2h_kv') b s d (U-1)/U elements, h_kv' = max(h_kv, U)
    ring (R ranks)     2 (R-1) blocks of K and V in the compute dtype, plus R fp32 gradient blocks,
                       a block being 2 b (s U) (h_kv'/U) d elements (U = 1 for ring alone)
    usp                Ulysses over U ranks, then the ring over R = P / U groups
    allgather (K/V)    (P-1) 2 b s h_kv d elements gathered, the same reduce-scattered back,
                       and (P-1) b s int64 document ids
    LASP-2 allgather   2 (P-1) b h (d d + 1) fp32: states and carries out, their gradients back
    delta allgather    2 (P-1) b h d 2d fp32: the (A, B) pairs out, their gradients back
    scan (L and D)     min(P-1, 2) b h d d fp32: one state per neighbour and direction
    delta halo         the D layers' convolution: (K-1) b 3 h d elements to the next rank, their
                       gradients back

Other axes (not counted by a benchmark: ring-algorithm volumes): tp all-reduces two [b, s, dim]
activations forward and two backward per block (megatron-core's row/column pairs); dp x sp
reduces the gradients once per step (an all-reduce, 2 (P-1)/P of the local gradients; ZeRO-1/2
a reduce-scatter then an all-gather of the weights, the same volume; ZeRO-3 gathers the weights
again for the backward, 3 (P-1)/P); pp sends two [b, s, dim] tensors per micro-batch forward
over each stage boundary and two back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

FP32, INT64 = 4, 8


@dataclass(frozen=True, kw_only=True)
class LayerShape:
    """One mixing layer as one rank of its tp group sees it."""
    b: int
    n: int
    """Tokens of the whole sequence."""
    heads: int
    kv_heads: int
    head_dim: int
    elem: int
    """Bytes of one activation element (the compute dtype)."""


def ulysses_bytes(x: LayerShape, sp: int) -> int:
    s = x.n // sp
    kv = max(x.kv_heads, sp)
    return 2 * (2 * x.heads + 2 * kv) * x.b * s * x.head_dim * (sp - 1) // sp * x.elem


def usp_inner_shape(x: LayerShape, sp: int, ring: int) -> LayerShape:
    """What usp's Ulysses groups exchange: the sequence held by one ring rank's group."""
    return dataclasses.replace(x, n=x.n // ring)


def ring_part_bytes(x: LayerShape, sp: int, ring: int) -> int:
    """The ring's K/V blocks (ring alone: ring == sp; usp: after its Ulysses all-to-all)."""
    s, ulysses = x.n // sp, sp // ring
    block = 2 * x.b * s * ulysses * (max(x.kv_heads, ulysses) // ulysses) * x.head_dim
    return 2 * (ring - 1) * block * x.elem + ring * block * FP32


def ring_bytes(x: LayerShape, sp: int, ring: int) -> int:
    """usp (ring < sp) or ring alone (ring == sp): the Ulysses part, then the ring's blocks."""
    ulysses = sp // ring
    inner = ulysses_bytes(usp_inner_shape(x, sp, ring), ulysses) if ulysses > 1 else 0
    return inner + ring_part_bytes(x, sp, ring)


def allgather_kv_bytes(x: LayerShape, sp: int, document_mask: bool = True) -> int:
    s = x.n // sp
    docs = (sp - 1) * x.b * s * INT64 if document_mask else 0
    return 2 * (sp - 1) * 2 * x.b * s * x.kv_heads * x.head_dim * x.elem + docs


def softmax_layer_bytes(x: LayerShape, sp: int, method: str, ring: int, document_mask: bool = True) -> int:
    if sp == 1:
        return 0
    if method == "ulysses":
        return ulysses_bytes(x, sp)
    if method == "allgather":
        return allgather_kv_bytes(x, sp, document_mask)
    return ring_bytes(x, sp, ring)


def linear_layer_bytes(x: LayerShape, sp: int, exchange: str) -> int:
    """A LASP-2 (L) layer's state exchange."""
    if sp == 1:
        return 0
    if exchange == "scan":
        return min(sp - 1, 2) * x.b * x.heads * x.head_dim * x.head_dim * FP32
    return 2 * (sp - 1) * x.b * x.heads * (x.head_dim * x.head_dim + 1) * FP32


def delta_layer_bytes(x: LayerShape, sp: int, exchange: str) -> int:
    """A delta-rule (D) layer's state exchange (its convolution's halo is `delta_halo_bytes`)."""
    if sp == 1:
        return 0
    if exchange == "scan":
        return min(sp - 1, 2) * x.b * x.heads * x.head_dim * x.head_dim * FP32
    return 2 * (sp - 1) * x.b * x.heads * x.head_dim * 2 * x.head_dim * FP32


def delta_halo_bytes(x: LayerShape, sp: int, conv_size: int) -> int:
    return 0 if sp == 1 else 2 * (conv_size - 1) * x.b * 3 * x.heads * x.head_dim * x.elem


@dataclass(frozen=True)
class Collective:
    """One kind of traffic of a step: bytes the busiest rank sends, how many messages, which link."""
    bytes: int
    messages: int
    inter_node: bool
    overlapped_with: str | None = None
    """The compute it hides behind ("mixer": the layer's own attention or state work), or None."""


def _spans_nodes(span: int, gpus_per_node: int) -> bool:
    """Whether a group of consecutive-rank span `span` crosses a node (mesh order pp, dp, ring, ulysses, tp:
    tp innermost, so a group along an axis spans the axes inside it times its own size)."""
    return span > gpus_per_node


def step_traffic(cfg, gpus_per_node: int) -> dict[str, Collective]:
    """Per step, the busiest rank's traffic by collective (`cfg` a RunConfig; the pipeline stage
    with the most layers). Zero-byte collectives are left out."""
    from ithaca.launcher.plan.memory import stage_parts

    args, p, t = cfg.model, cfg.parallel, cfg.train
    elem = 2 if t.precision == "bf16" else 4
    micro = cfg.grad_accum_steps
    layers = max((part[0] for part in stage_parts(cfg)), key=len)
    kinds = [args.mixer(i) for i in layers]
    shape = LayerShape(b=t.micro_batch, n=cfg.data.seq_len, heads=args.n_heads // p.tp,
                       kv_heads=args.kv_heads // p.tp, head_dim=args.head_dim, elem=elem)
    seq = cfg.sequence
    sp_inter = _spans_nodes(p.tp * p.sp, gpus_per_node)
    out: dict[str, Collective] = {}

    def add(name: str, per_call: int, calls: int, messages_per_call: int, inter: bool, overlap: str | None = None):
        if per_call > 0 and calls > 0:
            out[name] = Collective(per_call * calls, messages_per_call * calls, inter, overlap)

    softmax, linear, delta = kinds.count("S"), kinds.count("L"), kinds.count("D")
    if p.sp > 1:
        if p.sp_method == "ulysses":
            add("sp_ulysses_all_to_all", ulysses_bytes(shape, p.sp), softmax * micro, 8, sp_inter)
        elif p.sp_method == "allgather":
            add("sp_kv_all_gather", allgather_kv_bytes(shape, p.sp, cfg.data.document_mask), softmax * micro,
                3 * (p.sp - 1), sp_inter)
        else:
            ulysses, ring = seq.ulysses, seq.ring
            if ulysses > 1:
                add("sp_ulysses_all_to_all", ulysses_bytes(usp_inner_shape(shape, p.sp, ring), ulysses),
                    softmax * micro, 8, _spans_nodes(p.tp * ulysses, gpus_per_node))
            add("sp_ring_p2p", ring_part_bytes(shape, p.sp, ring), softmax * micro, 3 * ring, sp_inter, "mixer")
        scan = args.linear_sp_exchange == "scan"
        states = (linear * linear_layer_bytes(shape, p.sp, args.linear_sp_exchange)
                  + delta * delta_layer_bytes(shape, p.sp, args.linear_sp_exchange))
        add("sp_state_scan" if scan else "sp_state_all_gather", states, micro,
            (4 if scan else 2 * (p.sp - 1)) * (linear + delta), sp_inter, "mixer" if scan else None)
        add("sp_conv_halo", delta_halo_bytes(shape, p.sp, args.delta_conv_size), delta * micro, 2, sp_inter)
    tokens = t.micro_batch * cfg.data.seq_len // p.sp
    if p.tp > 1:  # 2 all-reduces forward and 2 backward per block, ring volume 2 (P-1)/P each
        add("tp_all_reduce", 4 * 2 * (p.tp - 1) * tokens * args.dim * elem // p.tp, len(layers) * micro,
            4 * 2 * (p.tp - 1), _spans_nodes(p.tp, gpus_per_node))
    if p.dp * p.sp > 1:
        from ithaca.launcher.plan.memory import stage_memory

        zero_group = p.dp * p.sp
        params = max(stage_memory(cfg, s).weights for s in range(p.pp)) * (zero_group if t.zero_stage == 3 else 1)
        passes = 3 if t.zero_stage == 3 else 2
        add("dp_gradient_reduce", passes * (zero_group - 1) * params // zero_group, 1, passes * (zero_group - 1),
            _spans_nodes(p.tp * p.sp * p.dp, gpus_per_node))
    if p.pp > 1:  # x and the residual stream, forward; their gradients, backward
        add("pp_p2p", 2 * 2 * tokens * args.dim * elem, micro, 2, _spans_nodes(p.world_size, gpus_per_node))
    return out
