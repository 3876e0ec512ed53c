"""Progress of a long-running command: a live bar on a terminal, a few lines in a log.

Why: `vopd-sft`, `vopd-train`, `vopd-eval` and `vopd-convert` run for minutes
(a teacher's supervised training, a conversion of a large checkpoint) and a
user must see that they move and when they will end. The display is tqdm's
(its meter: `n/total [elapsed<remaining, rate, loss=...]`), in one of two
modes chosen from the output stream:

- interactive (the stream is a terminal): tqdm's bar, redrawn in place, with
  the latest metrics (loss, KL) as its postfix;
- non-interactive (a pipe, a file, a CI log): no bar, no carriage returns;
  one line with the same meter at the first update, then whenever `every`
  more units are done or `seconds` have passed since the last line (whichever
  comes first), and at the end. A log stays short and still says how far the
  command is and how long it has left.

Only global rank 0 shows anything (the `RANK` variable torchrun sets, so this
works before any process group exists); every other rank gets a display that
does nothing. Messages printed while a bar is live go through `echo`, which
lifts the bar, prints, and redraws it.
"""
from __future__ import annotations

import sys
import time

from tqdm import tqdm

from . import launch

_BAR = "{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
_LINE = "{desc} {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


def _is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def format_metrics(metrics: dict) -> str:
    """`loss=0.1234, kl=0.05`: floats to 4 significant digits, None dropped."""
    parts = []
    for key, value in metrics.items():
        if value is None:
            continue
        parts.append(f"{key}={value:#.4g}" if isinstance(value, float) else f"{key}={value}")
    return ", ".join(parts)


class Progress:
    """A progress display over `total` units (iterations, samples, tensors).

    desc: what is measured, printed first (`[sft] train`).
    unit: tqdm's unit name (`it`, `sample`, `tensor`).
    initial: units already done (a resumed run): the rate counts only new ones.
    every: non-interactive mode: a line at least every `every` units (None: by time only).
    seconds: non-interactive mode: a line at least every `seconds` seconds.
    file: the stream (default: stderr, tqdm's convention); interactive: None = the stream is a terminal.
    enabled: None = only on global rank 0.
    clock: seconds since some origin (tests inject one; default time.monotonic).
    """

    def __init__(self, total: int, desc: str, *, unit: str = "it", initial: int = 0, every: int | None = None,
                 seconds: float = 30.0, file=None, interactive: bool | None = None, enabled: bool | None = None,
                 clock=time.monotonic):
        self.total, self.desc, self.unit, self.initial = int(total), desc, unit, int(initial)
        self.every, self.seconds, self.clock = every, float(seconds), clock
        self.file = sys.stderr if file is None else file
        self.enabled = launch.rank() == 0 if enabled is None else enabled
        self.interactive = _is_terminal(self.file) if interactive is None else interactive
        self.n, self.metrics = self.initial, {}
        self.start = self.clock()
        self._last_line_at, self._last_line_n = None, self.initial
        self._bar = None
        if self.enabled and self.interactive:
            self._bar = tqdm(total=self.total, initial=self.initial, desc=desc, unit=unit, file=self.file,
                             bar_format=_BAR, dynamic_ncols=True, mininterval=0.5, leave=True)

    def update(self, n: int = 1, **metrics) -> None:
        """`n` more units done; `metrics` (loss=..., kl=...) replace the shown ones (None: keep the old)."""
        self.n += n
        self.metrics.update({k: v for k, v in metrics.items() if v is not None})
        if not self.enabled:
            return
        if self._bar is not None:
            if metrics:
                self._bar.set_postfix_str(format_metrics(self.metrics), refresh=False)
            self._bar.update(n)
            return
        now = self.clock()
        due = (self._last_line_at is None or now - self._last_line_at >= self.seconds
               or (self.every and self.n // self.every > self._last_line_n // self.every)
               or self.n >= self.total)
        if due:
            self._print_line(now)

    def line(self, now: float | None = None) -> str:
        """The meter as one line: `desc n/total [elapsed<remaining, rate, metrics]`."""
        elapsed = (self.clock() if now is None else now) - self.start
        postfix = format_metrics(self.metrics)
        return tqdm.format_meter(self.n, self.total, elapsed, prefix=self.desc, unit=self.unit,
                                 initial=self.initial, postfix=postfix or None, bar_format=_LINE)

    def _print_line(self, now: float) -> None:
        self._last_line_at, self._last_line_n = now, self.n
        print(self.line(now), file=self.file, flush=True)

    def close(self) -> None:
        """End the display: the bar stays on screen; a log gets a last line if the last units had none."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._last_line_n != self.n:
            self._print_line(self.clock())

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def echo(message: str, file=None) -> None:
    """Print a line without tearing a live progress bar (tqdm lifts and redraws it)."""
    tqdm.write(message, file=sys.stdout if file is None else file)
    (sys.stdout if file is None else file).flush()
