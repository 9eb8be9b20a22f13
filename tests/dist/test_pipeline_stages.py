"""Pipeline stage planning: parameter counts from the architecture, and the balanced split."""

from __future__ import annotations

import dataclasses

import pytest

from harness import run_ranks


def test_balance_minimizes_the_heaviest_stage():
    from ithaca.parallel.pipeline import balance_blocks

    assert balance_blocks([0, 3, 3, 3, 3, 3, 3, 0], pp=3) == [2, 2, 2]
    # a heavy embedding leaves stage 0 one block; a heavy head leaves the last stage one
    assert balance_blocks([6, 1, 1, 1, 1, 1, 1, 0], pp=2) == [1, 5]
    assert balance_blocks([0, 1, 1, 1, 1, 1, 1, 6], pp=2) == [5, 1]
    assert balance_blocks([0, 1, 1, 1, 1, 1, 0], pp=5) == [1, 1, 1, 1, 1]


def test_a_given_split_is_checked():
    from ithaca.models.llama_args import LlamaArgs
    from ithaca.parallel.pipeline import stage_blocks

    args = LlamaArgs(vocab_size=64, dim=16, n_layers=4, n_heads=2, ffn_dim=32)
    assert stage_blocks(args, 2, [1, 3]) == [1, 3]
    with pytest.raises(ValueError, match=r"pp_split=\[2, 1\]: give 2 block counts, each >= 1, summing to n_layers=4"):
        stage_blocks(args, 2, [2, 1])
    with pytest.raises(ValueError, match=r"pp=5: more stages than n_layers=4"):
        stage_blocks(args, 5, None)


def _built_part_sizes(variants: dict[str, dict]) -> dict[str, tuple[list[int], list[int]]]:
    """{name: (LlamaArgs.part_parameters(), the built model's parameters per part)} at tp = 1."""
    from ithaca.launcher.config.load import load_config
    from ithaca.parallel.megatron_bridge import initialize_megatron
    from ithaca.parallel.mesh import build_mesh
    from ithaca.parallel.parallelize import parallelize_llama

    initialize_megatron(build_mesh(dp=1, pp=1, tp=1, device_type="cpu"))
    sizes = {}
    for name, changes in variants.items():
        args = dataclasses.replace(load_config("debug-hybrid-cpu", ["data.path=unused", "parallel.sp=1"]).model,
                                   **changes)
        model = parallelize_llama(args, build_mesh(dp=1, pp=1, tp=1, device_type="cpu"))
        count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
        built = [count(model.embed), *map(count, model.blocks), count(model.norm) + count(model.head)]
        sizes[name] = (args.part_parameters(), built)
    return sizes


def test_part_parameters_count_what_the_model_builds():
    variants = {"hybrid": {}, "gated-no-gate-or-norm": {"linear_decay": "gated", "linear_output_gate": False,
                                                        "linear_output_norm": False},
                "llama-tied-gqa": {"layer_pattern": "S", "tie_embeddings": True},
                "delta-gated-hybrid": {"layer_pattern": "DS", "linear_decay": "gated"},
                "delta-plain-no-gate": {"layer_pattern": "D", "linear_decay": "plain", "linear_output_gate": False}}
    ((sizes),) = run_ranks(_built_part_sizes, 1, variants)
    for name, (counted, built) in sizes.items():
        assert counted == built, name
