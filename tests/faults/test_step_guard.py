"""The step guard's rules on their own: z-score against numpy, the window, the counters, the config checks."""
import math

import numpy as np
import pytest

from llama_pt.model import ConfigError
from llama_pt.train.step_guard import StepGuard, TrainingDiverged
from llama_pt.config.sections import FaultConfig, validate_fault


def test_zscore_matches_numpy_and_needs_a_full_window():
    guard = StepGuard(spike_zscore=3.0, spike_window=5, max_bad_steps=2)
    history = [4.0, 3.9, 4.1, 3.95, 4.05]
    for loss in history:
        assert guard.check_loss(100.0) is None  # the window is not full yet: no spike verdict
        guard.record(loss, None)
    z = (4.5 - np.mean(history)) / np.std(history)  # population std, as documented
    verdict = guard.check_loss(4.5)
    assert verdict is not None and f"{z:.1f} standard deviations" in verdict
    below = 4.0 + 2.9 * np.std(history) + (np.mean(history) - 4.0)
    assert guard.check_loss(float(below)) is None
    assert guard.check_loss(3.0) is None  # a drop is never a spike


def test_nonfinite_values_and_the_bad_step_counter():
    guard = StepGuard(spike_zscore=0, spike_window=4, max_bad_steps=2)
    assert guard.check_loss(math.nan) == "non-finite loss (nan)"
    assert guard.check_loss(math.inf) == "non-finite loss (inf)"
    assert guard.check_grad_norm(math.inf) == "non-finite gradient norm (inf)"
    assert guard.check_grad_norm(3.0) is None
    assert guard.check_loss(1e9) is None  # spike_zscore=0: spikes are not checked
    guard.record(math.nan, "non-finite loss (nan)")
    assert not guard.should_roll_back and list(guard.window) == []
    guard.record(2.0, None)
    assert guard.bad_in_row == 0
    guard.record(math.nan, "x")
    guard.record(math.nan, "x")
    assert guard.should_roll_back
    guard.rolled_back()
    assert guard.bad_in_row == 0 and not guard.should_roll_back
    guard.record(math.nan, "x")
    guard.record(math.nan, "x")
    with pytest.raises(TrainingDiverged, match="again right after rolling back"):
        guard.rolled_back()


def test_state_round_trip():
    guard = StepGuard(spike_zscore=6, spike_window=3, max_bad_steps=5)
    for loss in (1.5, 1.25, 1.0, 0.75):
        guard.record(loss, None)
    guard.record(math.nan, "x")
    other = StepGuard(spike_zscore=6, spike_window=3, max_bad_steps=5)
    other.load_state_dict(guard.state_dict())
    assert list(other.window) == [1.25, 1.0, 0.75] and other.bad_in_row == 1


@pytest.mark.parametrize("fields, message", [
    ({"stop_signals": ("SIGKILL",)}, "fault.stop_signals: 'SIGKILL' is not a signal the trainer can catch"),
    ({"stop_signals": ("SIGNOPE",)}, "fault.stop_signals: 'SIGNOPE' is not a signal"),
    ({"stop_signals": "SIGTERM"}, "fault.stop_signals='SIGTERM' must be a list of signal names"),
    ({"collective_timeout_s": 0}, "fault.collective_timeout_s=0 must be a positive number"),
    ({"spike_zscore": -1}, "fault.spike_zscore=-1 must be a positive number (0 turns it off)"),
    ({"spike_window": 1}, "fault.spike_window=1 must be at least 2"),
    ({"max_bad_steps": -2}, "fault.max_bad_steps=-2 must not be negative"),
])
def test_bad_fault_config_is_one_line_naming_the_field(fields, message):
    with pytest.raises(ConfigError) as error:
        validate_fault(FaultConfig(**fields))
    assert str(error.value).startswith(message)
