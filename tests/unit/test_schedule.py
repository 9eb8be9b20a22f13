from __future__ import annotations

import math

from ithaca.launcher.train.schedule import WarmupCosine


def test_warmup_then_cosine_to_the_floor():
    f = WarmupCosine(warmup_steps=4, decay_steps=14, min_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0
    assert math.isclose(f(9), 0.1 + 0.9 * 0.5)  # half way through the decay
    assert math.isclose(f(14), 0.1) and math.isclose(f(100), 0.1)
