"""The chunked linear-attention form equals the token-by-token recurrence, for every decay kind."""

from __future__ import annotations

import pytest
import torch

from ithaca.kernels.linear_attention import linear_attention_chunked, linear_attention_recurrent

B, S, H, DK, DV = 2, 45, 3, 8, 6


def make_log_decay(kind: str, gen: torch.Generator) -> torch.Tensor | None:
    if kind == "plain":
        return None
    if kind == "fixed":  # retention-style per-head decays
        return torch.log(1 - 2.0 ** (-5 - torch.arange(H, dtype=torch.float32)))
    return torch.nn.functional.logsigmoid(torch.randn(B, S, H, generator=gen) + 2)  # gates in (0, 1)


@pytest.mark.parametrize("kind", ["plain", "fixed", "gated"])
@pytest.mark.parametrize("chunk_size", [7, 16, 45])
@pytest.mark.parametrize("with_state, with_resets", [(False, False), (True, False), (True, True)])
def test_chunked_equals_recurrent(kind, chunk_size, with_state, with_resets):
    gen = torch.Generator().manual_seed(3)
    q, k = (torch.randn(B, S, H, DK, generator=gen) for _ in range(2))
    v = torch.randn(B, S, H, DV, generator=gen)
    log_decay = make_log_decay(kind, gen)
    state = torch.randn(B, H, DK, DV, generator=gen) if with_state else None
    resets = (torch.rand(B, S, generator=gen) < 0.1) if with_resets else None
    if resets is not None:
        resets[0, 0] = True  # a document starting on the very first token drops the incoming state
    want_o, want_s = linear_attention_recurrent(q, k, v, log_decay, scale=0.5, initial_state=state, resets=resets)
    got_o, got_s = linear_attention_chunked(q, k, v, log_decay, scale=0.5, chunk_size=chunk_size,
                                            initial_state=state, resets=resets)
    # fp32; plain linear attention sums up to 45 unnormalised terms of size ~10: 1e-4 absolute
    torch.testing.assert_close(got_o, want_o, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_s, want_s, rtol=1e-4, atol=1e-4)


def test_reset_equals_running_documents_separately():
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 12, 1, 4, generator=gen) for _ in range(3))
    resets = torch.zeros(1, 12, dtype=torch.bool)
    resets[0, 5] = True
    packed, _ = linear_attention_chunked(q, k, v, scale=1.0, chunk_size=4, resets=resets)
    first, _ = linear_attention_recurrent(q[:, :5], k[:, :5], v[:, :5], scale=1.0)
    second, _ = linear_attention_recurrent(q[:, 5:], k[:, 5:], v[:, 5:], scale=1.0)
    torch.testing.assert_close(packed, torch.cat([first, second], dim=1), rtol=1e-5, atol=1e-5)
