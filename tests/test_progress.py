"""The stderr progress bar: silent on quick jobs and pipes, drawn and erased on long ones."""

from __future__ import annotations

import io

import pytest

from quantize.progress import ENV_SWITCH, ProgressBar, progress_bar


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_nothing_before_the_delay_then_a_bar_then_erased():
    out, clock = io.StringIO(), Clock()
    with progress_bar(4, stream=out, enabled=True, clock=clock) as bar:
        bar("a")
        assert out.getvalue() == ""  # under a second: a quick job never shows a bar
        clock.t = 1.5
        bar("layers.1.weight")
        text = out.getvalue()
        assert "2/4 tensors" in text and "layers.1.weight" in text and "1.5s" in text
        assert "[" + "#" * 14 + "-" * 14 + "]" in text
        clock.t = 1.55
        bar("c")  # within the redraw interval: not drawn
        assert "3/4" not in out.getvalue()
        clock.t = 1.56
        bar("d")  # the last step is always drawn
        assert "4/4" in out.getvalue()
    assert out.getvalue().endswith("\r")  # erased: the line is blank again
    last = out.getvalue().split("\r")[-2]
    assert last.strip() == ""


def test_disabled_on_a_pipe_and_by_the_switch(monkeypatch):
    out, clock = io.StringIO(), Clock()  # StringIO is not a terminal
    monkeypatch.delenv(ENV_SWITCH, raising=False)
    bar = ProgressBar(2, stream=out, clock=clock)
    clock.t = 5
    bar("x")
    bar.close()
    assert out.getvalue() == "" and bar.done == 1
    monkeypatch.setenv(ENV_SWITCH, "1")
    bar = ProgressBar(2, stream=out, clock=clock, delay=0)
    bar("x")
    assert "1/2" in out.getvalue()
    monkeypatch.setenv(ENV_SWITCH, "0")
    tty = io.StringIO()
    tty.isatty = lambda: True
    bar = ProgressBar(2, stream=tty, delay=0)
    bar("x")
    assert tty.getvalue() == ""


def test_long_labels_are_cut_and_zero_total_does_not_divide(monkeypatch):
    out = io.StringIO()
    bar = ProgressBar(0, stream=out, enabled=True, delay=0)
    bar("m" * 100)
    assert "..." + "m" * 37 in out.getvalue() and "m" * 41 not in out.getvalue()


def test_erased_when_the_job_fails():
    out = io.StringIO()
    with pytest.raises(RuntimeError), progress_bar(3, stream=out, enabled=True, delay=0) as bar:
        bar("one")
        raise RuntimeError("boom")
    assert out.getvalue().split("\r")[-2].strip() == ""
