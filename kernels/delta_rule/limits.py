"""What the delta rule's Triton kernels can take, known without importing Triton (the dispatch in
__init__.py decides with it, triton.py enforces it)."""

MAX_DK = 256
"""Widest keys the Triton kernels take (triton.py holds a key in one block per program)."""
