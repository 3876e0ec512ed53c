"""vopd_megatron.progress: what a log and a terminal show of a long-running command.

In a log (a non-terminal stream) the display must be quiet except for lines at
the first update, every `every` units or `seconds` seconds, and the end; each
line carries the position, the latest metrics, the rate and the time left,
computed here from an injected clock (3 s per iteration). Only rank 0 shows
anything. The commands' own use of it is checked where they are spawned
(test_examples_tiny, test_eval_cli, test_convert, test_arithmetic_task).
"""
import io
import re

import pytest

from vopd_megatron.progress import Progress, echo, format_metrics

LINE = re.compile(r"^\[sft\] (\d+)/(\d+) \[(\d\d):(\d\d)<(\d\d):(\d\d), +([\d.]+)s/it(?:, (.*))?\]$")


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def run(total, step_s, every=None, seconds=30.0, stop=None, initial=0, **kw):
    clock, out = Clock(), io.StringIO()
    p = Progress(total, "[sft]", every=every, seconds=seconds, file=out, clock=clock, initial=initial, **kw)
    for i in range(initial + 1, (stop or total) + 1):
        clock.t += step_s
        p.update(1, loss=1.0 / i)
    p.close()
    return out.getvalue()


def parsed(text):
    rows = []
    for line in text.splitlines():
        m = LINE.match(line)
        assert m, f"not a progress line: {line!r}"
        n, total, em, es, rm, rs, rate, post = m.groups()
        rows.append(dict(n=int(n), total=int(total), elapsed=int(em) * 60 + int(es),
                         remaining=int(rm) * 60 + int(rs), rate=float(rate), post=post))
    return rows


@pytest.fixture(autouse=True)
def rank0(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)


def test_log_lines_by_time_carry_iteration_loss_rate_eta():
    text = run(total=10, step_s=3.0, seconds=10.0)
    assert "\r" not in text
    rows = parsed(text)
    # first update (t=3); then the first update >= 10 s after the last line: t=15 (n=5), t=27 (n=9); the end.
    assert [r["n"] for r in rows] == [1, 5, 9, 10]
    for r in rows:
        assert r["total"] == 10
        assert r["elapsed"] == 3 * r["n"]
        assert r["rate"] == pytest.approx(3.0)
        assert r["remaining"] == 3 * (10 - r["n"])
        assert r["post"] == f"loss={1.0 / r['n']:#.4g}"


def test_log_lines_every_n_iterations():
    rows = parsed(run(total=10, step_s=2.0, every=4, seconds=1e9))
    assert [r["n"] for r in rows] == [1, 4, 8, 10]


def test_close_prints_where_a_run_stopped_early():
    rows = parsed(run(total=10, step_s=2.0, seconds=1e9, stop=6))
    assert [r["n"] for r in rows] == [1, 6]
    assert rows[-1]["remaining"] == 2 * 4


def test_resumed_run_rates_only_new_iterations():
    rows = parsed(run(total=10, step_s=3.0, seconds=1e9, initial=6))
    assert [r["n"] for r in rows] == [7, 10]
    assert rows[-1]["elapsed"] == 12 and rows[-1]["rate"] == pytest.approx(3.0)


def test_only_rank0_shows_anything(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert run(total=5, step_s=1.0) == ""
    assert run(total=5, step_s=1.0, interactive=True) == ""


def test_terminal_gets_a_live_bar():
    text = run(total=5, step_s=1.0, interactive=True)
    assert "\r" in text  # redrawn in place
    assert "5/5" in text and "loss=0.2000" in text


def test_metrics_none_keeps_the_last_value():
    assert format_metrics({"loss": 0.123456, "kl": None, "step": 3}) == "loss=0.1235, step=3"
    out = io.StringIO()
    p = Progress(3, "[sft]", file=out, seconds=0.0)
    p.update(1, loss=2.0)
    p.update(1, loss=None)
    assert out.getvalue().splitlines()[-1].endswith("loss=2.000]")


def test_echo_prints_a_line(capsys):
    echo("[vopd] iter 1")
    assert capsys.readouterr().out == "[vopd] iter 1\n"
