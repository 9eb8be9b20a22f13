"""bench/scale.py on a tiny grid: one table line per series and GPU count, a chart, and every row the
plan's own answer (the same layout through with_layout and make_plan gives the same row, and no other
layout asked about that fits is faster)."""

from __future__ import annotations

import pytest

from ithaca.bench import scale
from ithaca.launcher.plan.layouts import with_layout
from ithaca.launcher.plan.report import make_plan

GPUS, SEQ_LENS = (8, 16), (32 * 1024, 4096 * 1024)


@pytest.fixture(scope="module")
def rows():
    return scale.scale_rows(gpus=GPUS, seq_lens=SEQ_LENS)


def test_the_table_and_chart_have_one_entry_per_series_gpu_count_and_length(tmp_path, capsys):
    png = tmp_path / "scale.png"
    scale.main(["--png", str(png), "--gpus", *map(str, GPUS), "--seq-lens", *map(str, SEQ_LENS), "--no-published"])
    assert png.stat().st_size > 10_000
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert table[0] == "| series | GPUs | 32K | 4M |"
    body = table[1:]
    assert len(body) == len(scale.SERIES) * len(GPUS)
    assert {line.split(" | ")[0][2:] for line in body} == {s.name for s in scale.SERIES}
    assert all(len(line.split(" | ")) == 2 + len(SEQ_LENS) for line in body)


def test_every_row_is_the_plans_best_for_its_series(rows):
    assert len(rows) == len(scale.SERIES) * len(GPUS) * len(SEQ_LENS)
    assert any(r.plan.fits for r in rows) and any(not r.plan.fits for r in rows)  # 8B at 4M on 8 GPUs does not fit
    for row in rows:
        layout = row.plan.layout
        assert (layout.sp_method, layout.linear_exchange) == (row.series.sp_method, row.series.linear_exchange)
        assert layout.dp * layout.sp == row.gpus and layout.sp > 1
        cfg = with_layout(scale.config_at(row.series.model, row.seq_len, layout.dp), layout)
        assert cfg.data.seq_len == row.seq_len
        assert make_plan(cfg, scale.DEVICE, row.gpus, scale.GPUS_PER_NODE).as_json() == row.plan.as_json()
    row = next(r for r in rows if r.plan.fits and r.series.sp_method == "usp")
    others = [scale.plan_of(row.series.model, row.seq_len, layout, row.gpus)
              for layout in scale.candidates(row.series, row.gpus)]
    assert max(p.time.tokens_per_s_per_gpu for p in others if p is not None and p.fits) \
        == row.plan.time.tokens_per_s_per_gpu
