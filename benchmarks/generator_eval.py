"""CSP metrics of generator checkpoints on a test set, side by side with published CDVAE / DiffCSP numbers.

    .venv/bin/python benchmarks/generator_eval.py --data ../shared/data/perov_5/test.csv --limit 500 \\
        --checkpoints generators/checkpoints/diffusion_perov5.pt generators/checkpoints/wgan_perov5.pt

One sample per test composition unless --samples says otherwise; the same test subset (the first
--limit rows) for every checkpoint. Writes JSON (--out) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# match rate %, RMSE with 1 sample per composition (CDVAE: Xie et al. 2022; DiffCSP: Jiao et al. 2023)
PUBLISHED = {
    "perov_5": {"CDVAE": (45.31, 0.1138), "DiffCSP": (52.02, 0.0760)},
    "carbon_24": {"CDVAE": (17.09, 0.2969), "DiffCSP": (17.54, 0.2759)},
}


def main() -> None:
    import torch

    from generators.data import load_structures
    from generators.metrics import evaluate_generator
    from generators.sample import StructureGenerator

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--checkpoints", nargs="+", required=True)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument(
        "--steps", type=int, default=None, help="reverse-diffusion steps (default: training's)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)

    references, _ = load_structures(args.data, args.limit)
    rows = []
    for path in args.checkpoints:
        generator = StructureGenerator(path)
        result = evaluate_generator(
            generator, references, samples=args.samples, seed=args.seed, steps=args.steps
        )
        rows.append({"checkpoint": str(path), "kind": generator.kind, "steps": args.steps, **result})
        print(json.dumps(rows[-1]), flush=True)
    dataset = args.data.parent.name
    out = args.out or Path(__file__).parent / "results" / f"generator_eval_{dataset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"data": str(args.data), "limit": args.limit, "rows": rows}, indent=2) + "\n")
    print("\n| model | match rate % | RMSE | valid % | composition kept % | structures/s (CPU, 1 thread) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        rmse = "-" if row["rmse"] is None else f"{row['rmse']:.4f}"
        print(
            f"| {row['kind']} ({Path(row['checkpoint']).name}, {row['structures']} test) | "
            f"{100 * row['match_rate']:.2f} | {rmse} | {100 * row['structural_validity']:.1f} | "
            f"{100 * row['composition_kept']:.1f} | {row['structures_per_second']:.2f} |"
        )
    for name, (rate, rmse) in PUBLISHED.get(dataset, {}).items():
        print(f"| {name} (published, full train split) | {rate:.2f} | {rmse:.4f} | - | - | - |")


if __name__ == "__main__":
    main()
