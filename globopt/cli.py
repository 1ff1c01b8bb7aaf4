"""Command line: globopt run | resume | validate | status | report | benchmark.

Exit codes: 0 success, 2 the user must fix something (config, run directory, model), 1 an internal
error, 130 interrupted (the run can be resumed).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from globopt.exit_codes import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE

log = logging.getLogger("globopt")


def main(argv: list[str] | None = None) -> int:
    from globopt import mpi

    if mpi.use_mpi():  # under mpiexec: rank 0 runs the command, the other ranks relax for it
        return mpi.run_under_mpi(lambda: _main(argv))
    return _main(argv)


def _main(argv: list[str] | None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except _UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # whoever read our output stopped reading (`globopt status RUN | head -1`): that is their choice,
        # not an error; send the rest nowhere so the interpreter's final flush does not complain either
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


class _UserError(Exception):
    """Something the user must fix; printed without a traceback, exit code 2."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="globopt", description="Crystal-structure discovery engine.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser(
        "run", help="run (or with --resume continue) a search described by a YAML config"
    )
    run.add_argument("config", type=Path)
    run.add_argument("--out", type=Path, help="run directory (default: runs/<name>)")
    run.add_argument("--resume", action="store_true", help="continue the run already in the run directory")
    run.add_argument("--workers", type=int, help="override the config's number of local worker processes")
    run.add_argument("--verbose", "-v", action="store_true")
    run.set_defaults(handler=_cmd_run)

    resume = commands.add_parser("resume", help="continue a killed or finished run from its directory")
    resume.add_argument("run_dir", type=Path)
    resume.add_argument("--workers", type=int)
    resume.add_argument("--verbose", "-v", action="store_true")
    resume.set_defaults(handler=_cmd_resume)

    validate = commands.add_parser("validate", help="check a config without running it")
    validate.add_argument("config", type=Path)
    validate.set_defaults(handler=_cmd_validate)

    status = commands.add_parser("status", help="progress and best structures of a run directory")
    status.add_argument("run_dir", type=Path)
    status.set_defaults(handler=_cmd_status)

    report = commands.add_parser("report", help="convergence plot and summary of a run directory")
    report.add_argument("run_dir", type=Path)
    report.add_argument("--out", type=Path, help="folder for the report (default: RUN_DIR/report)")
    report.set_defaults(handler=_cmd_report)

    from globopt.cli_generator import add_generator_commands

    add_generator_commands(commands)

    bench = commands.add_parser(
        "benchmark", help="CSP success rate of search modes on a suite of known structures"
    )
    bench.add_argument("suite", type=Path, help="suite YAML, e.g. benchmarks/suites/standard.yaml")
    bench.add_argument("--modes", nargs="+", help="random, ga, pso, ase-ga (default: the suite's)")
    bench.add_argument("--seeds", nargs="+", type=int, help="default: the suite's")
    bench.add_argument("--budget", type=int, help="relaxations per search (default: the suite's)")
    bench.add_argument("--structures", nargs="+", help="only these entries of the suite")
    bench.add_argument(
        "--population", type=int, help="GA population (and initial random set) and PSO swarm size"
    )
    bench.add_argument(
        "--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
        help="run-config key for every search, e.g. --set relax.rattle=0.05 (value read as YAML; repeatable)",
    )  # fmt: skip
    bench.add_argument(
        "--full-budget", action="store_true",
        help="spend the whole budget (default: a search ends at its first energy hit)",
    )  # fmt: skip
    bench.add_argument("--jobs", type=int, default=1, help="searches run side by side (processes)")
    bench.add_argument("--out", type=Path, help="output folder (default: benchmarks/results/<suite name>)")
    bench.set_defaults(handler=_cmd_benchmark)
    return parser


def _load(path: Path):
    from globopt.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        raise _UserError(str(exc)) from None


def _cmd_validate(args: argparse.Namespace) -> int:
    config = _load(args.config)
    print(
        f"{args.config}: valid. mode={config.mode} composition={config.formula} "
        f"budget: {config.budget_text}; potential={config.potential.label}"
    )
    return EXIT_OK


def _cmd_run(args: argparse.Namespace) -> int:
    from globopt.rundir import RunDirectory, RunDirError

    config = _load(args.config)
    if args.workers is not None:
        config = config.model_copy(update={"workers": _positive_workers(args.workers)})
    out = args.out or Path("runs") / config.name
    try:
        if args.resume:
            run, config = RunDirectory.open_existing(out, config)
        else:
            run = RunDirectory.create(out, config)
    except RunDirError as exc:
        raise _UserError(str(exc)) from None
    return _execute(run, config, args.verbose)


def _cmd_resume(args: argparse.Namespace) -> int:
    from globopt.rundir import RunDirectory, RunDirError

    try:
        run, config = RunDirectory.open_existing(args.run_dir)
    except RunDirError as exc:
        raise _UserError(str(exc)) from None
    if args.workers is not None:
        config = config.model_copy(update={"workers": _positive_workers(args.workers)})
    return _execute(run, config, args.verbose)


def _positive_workers(value: int) -> int:
    if value < 1:
        raise _UserError(f"--workers must be at least 1, got {value}")
    return value


def _execute(run, config, verbose: bool) -> int:
    from globopt.archive import ArchiveError
    from globopt.pipeline import build_engine
    from globopt.progress import Progress, configure_logging
    from globopt.search.base import SearchExhausted
    from surrogates.m3gnet import ModelLoadError, ModelNotFoundError
    from surrogates.potentials import PotentialBuildError, PotentialUnavailableError

    interactive = sys.stderr.isatty()
    configure_logging(run.log_path, interactive, verbose)
    for note in run.notes:
        log.warning("%s", note)
    log.info(
        "run %s: %s search for %s, budget %s, %d worker(s), potential %s, output %s",
        config.name, config.mode, config.formula, config.budget_text, config.workers,
        config.potential.label, run.path,
    )  # fmt: skip
    engine = None
    failed = True
    try:
        engine = build_engine(config, run, Progress(interactive))
        summary = engine.run()
        failed = False
    except (
        ModelNotFoundError,
        ModelLoadError,
        PotentialUnavailableError,
        PotentialBuildError,
        ArchiveError,
        SearchExhausted,
    ) as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    except OSError as exc:  # results.csv / best/ / log on a full disk or a read-only directory
        log.error(
            "cannot write to the run directory %s (%s): the disk may be full, a file-size limit reached, or "
            "the directory read-only. Evaluations committed to archive.sqlite are intact; free space and "
            "continue with `globopt resume %s`.",
            run.path, exc, run.path,
        )  # fmt: skip
        return EXIT_USAGE
    except KeyboardInterrupt:  # Ctrl-C before the loop took over (e.g. while the model loads)
        failed = False
        log.warning("interrupted before the first evaluation; `globopt resume %s` continues", run.path)
        return EXIT_INTERRUPTED
    finally:
        if failed and run.discard_if_nothing_committed():
            log.error(
                "nothing was committed, so %s was cleared (this log stays): fix the problem above and run "
                "the same command again",
                run.path,
            )
        run.release_lock()
    _log_summary(summary, run)
    failures = [o.failure for o in engine.observers if o.failure]
    if failures:
        return EXIT_USAGE
    return EXIT_INTERRUPTED if summary.interrupted else EXIT_OK


def _log_summary(summary, run) -> None:
    """The end of a session: the best structure (once), this session's time, the evaluations committed."""
    if summary.best_id is not None and run.best_path.is_dir():  # a chemical system writes stable/ instead
        log.info(
            "best: %.4f eV/atom %s (candidate %d); structures in %s",
            summary.best_enthalpy_per_atom, summary.best_spacegroup or "", summary.best_id, run.best_path,
        )  # fmt: skip
    if summary.session_evaluations == 0 and not summary.interrupted and summary.evaluations >= summary.budget:
        log.info(
            "nothing to do: %d evaluations were committed before and the budget is %d; to go on, resume with "
            "a larger budget.evaluations (`globopt run CONFIG --resume --out %s`)",
            summary.evaluations, summary.budget, run.path,
        )  # fmt: skip
        return
    if summary.relax_seconds > 0:
        log.info(
            "this session: %.1f s wall, %.1f s relaxing, %.1f s inside the potential (%.0f%% of wall time)",
            summary.wall_seconds, summary.relax_seconds, summary.potential_seconds,
            100 * summary.potential_seconds / max(summary.wall_seconds, 1e-9),
        )  # fmt: skip
    over = summary.evaluations > summary.budget
    log.info(
        "%s evaluations committed%s",
        f"{summary.evaluations} (budget {summary.budget})"
        if over
        else f"{summary.evaluations}/{summary.budget}",
        " (interrupted: resume with `globopt resume " + str(run.path) + "`)" if summary.interrupted else "",
    )


def _cmd_status(args: argparse.Namespace) -> int:
    from globopt.archive import ArchiveError
    from globopt.report import status_text
    from globopt.rundir import RunDirError

    try:
        print(status_text(args.run_dir))
    except (RunDirError, ArchiveError) as exc:
        raise _UserError(str(exc)) from None
    return EXIT_OK


def _cmd_report(args: argparse.Namespace) -> int:
    from globopt.archive import ArchiveError
    from globopt.report import write_report
    from globopt.rundir import RunDirError

    try:
        files = write_report(args.run_dir, args.out)
    except (RunDirError, ArchiveError) as exc:
        raise _UserError(str(exc)) from None
    for path in files:
        print(path)
    return EXIT_OK


def _parse_settings(pairs: list[str]) -> dict[str, object]:
    import yaml

    settings: dict[str, object] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise _UserError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set relax.rattle=0.05")
        try:
            settings[key.strip()] = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise _UserError(f"--set {pair!r}: the value is not valid YAML ({exc})") from None
    return settings


def _cmd_benchmark(args: argparse.Namespace) -> int:
    from globopt.config import ConfigError
    from globopt.rundir import RunDirError
    from globopt.scoreboard.harness import BenchmarkOptions, run_benchmark
    from globopt.scoreboard.reference import ReferenceError
    from surrogates.m3gnet import ModelLoadError, ModelNotFoundError
    from surrogates.potentials import PotentialUnavailableError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    options = BenchmarkOptions(
        modes=args.modes, seeds=args.seeds, budget=args.budget, structures=args.structures, jobs=args.jobs,
        population=args.population, settings=_parse_settings(args.settings), full_budget=args.full_budget,
        command=" ".join(["globopt", *(sys.argv[1:] if sys.argv[1:2] == ["benchmark"] else ["benchmark"])]),
    )  # fmt: skip
    out = args.out or Path("benchmarks") / "results" / args.suite.stem
    try:
        json_path, md_path, _ = run_benchmark(args.suite, out, options, echo=lambda s: print(s, flush=True))
    except (
        ConfigError,
        RunDirError,
        ReferenceError,
        PotentialUnavailableError,
        ModelNotFoundError,
        ModelLoadError,
    ) as exc:
        raise _UserError(str(exc)) from None
    print(md_path.read_text())
    print(f"written: {json_path} {md_path}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
