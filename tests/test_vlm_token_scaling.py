"""The ceiling arithmetic of benchmarks/vlm_token_scaling.py on hand-made timings."""
import pytest

from benchmarks.vlm_token_scaling import ceilings


def test_ceiling_is_full_prefill_over_tower_plus_decoder_at_t():
    rows = [{"batch_size": 1, "vision_tokens": None, "latency_ms": 2.0, "flops": 100},
            {"batch_size": 1, "vision_tokens": 576, "latency_ms": 18.0, "flops": 900},
            {"batch_size": 1, "vision_tokens": 64, "latency_ms": 6.0, "flops": 150}]
    out = ceilings(rows)
    assert [c["vision_tokens"] for c in out] == [64, 576]
    low, full = out
    assert low["prefill_floor_ms"] == 8.0 and low["ceiling_speedup"] == pytest.approx(20.0 / 8.0)
    assert low["flop_ratio"] == pytest.approx(1000 / 250)
    assert low["ceiling_over_flop_ratio"] == pytest.approx(2.5 / 4.0)
    assert full["ceiling_speedup"] == full["flop_ratio"] == 1.0
