"""Checkpoints are verified before anything is unpickled, and a damaged one is refused or skipped.

One scenario on 2 ranks (dp2, ZeRO-1: rank 0's model states and one optimizer file per rank),
run once for the module, observed by the tests below:
1. 4 steps saving every 2 (step 2, step 4): the uninterrupted curve;
2. step 4's model-states file is truncated; an explicit --resume of step 4 is refused;
3. leftover .partial folders (ours, and one that is not) are planted; --resume (latest) falls back to
   step 2, trains steps 3-4 (saving step 4 again), and the save removes only our leftovers;
4. one byte of a step-4 file is flipped (same size): an explicit --resume is refused by sha256;
5. a run with checkpoint.keep=2 resumes from step 2 (explicitly) and saves every step to 6.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest

from harness import LogLines, run_ranks


def _train(data: str, out: str, steps: int, every: int, resume: str | None, *extra: str) -> list[float]:
    from ithaca.launcher.config.load import load_config
    from ithaca.launcher.train.loop import run_training

    cfg = load_config("debug-cpu", [
        f"data.path={data}", "data.seq_len=64", f"train.output_dir={out}", f"train.steps={steps}",
        "train.global_batch=4", "train.micro_batch=1", "train.log_every=100", f"checkpoint.every={every}",
        "optim.decay_steps=6", "parallel.dp=2", "data.workers=1", *extra])
    return [r.loss for r in run_training(cfg, resume=resume)]


def _refusal(data: str, out: str, resume: str) -> str:
    try:
        _train(data, out, 4, 2, resume)
    except ValueError as err:
        return str(err)
    raise AssertionError(f"--resume={resume} loaded a damaged checkpoint")


def _scenario(data: str, out: str) -> dict:
    import torch.distributed as dist

    ckpt, rank = Path(out) / "checkpoints", dist.get_rank()
    seen: dict = {"full": _train(data, out, 4, 2, None)}
    seen["manifest"] = json.loads((ckpt / "step_00000004" / "manifest.json").read_text())
    model_states = ckpt / "step_00000004" / "mp_rank_00_model_states.pt"
    if rank == 0:
        model_states.write_bytes(model_states.read_bytes()[:1000])
    dist.barrier()
    seen["truncated"] = _refusal(data, out, str(ckpt / "step_00000004"))
    if rank == 0:
        for name in ("step_00000003.partial", "step_00000009.old.partial", "notes.partial"):
            (ckpt / name).mkdir()
            (ckpt / name / "mp_rank_00_model_states.pt").write_bytes(b"half")
    dist.barrier()
    lines = LogLines()
    logging.getLogger("ithaca.launcher.checkpoint.store").addHandler(lines)  # ours sees every rank's records
    seen["fallback"] = _train(data, out, 4, 2, "latest")
    seen["fallback_lines"] = [m for m in lines.messages if "falling back" in m]
    seen["after_fallback"] = sorted(p.name for p in ckpt.iterdir())
    optim = ckpt / "step_00000004" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    if rank == 0:
        damaged = bytearray(optim.read_bytes())
        damaged[len(damaged) // 2] ^= 0x01
        optim.write_bytes(damaged)
    dist.barrier()
    seen["tampered"] = _refusal(data, out, str(ckpt / "step_00000004"))
    seen["kept"] = _train(data, out, 6, 1, str(ckpt / "step_00000002"), "checkpoint.keep=2")
    seen["after_keep"] = sorted(p.name for p in ckpt.iterdir() if p.is_dir())
    seen["latest"] = (ckpt / "latest").read_text()
    return seen


@pytest.fixture(scope="module")
def scenario(short_doc_shards, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ckpt")
    seen, other = run_ranks(_scenario, 2, str(short_doc_shards), str(out))
    assert seen == other  # every rank took the same decisions and read the same numbers
    shutil.rmtree(out)
    return seen


def test_manifest_lists_every_file_with_its_size_and_sha256(scenario):
    manifest = scenario["manifest"]
    assert manifest["step"] == 4
    names = [f["path"] for f in manifest["files"]]
    assert names == sorted(names) and "mp_rank_00_model_states.pt" in names
    assert {"rng_rank0.pt", "rng_rank1.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(names)
    assert all(f["size"] > 0 and len(f["sha256"]) == 64 for f in manifest["files"])


def test_a_truncated_file_is_refused_by_name_when_given_explicitly(scenario):
    message = scenario["truncated"]
    assert "\n" not in message
    assert "step_00000004/mp_rank_00_model_states.pt: 1000 bytes, manifest.json says" in message
    assert "truncated" in message


def test_resume_latest_falls_back_and_continues_the_uninterrupted_curve(scenario):
    (line,) = scenario["fallback_lines"]  # one line: which file failed which check, and where it goes instead
    assert re.fullmatch(r"--resume: \S+/step_00000004/mp_rank_00_model_states\.pt: 1000 bytes, manifest\.json says "
                        r"\d+ \(truncated or overwritten\); falling back to the previous checkpoint, \S+/step_00000002", line)
    # bitwise: the same arithmetic from step 2's state, in the same processes
    assert scenario["fallback"] == scenario["full"][2:]


def test_a_flipped_byte_is_refused_by_sha256(scenario):
    message = scenario["tampered"]
    assert "\n" not in message
    assert "step_00000004/zero_pp_rank_1_mp_rank_00_optim_states.pt: sha256 differs from manifest.json" in message


def test_the_next_save_removes_only_our_leftover_partial_folders(scenario):
    after = scenario["after_fallback"]
    assert "step_00000003.partial" not in after and "step_00000009.old.partial" not in after
    assert "notes.partial" in after  # not a name a save of ours writes
    assert {"step_00000002", "step_00000004", "latest"} <= set(after)


def test_keep_leaves_the_last_complete_checkpoints(scenario):
    assert scenario["kept"] == scenario["full"][2:4] + scenario["kept"][2:]  # resumed from step 2 again
    assert scenario["after_keep"] == ["notes.partial", "step_00000005", "step_00000006"]
    assert scenario["latest"] == "step_00000006"
