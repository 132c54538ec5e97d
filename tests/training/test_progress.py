"""ProgressTracker: smoothed loss, rates and ETA without warm-up, MFU."""

import pytest
import torch

from craftfn.training import ProgressTracker, default_peak_flops


def test_warmup_steps_are_left_out_of_rates_and_eta():
    tracker = ProgressTracker(total_steps=10, warmup_steps=2, window=100, flops_per_token=1e3, peak_flops=1e6)
    tracker.start(0, now=0.0)
    # Steps 1-2 are slow (compilation); later steps take 0.5 s each with 100 tokens / 4 samples.
    assert "tokens_per_sec" not in tracker.update(1, 3.0, tokens=100, samples=4, now=30.0)
    assert "tokens_per_sec" not in tracker.update(2, 2.0, tokens=100, samples=4, now=40.0)
    t = 40.0
    for step in range(3, 7):
        t += 0.5
        out = tracker.update(step, 1.0, tokens=100, samples=4, now=t)
    assert out["tokens_per_sec"] == pytest.approx(200.0)
    assert out["samples_per_sec"] == pytest.approx(8.0)
    assert out["eta_sec"] == pytest.approx(4 * 0.5)  # 4 steps left at 0.5 s
    assert out["mfu"] == pytest.approx(1e3 * 200.0 / 1e6)


def test_resume_clock_excludes_evaluation_time():
    tracker = ProgressTracker(total_steps=100, warmup_steps=0)
    tracker.start(0, now=0.0)
    tracker.update(1, 1.0, tokens=10, now=1.0)
    tracker.resume_clock(now=50.0)  # 49 s of evaluation
    out = tracker.update(2, 1.0, tokens=10, now=51.0)
    assert out["tokens_per_sec"] == pytest.approx(10.0)


def test_smoothed_loss_is_an_ema_seeded_with_the_first_value_and_skips_nan():
    tracker = ProgressTracker(smoothing=0.5)
    tracker.start(0, now=0.0)
    assert tracker.update(1, 4.0, now=1.0)["loss_smoothed"] == 4.0
    assert tracker.update(2, 2.0, now=2.0)["loss_smoothed"] == 3.0
    assert tracker.update(3, float("nan"), now=3.0)["loss_smoothed"] == 3.0
    with pytest.raises(ValueError, match="smoothing"):
        ProgressTracker(smoothing=1.0)


def test_default_peak_on_cpu_is_documented_per_thread_figure():
    assert default_peak_flops(torch.device("cpu")) == torch.get_num_threads() * 100e9
