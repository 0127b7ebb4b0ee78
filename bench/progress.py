"""Live progress of one training phase (dense, a method's search, finetune): step/total, loss, lr, samples/s, ETA.

- stderr is a terminal (of a known size): one tqdm line per phase, redrawn in place (left on screen when the phase ends);
- otherwise (CI, Slurm logs, `bench run -s` piped to a file): a plain line every ~10% of the phase or every
  30 s, whichever comes first, and one at the end, through the run's log function (stderr without one);
- quiet: nothing.

    finetune:  45%|#####      | 27/60 [00:03<00:04, 8.1step/s, loss 1.2345 lr 4.10e-04 259 samples/s]
    finetune: step 27/60 (45%) loss 1.2345 lr 4.10e-04 259 samples/s elapsed 0:00:03 ETA 0:00:04
"""
from __future__ import annotations

import contextlib
import datetime as dt
import io
import os
import sys
import time
from typing import Callable


def _hms(seconds: float) -> str:
    return str(dt.timedelta(seconds=int(round(max(0.0, seconds)))))


def _terminal_size(stream) -> tuple[int, int]:
    """(columns, rows) of the terminal behind `stream`; (0, 0) when it reports none."""
    try:
        size = os.get_terminal_size(stream.fileno())
        return size.columns, size.lines
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return 0, 0


def _columns(stream) -> int:
    return _terminal_size(stream)[0]


class Progress:
    """`update(done, loss, lr)` after every optimizer step (`done` = steps completed); `write(msg)` prints a
    line without breaking the live bar; `close()` at the end. `start` = the step a resumed phase starts at
    (rates and ETA count only the steps of this process)."""

    PLAIN_FRACTION = 0.1
    PLAIN_SECONDS = 30.0
    WINDOW = 10        # the loss shown on the live line: mean of the last WINDOW steps

    def __init__(self, phase: str, total: int, batch_size: int, *, log: Callable[[str], None] | None = None,
                 quiet: bool = False, start: int = 0, stream=None, mode: str | None = None):
        self.phase, self.total, self.batch_size, self.start = phase, total, batch_size, start
        self.log = log
        self.stream = stream if stream is not None else sys.stderr
        if mode is None:
            isatty = getattr(self.stream, "isatty", None)
            # a terminal that reports no size (a pseudo-terminal nobody sized, e.g. `script` without a
            # terminal around it) would hide tqdm's bar: plain lines there
            mode = "tty" if isatty is not None and isatty() and min(_terminal_size(self.stream)) > 0 else "plain"
        self.mode = None if quiet or total <= start else mode
        self.t0 = self.t_last = time.perf_counter()
        self.every = max(1, int(round(total * self.PLAIN_FRACTION)))
        self._since: list = []          # losses since the last plain line
        self._window: list = []
        self.bar = None
        if self.mode == "tty":
            from tqdm import tqdm
            width = _columns(self.stream)   # a terminal of unknown width (0 columns): a fixed 100
            self.bar = tqdm(total=total, initial=start, desc=phase, file=self.stream, unit="step",
                            dynamic_ncols=bool(width), ncols=None if width else 100, leave=True, mininterval=0.2)

    def rate(self, done: int) -> tuple[float, float]:
        """(samples/s, ETA seconds) over the steps this process ran."""
        el = time.perf_counter() - self.t0
        steps = done - self.start
        sps = steps * self.batch_size / el if el > 0 and steps > 0 else 0.0
        eta = (self.total - done) * el / steps if steps > 0 else float("nan")
        return sps, eta

    def update(self, done: int, loss: float, lr: float) -> None:
        if self.mode is None:
            return
        self._window = (self._window + [loss])[-self.WINDOW:]
        if self.mode == "tty":
            sps, _ = self.rate(done)
            self.bar.set_postfix_str(f"loss {sum(self._window) / len(self._window):.4f} lr {lr:.2e} "
                                     f"{sps:.0f} samples/s", refresh=False)
            self.bar.update(done - self.bar.n)
            return
        self._since.append(loss)
        now = time.perf_counter()
        if done % self.every == 0 or done == self.total or now - self.t_last >= self.PLAIN_SECONDS:
            sps, eta = self.rate(done)
            mean = sum(self._since) / len(self._since)
            self._emit(f"{self.phase}: step {done}/{self.total} ({100 * done / self.total:.0f}%) loss {mean:.4f} "
                       f"lr {lr:.2e} {sps:.0f} samples/s elapsed {_hms(now - self.t0)} "
                       f"ETA {_hms(eta) if eta == eta else '?'}")
            self._since, self.t_last = [], now

    def _emit(self, msg: str) -> None:
        if self.log is not None:
            self.log(msg)
        else:
            print(msg, file=self.stream, flush=True)

    def write(self, msg: str) -> None:
        """A log line (log_every, resume notes): through `log` (else the stream), with the live bar cleared and
        redrawn around it."""
        ctx = self.bar.external_write_mode() if self.bar is not None else contextlib.nullcontext()
        with ctx:
            self._emit(msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
