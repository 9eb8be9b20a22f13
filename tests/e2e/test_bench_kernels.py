"""The kernel benchmark runs at toy size on the CPU: every op gets a row for ours, and every peer
that cannot run here a "skipped:" row instead of a crash (no timing asserted)."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import ROOT, failure_text

OPS = ["attention", "attention, docs of 64", "rms_norm", "rms_norm+residual", "rope", "swiglu", "linear_cross_entropy",
       "linear_attention, retention", "linear_attention, gated", "delta_rule, gated"]
PEERS = {"attention": ["flash-attn 2"], "attention, docs of 64": ["flash-attn 2 [varlen]"],
         "rms_norm": ["liger rms_norm"], "rms_norm+residual": ["liger fused_add_rms_norm"], "rope": ["liger rope"],
         "swiglu": ["liger swiglu"], "linear_cross_entropy": ["liger fused_linear_cross_entropy", "cut-cross-entropy"],
         "linear_attention, retention": ["fla chunk_simple_gla", "fla chunk_retention"],
         "linear_attention, gated": ["fla chunk_simple_gla", "fla chunk_gla [head gate on every channel]"],
         "delta_rule, gated": ["fla chunk_gated_delta_rule"]}


def test_every_op_has_ours_and_peers_skip_on_the_cpu():
    # as a user runs it: no interpreter or poisoned buffers (conftest sets both for kernel tests)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "ITHACA_POISON")}
    done = subprocess.run([sys.executable, "-m", "ithaca.bench.kernels", "--device", "cpu", "--lengths", "256",
                           "--repeats", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, failure_text(done.stderr)
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in done.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| op ")]
    assert all(len(row) == 9 for row in rows), done.stdout
    for op in OPS:
        ours = [r for r in rows if r[0] == op and r[3].startswith("ours")]
        passes = ["fwd", "fwd+bwd"] if op.startswith(("attention", "linear_attention", "delta_rule")) else ["fwd+bwd"]
        assert [r[2] for r in ours] == passes, (op, done.stdout)
        assert all(not r[4].startswith(("skipped", "failed", "OOM")) for r in ours), (op, ours)
        for peer in PEERS[op]:
            peer_rows = [r for r in rows if r[0] == op and r[3] == peer]
            assert [r[2] for r in peer_rows] == passes, (op, peer, done.stdout)
            # no GPU here, so each peer is either not installed or CUDA-only: skipped, never run or crashed
            assert all(r[4].startswith("skipped: ") for r in peer_rows), (op, peer, peer_rows)
