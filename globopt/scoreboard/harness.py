"""`globopt benchmark`: suite -> references -> searches -> JSON + markdown in the output folder.

Output folder layout::

    references.json   relaxed reference of every entry (reused while the entry and potential are unchanged)
    runs/<entry>-<mode>-s<seed>/   one ordinary run directory per search (ase-ga: its own database)
    benchmark.json    command, hardware, settings, references, every run, the summary
    benchmark.md      the markdown table
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from globopt.config import ConfigError
from globopt.scoreboard.reference import Reference, reference_for
from globopt.scoreboard.results import markdown_table, origin_table, summarise
from globopt.scoreboard.runner import SearchJob, job_summary_line, run_jobs
from globopt.scoreboard.suite import SEARCH_MODES, Entry, Suite, load_suite

log = logging.getLogger("globopt.scoreboard")


@dataclass
class BenchmarkOptions:
    modes: list[str] | None = None
    seeds: list[int] | None = None
    budget: int | None = None
    structures: list[str] | None = None
    jobs: int = 1
    population: int | None = None  # overrides ga.population_size/initial_random and pso.swarm_size
    settings: dict[str, Any] | None = None  # dotted run-config keys for every search, e.g. relax.rattle
    full_budget: bool = False  # False: a search ends at its first energy hit (success figures unchanged)
    command: str | None = None  # the command line, recorded so the table can be reproduced


def run_benchmark(
    suite_path: Path, out: Path, options: BenchmarkOptions, echo=print
) -> tuple[Path, Path, dict[str, Any]]:
    """Run the suite; returns (benchmark.json, benchmark.md, summary)."""
    suite = load_suite(suite_path)
    spec = suite.spec
    modes = options.modes or spec.modes
    bad = [m for m in modes if m not in SEARCH_MODES]
    if bad:
        raise ConfigError(f"--modes: unknown {', '.join(bad)}; allowed: {', '.join(SEARCH_MODES)}")
    if "ase-ga" in modes:
        from globopt.scoreboard.ase_ga_baseline import require_ase_ga

        require_ase_ga()
    seeds = options.seeds if options.seeds is not None else spec.seeds
    budget = options.budget or spec.budget
    if budget < 1 or options.jobs < 1:
        raise ConfigError("--budget and --jobs must be at least 1")
    entries = suite.select(options.structures)
    search = dict(spec.search)
    if options.population is not None:
        if options.population < 2:
            raise ConfigError("--population must be at least 2")
        n = options.population
        search["ga"] = {**search.get("ga", {}), "population_size": n, "initial_random": n}
        search["pso"] = {**search.get("pso", {}), "swarm_size": n}
    for dotted, value in (options.settings or {}).items():
        _set_dotted(search, dotted, value)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    references = _references(entries, suite, out, echo)
    threads = 1  # one torch thread per search: parallelism comes from --jobs, never oversubscription
    jobs = [
        SearchJob(
            entry=entry.name,
            mode=mode,
            seed=seed,
            budget=budget,
            composition=entry.composition,
            potential=spec.potential,
            search=search,
            run_dir=str(out / "runs" / f"{entry.name}-{mode}-s{seed}"),
            reference=references[entry.name].best.structure.as_dict(),
            reference_energy=references[entry.name].best.energy_per_atom,
            hit_tolerance=spec.hit_tolerance,
            torch_threads=threads,
            stop_at_energy=None
            if options.full_budget
            else references[entry.name].best.energy_per_atom + spec.hit_tolerance,
        )
        for entry in entries
        for mode in modes
        for seed in seeds
    ]
    echo(f"{len(jobs)} searches: {len(entries)} structures x {modes} x seeds {seeds}, budget {budget}")
    results = []
    for result in run_jobs(jobs, options.jobs):
        results.append(result)
        echo(job_summary_line(result))
    order = {(j.entry, j.mode, j.seed): i for i, j in enumerate(jobs)}
    results.sort(key=lambda r: order[(r["entry"], r["mode"], r["seed"])])
    summary = summarise(results)
    reference_json = {name: ref.to_json() for name, ref in references.items()}
    table = markdown_table(summary, reference_json, budget)
    document = {
        "suite": spec.name,
        "suite_file": str(suite_path),
        "command": options.command,
        "hardware": hardware(),
        "potential": spec.potential,
        "budget": budget,
        "seeds": seeds,
        "modes": modes,
        "hit_tolerance_ev_per_atom": spec.hit_tolerance,
        "search_settings": search,
        "stopped_at_first_hit": not options.full_budget,
        "references": reference_json,
        "summary": summary,
        "runs": results,
        "wall_seconds": time.perf_counter() - started,
    }
    json_path, md_path = out / "benchmark.json", out / "benchmark.md"
    json_path.write_text(json.dumps(document, indent=2))
    md_path.write_text(
        f"# Benchmark {spec.name}\n\n{hardware()}; potential {spec.potential}; budget {budget} relaxations; "
        f"seeds {seeds}\n\nCells: hits/runs (median evaluations (ev), force calls (fc: potential calls "
        f"summed over the relaxations up to and including the first hit) and seconds to the first hit, over "
        f"the runs that hit). A hit: StructureMatcher match with the reference or within "
        f"{spec.hit_tolerance * 1000:g} meV/atom of it.\n\n{table}\n\n"
        f"## Where the first hits came from\n\nFirst hits per mode by the operator or source that proposed "
        f"the structure (init: first generation / start population / first swarm; immigrant: random "
        f"structures added later; heredity: cut-and-splice crossover, ase-ga's pairing included; pso-regen: "
        f"re-drawn particles; pso-move: particle moves; random: random search).\n\n{origin_table(summary)}\n"
    )
    return json_path, md_path, summary


def _set_dotted(search: dict[str, Any], dotted: str, value: Any) -> None:
    """``relax.rattle`` = 0.05 -> search["relax"]["rattle"] = 0.05; the run config validates the result."""
    *sections, key = dotted.split(".")
    if not key or not all(sections):
        raise ConfigError(f"--set {dotted}: expected a dotted run-config key such as relax.rattle")
    for section in sections:
        existing = search.get(section)
        search[section] = existing = dict(existing) if isinstance(existing, dict) else {}
        search = existing
    search[key] = value


def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical cores, Python {platform.python_version()}"


def _references(entries: list[Entry], suite: Suite, out: Path, echo) -> dict[str, Reference]:
    """Relax each entry's known structures once; cached in references.json, keyed by what they depend on."""
    spec = suite.spec
    cache_path = out / "references.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    references = {}
    for entry in entries:
        key = _reference_key(entry, spec.potential, spec.reference_fmax, spec.reference_max_steps)
        cached = cache.get(entry.name)
        if cached and cached.get("key") == key:
            references[entry.name] = Reference.from_json(cached)
        else:
            reference = reference_for(entry, spec.potential, spec.reference_fmax, spec.reference_max_steps)
            references[entry.name] = reference
            cache[entry.name] = {**reference.to_json(), "key": key}
            tmp = cache_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(cache, indent=1))
            os.replace(tmp, cache_path)
        best = references[entry.name].best
        echo(
            f"reference {entry.name}: {best.energy_per_atom:.4f} eV/atom {best.spacegroup or ''}"
            + (
                f" (polymorph {best.label} is lower than the given structure)"
                if best.label != "given"
                else ""
            )
        )
    return references


def _reference_key(entry: Entry, potential: dict[str, Any], fmax: float, max_steps: int) -> str:
    payload = json.dumps(
        [entry.structure.as_dict(), {k: s.as_dict() for k, s in entry.polymorphs.items()},
         potential, fmax, max_steps],
        sort_keys=True, default=str,
    )  # fmt: skip
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
