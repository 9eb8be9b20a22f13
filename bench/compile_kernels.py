"""Compile every Triton kernel of ours for a GPU architecture, on any machine: no GPU needed.

Triton ships ptxas, so `triton.compile` turns a kernel into a cubin for sm_90 (the H100/H200)
without a device. That catches what the interpreter cannot: code that does not compile for a GPU
(types, tl.dot shapes, layouts) and tiles that need more shared memory than an SM has. How: each
op's Triton entry point runs once, forward and backward, on small CPU tensors with every launch
recorded instead of run (Triton is not in interpreter mode here), in bf16 and fp32, with and
without documents, resets, residual, decay kinds; each distinct (kernel, argument types,
constexprs, warps, stages) is then compiled for the target. The launch settings are the GPU ones
(the launchers pick small tiles only under TRITON_INTERPRET=1). Prints a row per compiled kernel;
exits 1 if any fails to compile or needs more shared memory than the architecture has, or if two
modules' kernels share a name (a row, the test's list and a GPU profile name a kernel by it alone).

What it cannot tell: speed, register spills' cost, or numerics on the device (bench/gpu_check.sh).
The triton here may be newer than a GPU machine's (the lent H100 has 3.6).

Run:  python -m ithaca.bench.compile_kernels [--arch 90]     (TRITON_INTERPRET must be unset)
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from types import SimpleNamespace
from typing import Any

if os.environ.get("TRITON_INTERPRET") == "1":  # read when kernels are decorated, so before any import of them
    raise SystemExit("compile_kernels: unset TRITON_INTERPRET (kernels must be real JIT functions to compile)")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns unless the default is stated

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from ithaca.bench.header import bench_header

SHARED_MEMORY = {90: 232448, 80: 166912, 89: 101376}
"""Bytes of shared memory one block may use, by compute capability (sm_90: 227 KiB)."""
POINTER_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32",
                 torch.int64: "i64", torch.bool: "i1", torch.uint8: "u8"}


def record_launches() -> list[tuple[JITFunction, tuple, dict]]:
    """From now on `kernel[grid](...)` records (kernel, args, kwargs) and runs nothing."""
    launches: list[tuple[JITFunction, tuple, dict]] = []

    def run(self: JITFunction, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
        launches.append((self, args, kwargs))

    JITFunction.run = run
    # rms_norm sizes its backward grid by the GPU's SM count: an H100's, since there is no GPU here
    torch.cuda.get_device_properties = lambda device=None: SimpleNamespace(multi_processor_count=132)
    return launches


def exercise(dtype: torch.dtype) -> None:
    """Every op's Triton path, forward and backward, in the variants its kernels specialize on."""
    from ithaca.kernels.attention.triton import attention_lse_bwd_triton, attention_lse_fwd_triton
    from ithaca.kernels.delta_rule.triton import delta_rule_transition_triton, delta_rule_triton
    from ithaca.kernels.linear_attention.triton import linear_attention_triton
    from ithaca.kernels.linear_cross_entropy.chunked import linear_cross_entropy_blocked
    from ithaca.kernels.linear_cross_entropy.triton import TRITON_STEPS
    from ithaca.kernels.rms_norm.triton import rms_norm_triton
    from ithaca.kernels.rope.reference import rope_inv_freq
    from ithaca.kernels.rope.triton import rope_triton
    from ithaca.kernels.swiglu.triton import swiglu_triton

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape).to(dtype).requires_grad_()

    s = 256
    docs = (torch.arange(s) // 100)[None]
    q, k, v = rand(1, s, 8, 128), rand(1, s, 2, 128), rand(1, s, 2, 128)
    for causal, doc_ids in ((True, None), (True, docs), (False, docs)):
        masks = dict(is_causal=causal, scale=0.1, q_doc_ids=doc_ids, k_doc_ids=doc_ids)
        out, lse = attention_lse_fwd_triton(q, k, v, **masks)
        attention_lse_bwd_triton(out, q, k, v, out, lse, **masks)
    x, residual, weight = rand(s, 2048), rand(s, 2048), rand(2048)
    for res in (None, residual):
        y = rms_norm_triton(x, weight, 1e-5, res)
        (y[0] if res is not None else y).float().sum().backward()
    rms_norm_triton(rand(s, 8, 128), rand(8, 128), 1e-5).float().sum().backward()  # per-head gains
    q_rot, k_rot = rope_triton(q, k, torch.arange(s)[None], rope_inv_freq(128, 1e4))
    (q_rot.float().sum() + k_rot.float().sum()).backward()
    gate_up = rand(s, 2 * 5632)
    swiglu_triton(*gate_up.chunk(2, dim=-1)).float().sum().backward()
    hidden, head = rand(s, 2048), rand(4096, 2048)
    linear_cross_entropy_blocked(hidden, head, torch.randint(0, 4096, (s,)), -100, group=None,
                                 steps=TRITON_STEPS).sum().backward()
    lq, lk, lv = rand(1, s, 4, 128), rand(1, s, 4, 128), rand(1, s, 4, 128)
    resets = torch.zeros(1, s, dtype=torch.bool)
    resets[0, 100] = True
    for log_decay in (None, torch.full((4,), -0.05, requires_grad=True),
                      torch.full((1, s, 4), -0.05, requires_grad=True)):
        out, final = linear_attention_triton(lq, lk, lv, log_decay, scale=0.1, initial_state=None, resets=resets)
        (out.float().sum() + final.sum()).backward()
    # The delta rule holds a whole key per program, so its tiles grow with d_k: both dtypes at the models' 128.
    # fp32 at MAX_DK needs the most shared memory of any case (184 KiB of 227 in _delta_chunk_bwd); it and
    # bf16 at MAX_DK compiled once (2026-11-24) but would add ~40 s to every test run, so they are not here.
    d_k = 128
    delta_q, delta_k, delta_v, beta = rand(1, s, 2, d_k), rand(1, s, 2, d_k), rand(1, s, 2, 128), rand(1, s, 2)
    gates = torch.full((1, s, 2), -0.05, requires_grad=True)
    out, final = delta_rule_triton(delta_q, delta_k, delta_v, beta, log_decay=gates, scale=0.1, resets=resets,
                                   initial_state=torch.zeros(1, 2, d_k, 128, requires_grad=True))
    (out.float().sum() + final.sum()).backward()
    a, b = delta_rule_transition_triton(delta_k, delta_v, beta, log_decay=gates, resets=resets)  # no output pass
    (a.sum() + b.sum()).backward()


def signature(fn: JITFunction, args: tuple, kwargs: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, compile options) of one recorded launch."""
    values = {**dict(zip(fn.arg_names, args)), **{k: v for k, v in kwargs.items() if k in fn.arg_names}}
    options = {k: v for k, v in kwargs.items() if k not in fn.arg_names}  # num_warps, num_stages
    types, constexprs = {}, {}
    for param in fn.params:
        value = values[param.name]
        if param.is_constexpr:
            types[param.name], constexprs[param.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            types[param.name] = "*" + POINTER_TYPES[value.dtype]
        elif isinstance(value, bool):
            types[param.name] = "i1"
        elif isinstance(value, int):
            types[param.name] = "i32" if -2**31 <= value < 2**31 else "i64"
        elif isinstance(value, float):
            types[param.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {param.name}={value!r} has no Triton type here")
    return types, constexprs, options


_TO_COMPILE: list[tuple[JITFunction, dict, dict, dict, int]] = []
"""The distinct launches to compile; forked workers read it by index."""


def _compile(index: int) -> tuple[str, str | None]:
    """Compile launch `index` of _TO_COMPILE -> (its table row, a failure message or None)."""
    fn, types, constexprs, options, arch = _TO_COMPILE[index]
    pointers = ",".join(sorted({t[1:] for t in types.values() if t.startswith("*")}))
    consts = " ".join(f"{k}={v}" for k, v in constexprs.items())
    launch = f"{options.get('num_warps', 4)}, {options.get('num_stages', 3)}"
    start = time.perf_counter()
    try:
        compiled = triton.compile(ASTSource(fn=fn, signature=types, constexprs=constexprs),
                                  target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as error:  # a compile error: the row says which kernel, the failure says why
        message = str(error).strip().splitlines()[-1][:300] if str(error).strip() else ""
        return (f"| {fn.__name__} | {pointers} | {consts} | {launch} | FAILED | - | - |",
                f"{fn.__name__} [{consts}]: {type(error).__name__}: {message}")
    shared = compiled.metadata.shared
    failure = None
    if shared > SHARED_MEMORY[arch]:
        failure = f"{fn.__name__} [{consts}]: needs {shared} bytes of shared memory, sm_{arch} has {SHARED_MEMORY[arch]}"
    return (f"| {fn.__name__} | {pointers} | {consts} | {launch} | {shared / 1024:.1f} | "
            f"{len(compiled.asm['cubin']) / 1024:.0f} | {time.perf_counter() - start:.1f} |", failure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(SHARED_MEMORY),
                        help="compute capability to compile for (90: H100/H200)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiles at once")
    args = parser.parse_args()
    launches = record_launches()
    for dtype in (torch.bfloat16, torch.float32):
        exercise(dtype)
    modules: dict[str, set[str]] = {}
    for fn, _, _ in launches:
        modules.setdefault(fn.__name__, set()).add(fn.__module__)
    clashes = {name: sorted(where) for name, where in modules.items() if len(where) > 1}
    if clashes:  # rows, tests and GPU profiles name a kernel by its function name alone
        sys.exit(f"compile_kernels: kernels share a name across modules, rename one of each: {clashes}")
    unique = {}
    for fn, call_args, kwargs in launches:
        types, constexprs, options = signature(fn, call_args, kwargs)
        key = (fn.__name__, tuple(types.items()), tuple((k, str(v)) for k, v in constexprs.items()),
               tuple(sorted(options.items())))
        unique.setdefault(key, (fn, types, constexprs, options))
    global _TO_COMPILE
    _TO_COMPILE = [(fn, types, constexprs, options, args.arch) for fn, types, constexprs, options in unique.values()]
    print(bench_header("compile_kernels", "cpu", f"target=cuda:sm_{args.arch} kernels={len(_TO_COMPILE)}"))
    print("| kernel | pointer types | constexprs | warps, stages | shared KiB | cubin KiB | s |")
    print("|---|---|---|---|---|---|---|")
    failures = []
    # compiles are single-threaded Python plus ptxas: one forked worker per core (they inherit the kernels)
    with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
        for row, failure in pool.imap(_compile, range(len(_TO_COMPILE))):
            print(row, flush=True)
            if failure:
                failures.append(failure)
    if failures:
        print("\n".join(["", "failed:", *failures]), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
