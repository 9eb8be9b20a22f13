"""The training loop and its step: the DeepSpeed engine, the LR schedule, step metrics, the non-finite policy, gradient norms, and `ithaca check`."""
