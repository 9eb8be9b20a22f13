"""Which implementation each kernel dispatch runs, and one log line per op saying which and why.

Every op's dispatch (`kernels/<op>/__init__.py`) resolves its `impl` argument through `choose`:
"auto" asks the op which path is best for this tensor (Triton on CUDA, the best exact PyTorch
path elsewhere); a named impl is taken as asked, and "triton" on a tensor Triton cannot run
(a CPU tensor outside `TRITON_INTERPRET=1`) is refused naming the fix.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Callable

import torch

from ithaca.log import get_logger

log = get_logger(__name__)

_reported: set[tuple[str, str, str]] = set()


def interpreting() -> bool:
    """Triton kernels run on the CPU through Triton's interpreter (tests) when TRITON_INTERPRET=1."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_runs(x: torch.Tensor) -> bool:
    """Whether our Triton kernels can take `x`: a CUDA tensor, or a CPU tensor under the interpreter."""
    if importlib.util.find_spec("triton") is None:
        return False
    return x.is_cuda or (x.device.type == "cpu" and interpreting())


def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def choose(op: str, impl: str, names: tuple[str, ...], x: torch.Tensor,
           auto: Callable[[], tuple[str, str]]) -> str:
    """Resolve `impl` for op `op` on tensor `x`: one of `names`, or "auto" -> auto() = (name, why).

    Logs once per process and (op, choice, reason) which implementation runs. Raises ValueError
    for an unknown name or for "triton" where Triton cannot run.
    """
    if impl == "auto":
        impl, why = auto()
    elif impl in names:
        why = "asked for"
    else:
        raise ValueError(f"{op}: impl={impl!r}; choose one of {', '.join(repr(n) for n in ('auto', *names))}")
    if impl == "triton" and not triton_runs(x):
        raise ValueError(f"{op}: impl='triton' needs a CUDA tensor (got one on {x.device}) or, on the CPU, "
                         "TRITON_INTERPRET=1 set before the first import of triton; use impl='auto' or 'reference'")
    key = (op, impl, why)
    if key not in _reported:
        _reported.add(key)
        log.info(f"kernel {op}: {impl} ({why})")
    return impl


def auto_triton_or(fallback: str, x: torch.Tensor) -> tuple[str, str]:
    """The usual "auto": Triton on a CUDA tensor, else `fallback` (the best exact path off CUDA)."""
    if x.is_cuda and importlib.util.find_spec("triton") is not None:
        return "triton", "CUDA tensor"
    if x.is_cuda:
        return fallback, "triton is not installed"
    return fallback, f"{x.device.type} tensor: Triton kernels run on CUDA"
