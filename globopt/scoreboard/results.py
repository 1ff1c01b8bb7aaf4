"""Summaries of benchmark runs: per (structure, mode) and overall per mode, as JSON and a markdown table."""

from __future__ import annotations

from typing import Any

from globopt.scoreboard.hits import ORIGIN_CLASSES, median_or_none, origin_class


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Success rate and medians of evaluations / seconds to the first hit (over the runs that hit)."""
    entries = list(dict.fromkeys(r["entry"] for r in results))
    modes = list(dict.fromkeys(r["mode"] for r in results))
    per_entry = []
    for entry in entries:
        for mode in modes:
            runs = [r for r in results if r["entry"] == entry and r["mode"] == mode]
            if runs:
                per_entry.append({"entry": entry, "mode": mode, **_stats(runs)})
    overall = [{"mode": mode, **_stats([r for r in results if r["mode"] == mode])} for mode in modes]
    return {"per_entry": per_entry, "overall": overall, "first_hit_origins": first_hit_origins(results)}


def _stats(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Success and cost of a group of runs.

    Force calls: the median to the first hit is over the hits whose count is known; the total is over all
    runs whose count is known, and ``runs_without_force_calls`` says how many it leaves out (ase-ga records
    written before force calls were kept), so a partial total is never mistaken for a full one.
    """
    hits = [r for r in runs if r["hit"]]
    known = [r for r in runs if r.get("force_calls_total") is not None]
    return {
        "runs": len(runs),
        "hits": len(hits),
        "success_rate": len(hits) / len(runs),
        "median_evaluations_to_hit": median_or_none([r["evaluations_to_hit"] for r in hits]),
        "median_seconds_to_hit": median_or_none([r["seconds_to_hit"] for r in hits]),
        "median_force_calls_to_hit": median_or_none(
            [r["force_calls_to_hit"] for r in hits if r.get("force_calls_to_hit") is not None]
        ),
        "total_force_calls": sum(r["force_calls_total"] for r in known),
        "runs_without_force_calls": len(runs) - len(known),
        "total_evaluations": sum(r["evaluations"] for r in runs),
        "mean_wall_seconds": sum(r["wall_seconds"] for r in runs) / len(runs),
    }


def first_hit_origins(results: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per mode: how many first hits each origin class produced (class names: hits.ORIGIN_CLASSES).

    The class is derived from the stored origin here rather than read from the record, so one function
    decides it for old and new runs alike.
    """
    counts: dict[str, dict[str, int]] = {}
    for r in results:
        bucket = counts.setdefault(r["mode"], {})
        if r["hit"]:
            name = origin_class(r.get("hit_origin"))
            bucket[name] = bucket.get(name, 0) + 1
    return counts


def _cell(stats: dict[str, Any]) -> str:
    text = f"{stats['hits']}/{stats['runs']}"
    if stats["hits"]:
        calls = stats.get("median_force_calls_to_hit")
        calls_text = f", {calls:g} fc" if calls is not None else ""
        evaluations, seconds = stats["median_evaluations_to_hit"], stats["median_seconds_to_hit"]
        text += f" ({evaluations:g} ev{calls_text}, {seconds:.0f} s)"
    return text


def _calls(stats: dict[str, Any]) -> str:
    """Total force calls of a group of runs, marked when some runs did not record theirs."""
    missing = stats.get("runs_without_force_calls", 0)
    return f"{stats.get('total_force_calls', 0):,} fc" + (f" ({missing} runs unrecorded)" if missing else "")


def markdown_table(summary: dict[str, Any], references: dict[str, dict[str, Any]], budget: int) -> str:
    """Rows: structures (+ overall, + total force calls); columns: modes.

    Cells: hits/runs (median evaluations, force calls and seconds to the first hit, over the runs that hit).
    """
    modes = [row["mode"] for row in summary["overall"]]
    by_key = {(row["entry"], row["mode"]): row for row in summary["per_entry"]}
    entries = list(dict.fromkeys(row["entry"] for row in summary["per_entry"]))
    header = "| structure (atoms) | reference (eV/atom) | " + " | ".join(modes) + " |"
    lines = [header, "|" + " --- |" * (len(modes) + 2)]
    for entry in entries:
        ref = references[entry]
        n_atoms = len(ref["structure"]["sites"]) if "structure" in ref else "?"
        source = f" {ref['source']}" if ref.get("source") not in (None, "given") else ""
        cells = [_cell(by_key[(entry, m)]) if (entry, m) in by_key else "-" for m in modes]
        lines.append(
            f"| {entry} ({n_atoms}) | {ref['energy_per_atom']:.4f} {ref.get('spacegroup') or ''}{source} | "
            + " | ".join(cells)
            + " |"
        )
    overall = []
    for row in summary["overall"]:
        text = f"**{row['success_rate']:.0%}** ({row['hits']}/{row['runs']})"
        if row["hits"]:
            calls = row.get("median_force_calls_to_hit")
            calls_text = f" / {calls:g} fc" if calls is not None else ""
            text += (
                f", median {row['median_evaluations_to_hit']:g} ev{calls_text} / "
                f"{row['median_seconds_to_hit']:.0f} s"
            )
        overall.append(text)
    lines.append(f"| **overall** (budget {budget}) | | " + " | ".join(overall) + " |")
    totals = [f"{row.get('total_evaluations', 0):,} ev, {_calls(row)}" for row in summary["overall"]]
    lines.append("| spent over all runs | | " + " | ".join(totals) + " |")
    return "\n".join(lines)


def origin_table(summary: dict[str, Any]) -> str:
    """Rows: modes; columns: the origin classes that produced a first hit; cells: number of first hits."""
    counts = summary.get("first_hit_origins", {})
    seen = {name for bucket in counts.values() for name in bucket}
    columns = [c for c in ORIGIN_CLASSES if c in seen] + sorted(seen - set(ORIGIN_CLASSES))
    if not columns:
        return "No search hit, so no first-hit origins."
    lines = ["| mode | hits | " + " | ".join(columns) + " |", "|" + " --- |" * (len(columns) + 2)]
    for mode, bucket in counts.items():
        cells = [str(bucket.get(c, 0)) for c in columns]
        lines.append(f"| {mode} | {sum(bucket.values())} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
