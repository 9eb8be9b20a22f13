"""`ithaca export`: checkpoints of every layout read back whole, and a Llama loads in transformers
with our logits.

Runs of the debug model (2 steps, then a checkpoint), once for the module: 1 process; tp2; pp2;
dp2 under ZeRO-1 and ZeRO-3 (the same two data streams); tp2 with ZeRO-2, bf16 and tied
embeddings; and a hybrid (linear + softmax) model. The consolidated states of tp2 and pp2 equal
the 1-process one, ZeRO-3's (fp32 masters joined from partitions) equals ZeRO-1's; each Llama
export gives transformers' LlamaForCausalLM our logits.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness import run_ranks

transformers = pytest.importorskip("transformers")  # the test extra: only the parity checks need it

LAYOUTS = {  # name: (world, overrides)
    "single": (1, ()),
    "tp2": (2, ("parallel.tp=2",)),
    "pp2": (2, ("parallel.pp=2",)),
    "dp2": (2, ("parallel.dp=2",)),
    "dp2-zero3": (2, ("parallel.dp=2", "train.zero_stage=3")),
    "tp2-zero2-bf16-tied": (2, ("parallel.tp=2", "train.zero_stage=2", "train.precision=bf16",
                                "model.tie_embeddings=true")),
    "hybrid": (1, ("model.layer_pattern=LS", "model.linear_decay=gated")),
}


def _train(data: str, out: str, extra: tuple[str, ...]) -> None:
    from ithaca.launcher.config.load import load_config
    from ithaca.launcher.train.loop import run_training

    cfg = load_config("debug-cpu", [
        f"data.path={data}", "data.seq_len=64", f"train.output_dir={out}", "train.steps=2", "train.global_batch=4",
        "train.micro_batch=1", "train.log_every=100", "checkpoint.every=100", "parallel.dp=1", "data.workers=1",
        *extra])
    run_training(cfg)


@pytest.fixture(scope="module")
def runs(short_doc_shards, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export")
    for name, (world, extra) in LAYOUTS.items():
        run_ranks(_train, world, str(short_doc_shards), str(root / name), extra)
    yield root
    shutil.rmtree(root)


def _state(runs: Path, name: str) -> dict[str, torch.Tensor]:
    from ithaca.launcher.checkpoint.consolidate import full_model_state

    return full_model_state(runs / name / "checkpoints")[1]


def _logits_of(args, state: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """The Llama's logits on one rank: its forward up to the hidden states, then the output
    projection (the model's own forward fuses that projection into the loss and never holds logits)."""
    from ithaca.models.llama import Llama
    from ithaca.models.mixer import SequenceInfo
    from ithaca.parallel.megatron_bridge import initialize_megatron, model_parallel_config
    from ithaca.parallel.mesh import build_mesh

    mesh = build_mesh(dp=1, pp=1, tp=1, device_type="cpu")
    initialize_megatron(mesh)  # megatron-core's layers read their tp group from it
    model = Llama(args, model_parallel_config(mesh, torch.float32))
    model.load_state_dict({k: v.float() for k, v in state.items()})
    seq = SequenceInfo(positions=torch.arange(tokens.shape[1]).expand_as(tokens), doc_ids=None, resets=None)
    with torch.no_grad():
        x, residual = model.embed(tokens), None
        for block in model.blocks:
            x, residual = block(x, residual, seq)
        hidden, _ = model.norm(x, residual)
        return hidden @ (model.embed.weight if args.tie_embeddings else model.head.weight).T


def _our_logits(args, state: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    (logits,) = run_ranks(_logits_of, 1, args, state, tokens)
    return logits


def _hf_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    model = transformers.LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    with torch.no_grad():
        return model(tokens).logits


TOKENS = torch.randint(0, 257, (2, 48), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name, like", [("tp2", "single"), ("pp2", "single"), ("dp2-zero3", "dp2")])
def test_every_layout_reads_back_as_the_same_model(runs, name, like):
    got, want = _state(runs, name), _state(runs, like)
    assert list(got) == list(want)
    for key in want:
        # the same 2 steps of training; tp sums partial products in another order (fp32 ulps, then
        # Adam's first steps); ZeRO-3 keeps the fp32 masters ZeRO-1's module holds
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=2e-6, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("name", ["single", "tp2", "pp2", "tp2-zero2-bf16-tied"])
def test_export_loads_in_transformers_with_our_logits(runs, tmp_path, name):
    from ithaca.launcher.checkpoint.consolidate import full_model_state
    from ithaca.launcher.checkpoint.export import export_checkpoint

    cfg, state = full_model_state(runs / name / "checkpoints")
    assert export_checkpoint(runs / name / "checkpoints", tmp_path / "hf") == "huggingface"
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "generation_config.json",
                                                                   "model.safetensors"]
    # fp32 both sides, the same ops in the same order up to the attention kernels: 1e-5 is loose
    torch.testing.assert_close(_hf_logits(tmp_path / "hf", TOKENS), _our_logits(cfg.model, state, TOKENS),
                               rtol=1e-5, atol=1e-5)


def test_bf16_run_exports_its_weights(runs, tmp_path):
    from ithaca.launcher.checkpoint.export import export_checkpoint
    from safetensors.torch import load_file

    state = _state(runs, "tp2-zero2-bf16-tied")
    assert {t.dtype for t in state.values()} == {torch.bfloat16}  # the module's weights of a bf16 run
    export_checkpoint(runs / "tp2-zero2-bf16-tied" / "checkpoints", tmp_path / "hf", dtype=torch.bfloat16)
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    assert "lm_head.weight" not in tensors  # tied: transformers ties it to the embedding
    assert torch.equal(tensors["model.embed_tokens.weight"], state["embed.weight"])
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["torch_dtype"] == "bfloat16"


def test_sharded_export_with_yarn_scaling_keeps_our_logits(runs, tmp_path):
    """Shards above a size, and a rope scaling in config.json that transformers applies as we do
    (YaRN's attention factor on cos and sin included)."""
    from ithaca.launcher.config.load import load_config
    from ithaca.launcher.checkpoint.export import export_checkpoint

    config = runs / "single" / "config.yaml"
    scaled = tmp_path / "config.yaml"
    shutil.copy(config, scaled)
    yarn = "{rope_type: yarn, factor: 4.0, original_max_position_embeddings: 16}"
    cfg = load_config(scaled, [f"model.rope_scaling={yarn}"])
    scaled.write_text(json.dumps(cfg.to_dict()))  # YAML reads JSON
    export_checkpoint(runs / "single" / "checkpoints", tmp_path / "hf", config=scaled, max_shard_bytes=100_000)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    torch.testing.assert_close(_hf_logits(tmp_path / "hf", TOKENS),
                               _our_logits(cfg.model, _state(runs, "single"), TOKENS), rtol=1e-5, atol=1e-5)


def test_hybrid_exports_in_our_format(runs, tmp_path):
    from safetensors.torch import load_file

    from ithaca.launcher.config.load import build, load_config
    from ithaca.launcher.checkpoint.export import ITHACA_FORMAT, export_checkpoint
    from ithaca.models.llama_args import LlamaArgs

    assert export_checkpoint(runs / "hybrid" / "checkpoints", tmp_path / "out") == ITHACA_FORMAT
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["format"] == ITHACA_FORMAT
    assert build(LlamaArgs, config["model"], "model.") == load_config(runs / "hybrid" / "config.yaml").model
    tensors, state = load_file(tmp_path / "out" / "model.safetensors"), _state(runs, "hybrid")
    assert tensors.keys() == state.keys() and all(torch.equal(tensors[k], state[k]) for k in state)


def test_refusals_name_the_file_or_flag(runs, tmp_path):
    from ithaca.launcher.checkpoint.export import export_checkpoint

    (tmp_path / "taken").mkdir()
    with pytest.raises(ValueError, match="--output=.*taken.*exists"):
        export_checkpoint(runs / "single" / "checkpoints", tmp_path / "taken")
    damaged = tmp_path / "run" / "checkpoints"
    shutil.copytree(runs / "single" / "checkpoints", damaged)
    step = (damaged / "latest").read_text().strip()
    states = damaged / step / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:1000])
    with pytest.raises(ValueError, match=f"{step}/mp_rank_00_model_states.pt: 1000 bytes"):
        export_checkpoint(damaged, tmp_path / "out")
    with pytest.raises(ValueError, match="config.yaml: missing"):  # no config.yaml beside this copy
        export_checkpoint(runs / "single" / "checkpoints" / step, tmp_path / "out", config=tmp_path / "config.yaml")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_cli_export(runs, tmp_path):
    done = subprocess.run([sys.executable, "-m", "ithaca", "export", "--checkpoint", str(runs / "tp2" / "checkpoints"),
                           "--output", str(tmp_path / "hf"), "--dtype", "bf16"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "huggingface format, bf16" in done.stdout
    again = subprocess.run([sys.executable, "-m", "ithaca", "export", "--checkpoint", str(runs / "tp2" / "checkpoints"),
                            "--output", str(tmp_path / "hf")], capture_output=True, text=True, timeout=300)
    assert again.returncode == 1 and again.stderr.count("\n") == 1 and "exists" in again.stderr
