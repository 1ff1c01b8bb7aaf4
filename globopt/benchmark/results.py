"""Summaries of benchmark runs: per (structure, mode) and overall per mode, as JSON and a markdown table."""

from __future__ import annotations

from typing import Any

from globopt.benchmark.hits import median_or_none


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
    return {"per_entry": per_entry, "overall": overall}


def _stats(runs: list[dict[str, Any]]) -> dict[str, Any]:
    hits = [r for r in runs if r["hit"]]
    return {
        "runs": len(runs),
        "hits": len(hits),
        "success_rate": len(hits) / len(runs),
        "median_evaluations_to_hit": median_or_none([r["evaluations_to_hit"] for r in hits]),
        "median_seconds_to_hit": median_or_none([r["seconds_to_hit"] for r in hits]),
        "mean_wall_seconds": sum(r["wall_seconds"] for r in runs) / len(runs),
    }


def _cell(stats: dict[str, Any]) -> str:
    text = f"{stats['hits']}/{stats['runs']}"
    if stats["hits"]:
        text += f" ({stats['median_evaluations_to_hit']:g} ev, {stats['median_seconds_to_hit']:.0f} s)"
    return text


def markdown_table(summary: dict[str, Any], references: dict[str, dict[str, Any]], budget: int) -> str:
    """Rows: structures (+ overall); columns: modes; cells: hits/runs (median evaluations, seconds to hit)."""
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
            text += f", median {row['median_evaluations_to_hit']:g} ev / {row['median_seconds_to_hit']:.0f} s"
        overall.append(text)
    lines.append(f"| **overall** (budget {budget}) | | " + " | ".join(overall) + " |")
    return "\n".join(lines)
