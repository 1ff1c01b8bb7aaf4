"""What the user sees while a run works.

On a terminal: a live progress bar (evaluations, rate, best so far) with a line printed only when the
best improves. Elsewhere (batch jobs, pipes): plain log lines, one per finished evaluation. The run's
globopt.log always gets the one-line-per-evaluation record.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from globopt.candidate import Evaluation, Status

log = logging.getLogger("globopt")
eval_log = logging.getLogger("globopt.evaluations")


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
        line = f"[{self.done}/{self.total}] {format_evaluation(evaluation, duplicate_of)}"
        eval_log.info(line)
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, best=_best_text(best))
            if best is not None and best[1] == evaluation.candidate_id:
                log.info("new best: %s", _best_text(best))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def _best_text(best: tuple[float, int, str | None] | None) -> str:
    if best is None:
        return "best: -"
    return f"best: {best[0]:.4f} eV/atom {best[2] or ''} (id {best[1]})"
