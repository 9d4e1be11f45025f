"""training/fused/clock.py: the fused driver's time per phase and its one-line summary."""
import re
import time

import pytest

from training.fused.clock import PhaseClock


def test_phases_add_up_and_summarise_in_order():
    clock = PhaseClock()
    assert clock.summary() == ""
    with clock.phase("cells"):
        time.sleep(0.03)
    with clock.phase("steps"):
        time.sleep(0.09)
    with clock.phase("steps"):
        time.sleep(0.03)
    assert 0.11 <= clock.seconds["steps"] < 0.5 and 0.025 <= clock.seconds["cells"] < 0.3
    match = re.fullmatch(r"fused driver time: ([\d.]+) s training steps \(([\d.]+) %\), ([\d.]+) s the cells' own "
                         r"code between epochs \(([\d.]+) %\)", clock.summary())
    assert match  # steps before cells (PHASES order), phases never timed left out
    assert float(match.group(2)) + float(match.group(4)) == pytest.approx(100.0, abs=0.2)
    assert float(match.group(2)) > float(match.group(4))


def test_a_failing_block_is_still_timed_and_unknown_phases_are_refused():
    clock = PhaseClock()
    with pytest.raises(RuntimeError):
        with clock.phase("copies"):
            time.sleep(0.02)
            raise RuntimeError("boom")
    assert clock.seconds["copies"] >= 0.015
    with pytest.raises(ValueError, match=r"unknown phase 'step': one of \('steps', 'copies', 'evaluation', 'cells'\)"):
        with clock.phase("step"):
            pass
