"""What ``duplicates.max_comparisons`` changes: replay archived searches' proposals through the index.

Every proposal of each archive, in id order (the order the search made them), is checked against the
structures proposed before it that were not screened out, once with every candidate the lattice conditions
leave (exhaustive) and once with the fingerprint-nearest ``--max-comparisons`` of them. Reported per
archive: proposals, queries that had more candidates than the bound, the largest candidate set, and the
proposals whose verdict (duplicate or not) differs. Only the proposal-against-proposals check is replayed
(the check against relaxed minima depends on when results arrived).

    .venv/bin/python benchmarks/duplicate_bound.py benchmarks/results/hard/runs/*-ga-s0/archive.sqlite

Writes benchmarks/results/duplicate_bound.json (one record per archive) and prints each record.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from globopt.archive import SCREENED_OUT, Archive  # noqa: E402
from globopt.duplicates import DuplicateIndex, lattice_minima, reduced_for_matching  # noqa: E402


def replay(path: Path, bound: int, ltol: float, stol: float, angle_tol: float, symprec: float) -> dict:
    exhaustive = DuplicateIndex(ltol, stol, angle_tol, 0.01, symprec)
    bounded = DuplicateIndex(ltol, stol, angle_tol, 0.01, symprec, max_comparisons=bound)
    proposals = over = largest = differ = 0
    archive = Archive(path, read_only=True)
    try:
        for record in archive.records():
            structure = record.initial
            key = exhaustive.key(structure)
            reduced = reduced_for_matching(structure)
            minima = lattice_minima(reduced)
            proposals += 1
            candidates = len(exhaustive.comparisons(structure, key=key, reduced=reduced, minima=minima))
            largest = max(largest, candidates)
            if candidates > bound:
                over += 1
                full = exhaustive.find(structure, key=key, reduced=reduced, minima=minima)
                near = bounded.find(structure, key=key, reduced=reduced, minima=minima)
                differ += (full is None) != (near is None)
            if record.status not in SCREENED_OUT:
                exhaustive.add(record.id, structure, key=key, reduced=reduced)
                bounded.add(record.id, structure, key=key, reduced=reduced)
    finally:
        archive.close()
    return {
        "archive": str(path),
        "max_comparisons": bound,
        "proposals": proposals,
        "queries_over_bound": over,
        "largest_candidate_set": largest,
        "verdicts_that_differ": differ,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("archives", type=Path, nargs="+")
    parser.add_argument("--max-comparisons", type=int, default=32)
    parser.add_argument("--ltol", type=float, default=0.2)
    parser.add_argument("--stol", type=float, default=0.3)
    parser.add_argument("--angle-tol", type=float, default=5.0)
    parser.add_argument("--symprec", type=float, default=0.1)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "duplicate_bound.json")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for path in args.archives:
        record = replay(path, args.max_comparisons, args.ltol, args.stol, args.angle_tol, args.symprec)
        print(json.dumps(record))
        with open(args.out, "a") as handle:
            handle.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
