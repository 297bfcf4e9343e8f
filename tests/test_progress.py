"""Progress lines (mspec/training/progress.py): throughput and a smoothed ETA."""

import pytest

from mspec.training import progress


def test_eta_is_smoothed_over_log_intervals(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(progress.time, "time", lambda: now[0])
    p = progress.Progress(start_step=0, end_step=1000)
    now[0] += 100.0  # the first interval includes the compilation: estimated, not averaged
    rate, eta = p.interval(10, molecules=160)
    assert rate == pytest.approx(1.6) and eta == pytest.approx(9900.0)
    now[0] += 10.0  # 1 s per step
    rate, eta = p.interval(20, molecules=160)
    assert rate == pytest.approx(16.0) and eta == pytest.approx(980.0)
    now[0] += 40.0  # one interval 4x slower (a loaded machine) moves the ETA by a fraction
    _, eta = p.interval(30, molecules=160)
    assert eta == pytest.approx(970 * (1 + progress.SMOOTHING * 3))
    p.pause()  # evaluation time is not training time
    now[0] += 10.0
    _, eta_after = p.interval(40, molecules=160)
    assert eta_after < eta
    assert progress.format_eta(2 * 86400 + 3 * 3600) == "2d03h"
    assert progress.format_eta(float("inf")) == "?"
