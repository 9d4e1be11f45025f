"""Settings outside the RNG that change results (thread count, deterministic kernels) are saved with the
RNG state; a resume under other ones says so in one line."""
import torch

from utils.seeding import capture_rng_state, runtime_differences


def test_a_thread_count_change_is_named():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        state = capture_rng_state()
        assert state["runtime"]["threads"] == 1 and runtime_differences(state) == []
        torch.set_num_threads(2)
        assert runtime_differences(state) == ["torch threads 1 when saved, 2 now"]
    finally:
        torch.set_num_threads(before)


def test_a_checkpoint_without_runtime_settings_is_not_flagged():
    state = capture_rng_state()
    del state["runtime"]
    assert runtime_differences(state) == []
