"""Every Triton kernel compiles for the H100/H200 (sm_90) with its GPU launch settings, here without a GPU.

The interpreter runs the kernels' math on the CPU; it does not run Triton's compiler. This test
does (bench/compile_kernels.py: launches recorded on CPU tensors, then triton.compile for sm_90
with the ptxas that ships with Triton), so code that a GPU would refuse, or a tile that needs
more shared memory than an SM has, fails here.
"""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import ROOT, failure_text

KERNELS = ["_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq", "_rms_norm_fwd", "_rms_norm_bwd", "_rope", "_swiglu_fwd",
           "_swiglu_bwd", "_fold_block", "_dlogits_block", "_state_fwd", "_output_fwd", "_state_bwd", "_dqdk_bwd",
           "_dv_bwd", "_delta_prepare_fwd", "_delta_state_fwd", "_delta_output_fwd", "_delta_state_bwd",
           "_delta_chunk_bwd"]
"""By function name; compile_kernels refuses two modules' kernels of one name, so each entry is one kernel."""


def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real JIT functions, not interpreted
    done = subprocess.run([sys.executable, "-m", "ithaca.bench.compile_kernels", "--arch", "90"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, failure_text(done.stdout) + failure_text(done.stderr)
    rows = [line.split("|")[1].strip() for line in done.stdout.splitlines() if line.startswith("| _")]
    assert sorted(set(rows)) == sorted(KERNELS), rows  # a new kernel must be exercised by compile_kernels too
    assert "FAILED" not in done.stdout
