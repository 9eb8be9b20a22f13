"""Activation checkpointing changes what the forward keeps, never the result.

`model.activation_checkpointing` full (each block recomputed) and selective (each mixer's interior
recomputed) must give the per-token losses and every parameter gradient of none, on packed
documents, for softmax layers and for gated linear layers; and they must really drop what they say
they drop, so the test fails if the flag were ignored.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import pytest
import torch

from harness import run_ranks
from ithaca.launcher.config.schema import ConfigError
from ithaca.launcher.config.load import load_config

EOS = 256
MODES = ("none", "full", "selective")


def _counting(fn: Callable, counts: dict[str, int], key: str) -> Callable:
    def wrapped(*args):
        counts[key] += 1
        return fn(*args)
    return wrapped


def _run_modes(config: str, overrides: list[str]) -> dict[str, dict]:
    """Per mode: per-token losses, every parameter gradient, bytes of activations saved for backward
    (counted by a saved-tensors hook, parameters excluded) and how often blocks and mixers ran."""
    from ithaca.data.batch import Batch
    from ithaca.models.linear_attention import LinearAttention
    from ithaca.models.llama import Attention
    from ithaca.parallel.megatron_bridge import initialize_megatron
    from ithaca.parallel.mesh import build_mesh
    from ithaca.parallel.parallelize import parallelize_llama

    cfg = load_config(config, ["data.path=unused", "parallel.dp=1", "parallel.sp=1", *overrides])
    mesh = build_mesh(dp=1, pp=1, tp=1, device_type="cpu")
    initialize_megatron(mesh)
    gen = torch.Generator().manual_seed(1)
    rows = []
    for lengths in ((9, 1, 14, 20, 3), (30, 20)):  # two packed rows of 52 tokens, documents of odd lengths
        docs = [torch.cat([torch.randint(0, EOS, (n,), generator=gen), torch.tensor([EOS])]) for n in lengths]
        rows.append(torch.cat(docs))
    batch = Batch.from_window(torch.stack(rows), EOS)  # [2, 51]
    cotangent = torch.randn(batch.labels.shape, generator=gen)  # random: .sum() would hide a permuted token

    results = {}
    for mode in MODES:
        args = dataclasses.replace(cfg.model, activation_checkpointing=mode)
        model = parallelize_llama(args, mesh, seed=0)
        counts = {"block": 0, "mixer": 0}
        for block in model.blocks:
            block.compute = _counting(block.compute, counts, "block")
            assert isinstance(block.attn, (Attention, LinearAttention))
            block.attn.mix = _counting(block.attn.mix, counts, "mixer")
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        saved: dict[int, int] = {}  # storage address -> bytes, activations only

        def pack(t: torch.Tensor) -> torch.Tensor:
            address = t.untyped_storage().data_ptr()
            if address not in params:
                saved[address] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            losses = model(batch)
        losses.backward(cotangent)
        results[mode] = dict(losses=losses.detach(), saved_bytes=sum(saved.values()), counts=counts,
                             grads={name: p.grad for name, p in model.named_parameters()})
    return results


@pytest.mark.parametrize("config, overrides", [
    ("debug-cpu", []),
    ("debug-hybrid-cpu", ["model.linear_decay=gated"]),
])
def test_full_and_selective_recompute_exactly_and_save_less(config, overrides):
    (results,) = run_ranks(_run_modes, 1, config, overrides)
    none = results["none"]
    assert none["grads"] and all(g is not None for g in none["grads"].values())
    for mode in ("full", "selective"):
        # bitwise: recomputation runs the same CPU ops on the same inputs in the same order
        torch.testing.assert_close(results[mode]["losses"], none["losses"], rtol=0, atol=0)
        assert results[mode]["grads"].keys() == none["grads"].keys()
        for name, grad in none["grads"].items():
            torch.testing.assert_close(results[mode]["grads"][name], grad, rtol=0, atol=0, msg=f"{mode}: {name}")
    n_layers = load_config(config).model.n_layers
    # each block runs once per forward; full runs it again in the backward pass, selective its mixer
    assert none["counts"] == {"block": n_layers, "mixer": n_layers}
    assert results["full"]["counts"] == {"block": 2 * n_layers, "mixer": 2 * n_layers}
    assert results["selective"]["counts"] == {"block": n_layers, "mixer": 2 * n_layers}
    # what the forward hands to autograd: full keeps no block interior, selective no mixer interior
    saved = {mode: results[mode]["saved_bytes"] for mode in MODES}
    assert saved["full"] < saved["selective"] < saved["none"], saved


def test_an_unknown_checkpointing_mode_is_refused_naming_the_field():
    with pytest.raises(ConfigError, match=r"^model\.activation_checkpointing='bogus': choose one of 'none', 'full', "
                                          r"'selective'"):
        load_config("debug-cpu", ["model.activation_checkpointing=bogus"])
