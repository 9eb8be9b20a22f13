"""Held-out evaluation: fixed eval windows, forward-only loss under any layout, loss by position."""
