"""Progress bars outside a terminal: a line per 10 % or per 30 s, never a redraw per update
(grpo_core.progress); the time bar's step count without a sentinel total (reporting)."""

import io

import pytest

from grpo_core import progress
from grpo_core.progress import LogBar, bar
from grpo_core.reporting import NO_STEP_CAP, progress_bar


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(progress.time, "perf_counter", c)
    return c


def test_a_line_per_tenth_then_none_at_close(clock):
    out = io.StringIO()
    b = LogBar(1000, "eval", "rec", stream=out)
    for _ in range(1000):
        b.update(1)
    b.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 10 and "\r" not in out.getvalue()           # tqdm: 1000 frames
    assert lines[0].startswith("eval: 100/1000 (10%) rec")
    assert lines[-1].startswith("eval: 1000/1000 (100%)")


def test_a_line_per_30_s_when_slow_or_without_total(clock):
    out = io.StringIO()
    b = LogBar(None, "checking images", "img", stream=out)
    for _ in range(10):
        clock.t += 10.0                                     # 100 s in all: 3 lines + close
        b.update(5)
    b.set_postfix({"bad": 0})
    b.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and lines[0] == "checking images: 15 img [30 s]"
    assert lines[-1] == "checking images: 50 img [100 s, bad=0]"


def test_terminal_gets_tqdm_anything_else_a_log_bar():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert isinstance(bar(10, "x", stream=io.StringIO()), LogBar)
    t = bar(10, "x", stream=Tty(), file=Tty())
    assert not isinstance(t, LogBar) and "tqdm" in type(t).__name__
    t.close()


def test_time_bar_shows_no_sentinel_total_and_stays_short(capsys, clock):
    b = progress_bar(NO_STEP_CAP, 0, time_budget_s=100.0, desc="sft baseline")
    for _ in range(500):
        clock.t += 0.2
        b.step({"loss": "0.50"}, elapsed=clock.t)
    b.close()
    err = capsys.readouterr().err                           # pytest's stderr: not a terminal
    assert "/1000000000" not in err and "step=500, loss=0.50" in err
    assert len(err.splitlines()) <= 11
    b = progress_bar(40, 0, time_budget_s=100.0)
    b.step()
    b.close()
    assert "step=1/40" in capsys.readouterr().err
