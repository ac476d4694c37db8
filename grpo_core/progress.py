"""Progress bars that behave in a terminal and in a log file.

Every bar of grpo_core and grpo_app comes from ``bar(total, desc, unit)``:
  - stderr is a terminal: a tqdm bar (redrawn in place);
  - otherwise (a log file, a pipe, a cluster job): a ``LogBar``, which writes one plain line
    ``desc: n/total (p%) [elapsed, postfix]`` when the count crosses each further 10 % of the
    total, or ``LOG_EVERY_S`` seconds after its last line, and once at close. A tqdm bar outside a
    terminal writes a carriage-return frame per update: 635 KB of log for one demo.

Both expose what the callers use: ``update(n)``, ``set_postfix(dict | **kw, refresh=)``, ``n`` and
``total`` (settable), ``refresh()`` and ``close()``.
"""

from __future__ import annotations

import sys
import time

LOG_EVERY_S = 30.0       # outside a terminal: a line at least this often while the count moves
LOG_FRACTION = 0.10      # ... and one each time the count crosses another 10 % of the total


def say(line: str) -> None:
    """Print ``line`` to stdout without breaking a tqdm bar drawn in the terminal."""
    if is_terminal():
        from tqdm.auto import tqdm

        tqdm.write(line, file=sys.stdout)
    else:
        print(line, flush=True)


def is_terminal(stream=None) -> bool:
    stream = sys.stderr if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


def bar(total: int | float | None, desc: str, unit: str = "it", stream=None, **tqdm_kw):
    """A tqdm bar on a terminal, else a LogBar (module docstring); both write to stderr."""
    if is_terminal(stream):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, **tqdm_kw)
    return LogBar(total, desc, unit, stream=stream, initial=tqdm_kw.get("initial", 0))


class LogBar:
    """A progress bar for logs: a line per 10 % of ``total`` or per LOG_EVERY_S seconds."""

    def __init__(self, total, desc: str, unit: str = "it", stream=None, initial=0):
        self.total, self.desc, self.unit, self.stream = total, desc, unit, stream
        self.n, self.postfix, self.t0 = initial, "", time.perf_counter()
        self._last_t, self._last_tenth, self._last_n = self.t0, self._tenth(), None
        self.closed = False

    def _tenth(self) -> int:
        return int(self.n / self.total / LOG_FRACTION) if self.total else 0

    def update(self, n=1) -> None:
        self.n += n
        self.refresh()

    def set_postfix(self, ordered_dict=None, refresh=True, **kw) -> None:
        items = {**(ordered_dict or {}), **kw}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def refresh(self) -> None:
        """A line when a further 10 % is crossed, or LOG_EVERY_S passed and the count moved."""
        now = time.perf_counter()
        stale = now - self._last_t >= LOG_EVERY_S and self.n != self._last_n
        if self._tenth() > self._last_tenth or stale:
            self._write(now)

    def close(self) -> None:
        if not self.closed and self.n != self._last_n:
            self._write(time.perf_counter())
        self.closed = True

    def line(self, now: float | None = None) -> str:
        elapsed = (time.perf_counter() if now is None else now) - self.t0
        of = f"/{self.total:.0f} ({100 * self.n / self.total:.0f}%)" if self.total else ""
        count = f"{self.n:.0f}{of}"
        extra = f", {self.postfix}" if self.postfix else ""
        return f"{self.desc}: {count} {self.unit} [{elapsed:.0f} s{extra}]"

    def _write(self, now: float) -> None:
        stream = sys.stderr if self.stream is None else self.stream
        print(self.line(now), file=stream, flush=True)
        self._last_t, self._last_tenth, self._last_n = now, self._tenth(), self.n
