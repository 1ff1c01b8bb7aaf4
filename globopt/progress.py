"""What the user sees while a run works.

On a terminal: a live progress bar (evaluations, rate, best so far) with a line printed only when the
best improves. Elsewhere (batch jobs, pipes): plain log lines, one per finished evaluation. The run's
globopt.log always gets the same record.

At hundreds of evaluations per second a line each would flood both, so per-evaluation lines are rationed
(:data:`LINES_PER_SECOND` on average, bursts of :data:`LINE_BURST`); beyond that, one summary line every
:data:`SUMMARY_SECONDS` counts what finished by status and the rate, and every new best still gets its line.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter
from pathlib import Path

from globopt.candidate import Evaluation, Status

log = logging.getLogger("globopt")
eval_log = logging.getLogger("globopt.evaluations")

# per-evaluation log lines: at most this many per second on average, in bursts of up to LINE_BURST ...
LINES_PER_SECOND = 5.0
LINE_BURST = 100
# ... and beyond that one summary line per this many seconds
SUMMARY_SECONDS = 10.0


def configure_logging(log_file: Path | None, interactive: bool, verbose: bool = False) -> None:
    """Console: rich on a terminal, plain otherwise; the log file always gets plain lines."""
    root = logging.getLogger("globopt")
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    if interactive:
        from rich.logging import RichHandler

        console = RichHandler(show_path=False, markup=False)
        # evaluation lines would scroll past at several per second; the bar shows them instead
        console.addFilter(lambda record: record.name != "globopt.evaluations")
    else:
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(fmt)
    root.addHandler(console)
    if log_file is not None:
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(fmt)
        root.addHandler(file_handler)
    root.propagate = False


def format_evaluation(evaluation: Evaluation, duplicate_of: int | None) -> str:
    e = evaluation
    text = f"id={e.candidate_id} {e.status.value}"
    if e.enthalpy_per_atom is not None:
        text += f" H={e.enthalpy_per_atom:.4f} eV/atom"
    elif e.energy_per_atom is not None:
        text += f" E={e.energy_per_atom:.4f} eV/atom"
    if e.spacegroup:
        text += f" {e.spacegroup}"
    text += f" steps={e.n_steps} {e.seconds:.1f}s"
    if duplicate_of is not None:
        text += f" (same minimum as id={duplicate_of})"
    if e.reason and e.status is not Status.RELAXED:
        text += f" [{e.reason}]"
    return text


class Progress:
    """Counts finished evaluations against the budget and reports them."""

    def __init__(self, interactive: bool) -> None:
        self.interactive = interactive
        self._bar = None
        self._task = None
        self.done = 0
        self.total = 0
        self._tokens = float(LINE_BURST)
        self._refilled = time.monotonic()
        self._unlogged: Counter[str] = Counter()
        self._summary_since = time.monotonic()

    def start(self, total: int, done: int, best: tuple[float, int, str | None] | None) -> None:
        self.total, self.done = total, done
        if self.interactive and done < total:  # a spent budget has nothing to show progress on
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(
                TextColumn("[bold]evaluations"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[best]}"),
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task("search", total=total, completed=done, best=_best_text(best))

    def finished(
        self, evaluation: Evaluation, duplicate_of: int | None, best: tuple[float, int, str | None] | None
    ) -> None:
        self.done += 1
        new_best = best is not None and best[1] == evaluation.candidate_id
        if self._take_line():
            eval_log.info(f"[{self.done}/{self.total}] {format_evaluation(evaluation, duplicate_of)}")
        else:
            self._unlogged[evaluation.status.value] += 1
            if new_best and self._bar is None:
                log.info("new best: %s", _best_text(best))
            if time.monotonic() - self._summary_since >= SUMMARY_SECONDS:
                self._summarise()
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, best=_best_text(best))
            if new_best:
                log.info("new best: %s", _best_text(best))

    def _take_line(self) -> bool:
        """Whether this evaluation gets its own line (a token bucket: LINES_PER_SECOND, LINE_BURST)."""
        now = time.monotonic()
        self._tokens = min(LINE_BURST, self._tokens + (now - self._refilled) * LINES_PER_SECOND)
        self._refilled = now
        if self._tokens >= 1 and not self._unlogged:
            self._tokens -= 1
            return True
        return False

    def _summarise(self) -> None:
        """One line for the evaluations that got none since the last summary."""
        now = time.monotonic()
        count = sum(self._unlogged.values())
        if count:
            seconds = max(now - self._summary_since, 1e-9)
            by_status = ", ".join(f"{n} {status}" for status, n in self._unlogged.most_common())
            rate = f"{count} evaluations in {seconds:.0f} s ({count / seconds:.0f}/s)"
            eval_log.info(f"[{self.done}/{self.total}] {rate}: {by_status}")
        self._unlogged.clear()
        self._summary_since = now

    def close(self) -> None:
        self._summarise()
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def _best_text(best: tuple[float, int, str | None] | None) -> str:
    if best is None:
        return "best: -"
    return f"best: {best[0]:.4f} eV/atom {best[2] or ''} (id {best[1]})"
