"""`globopt generator train | sample | evaluate | corpus`: generators/ from the shell.

Registered on the main parser by ``add_generator_commands``; every user mistake (missing data set,
corrupt checkpoint, bad composition) is printed as one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from globopt.exit_codes import EXIT_OK, EXIT_USAGE

log = logging.getLogger("globopt.generators")


def add_generator_commands(commands) -> None:
    generator = commands.add_parser("generator", help="train, sample and evaluate crystal generative models")
    sub = generator.add_subparsers(dest="generator_command", required=True)

    train = sub.add_parser("train", help="train a diffusion model or WGAN-GP on a data set")
    train.add_argument("--data", type=Path, required=True, help="CDVAE csv, folder of CIFs, or ASE db")
    train.add_argument("--out", type=Path, required=True, help="checkpoint file to write (.pt)")
    train.add_argument("--kind", choices=["diffusion", "wgan"], default="diffusion")
    train.add_argument("--epochs", type=int, default=100, help="total epochs (counted across --resume)")
    train.add_argument("--batch-size", type=int, default=128)
    train.add_argument("--lr", type=float, default=None, help="default 1e-3 (diffusion), 1e-4 (wgan)")
    train.add_argument("--max-minutes", type=float, default=None, help="stop (and checkpoint) after this")
    train.add_argument("--resume", action="store_true", help="continue training the checkpoint at --out")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--limit", type=int, default=None, help="use only the first N structures")
    train.add_argument("--hidden", type=int, default=128, help="width of the message-passing network")
    train.add_argument("--layers", type=int, default=4, help="message-passing layers")
    train.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    train.add_argument(
        "--supercells", type=int, nargs="+", default=[], metavar="M",
        help="also train on an M-cell supercell (along a random axis) of every structure, e.g. 2",
    )  # fmt: skip
    train.add_argument("--init", type=Path, default=None, help="fine-tune: start from this checkpoint")
    train.set_defaults(handler=_cmd_train)

    sample = sub.add_parser("sample", help="generate structures of one composition as CIF files")
    sample.add_argument("--checkpoint", default="default", help="'default', a shipped name, or a .pt path")
    sample.add_argument("--composition", required=True, help="cell content, e.g. Na4Cl4")
    sample.add_argument("--n", type=int, default=16, help="number of structures")
    sample.add_argument("--out", type=Path, required=True, help="folder for the CIF files")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument(
        "--steps", type=int, default=None, help="reverse-diffusion steps (default: training's)"
    )
    sample.set_defaults(handler=_cmd_sample)

    evaluate = sub.add_parser("evaluate", help="CSP match rate / RMSE / validity on a test set (JSON)")
    evaluate.add_argument("--checkpoint", default="default")
    evaluate.add_argument("--data", type=Path, required=True, help="test structures (csv, CIF folder, db)")
    evaluate.add_argument("--samples", type=int, default=1, help="samples per test composition")
    evaluate.add_argument("--limit", type=int, default=None, help="evaluate the first N structures only")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument(
        "--steps", type=int, default=None, help="reverse-diffusion steps (default: training's)"
    )
    evaluate.add_argument("--out", type=Path, default=None, help="JSON file (default: print only)")
    evaluate.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    evaluate.set_defaults(handler=_cmd_evaluate)

    corpus = sub.add_parser(
        "corpus", help="collect a training data set (CDVAE csv + manifest) from screens and searches"
    )
    corpus.add_argument("runs", type=Path, nargs="+", help="run directories (HTVS screens, searches)")
    corpus.add_argument("--out", type=Path, required=True, help="corpus folder (train/val/test/corpus.csv)")
    corpus.add_argument("--name", default="corpus", help="data set name, the prefix of every material_id")
    corpus.add_argument(
        "--window", type=float, default=0.1, help="eV/atom above the composition's lowest energy kept"
    )
    corpus.add_argument("--max-atoms", type=int, default=20, help="largest cell kept")
    corpus.add_argument("--test-fraction", type=float, default=0.1, help="share of structure types held out")
    corpus.add_argument("--val-fraction", type=float, default=0.1, help="share of structure types for val")
    corpus.add_argument(
        "--hold-out", nargs="+", default=[], metavar="TYPE", help="structure types always put in test"
    )
    corpus.add_argument("--seed", type=int, default=0, help="which structure types the fractions pick")
    corpus.set_defaults(handler=_cmd_corpus)


def _user_errors():
    from generators.checkpoint import CheckpointError
    from generators.data import DataError
    from globopt.archive import ArchiveError
    from globopt.rundir import RunDirError

    return (CheckpointError, DataError, ValueError, RunDirError, ArchiveError)


def _run(action) -> int:
    try:
        return action()
    except _user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("globopt").setLevel(logging.INFO)


def _positive(name: str, value: int | float | None) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"--{name} must be positive, got {value}")


def _cmd_train(args: argparse.Namespace) -> int:
    def action() -> int:
        import torch

        from generators.train import TrainSettings, train

        for name in ("epochs", "batch_size", "lr", "max_minutes", "limit", "hidden", "layers", "threads"):
            _positive(name.replace("_", "-"), getattr(args, name))
        if args.resume and not args.out.is_file():
            raise ValueError(f"--resume: no checkpoint at {args.out} to continue")
        if args.resume and args.init is not None:
            raise ValueError("--resume continues the checkpoint at --out; --init starts a new one: use one")
        if any(m < 2 for m in args.supercells):
            raise ValueError(f"--supercells: multiples must be at least 2, got {args.supercells}")
        if not args.resume and args.out.exists():
            raise ValueError(
                f"--out {args.out} already exists; training would overwrite it. Continue that checkpoint "
                f"with --resume, start from it with --init {args.out} --out NEW.pt, or choose another --out"
            )
        torch.set_num_threads(args.threads)
        _logging()
        lr = args.lr if args.lr is not None else (1e-3 if args.kind == "diffusion" else 1e-4)
        settings = TrainSettings(
            kind=args.kind, epochs=args.epochs, batch_size=args.batch_size, lr=lr,
            max_minutes=args.max_minutes, seed=args.seed, limit=args.limit,
            hyperparameters={"hidden": args.hidden, "layers": args.layers},
            supercells=tuple(args.supercells), init=None if args.init is None else str(args.init),
        )  # fmt: skip
        checkpoint = train(args.data, args.out, settings, resume=args.resume)
        history = checkpoint.training["history"]
        print(f"{args.out}: {checkpoint.kind}, {checkpoint.training['epochs']} epochs, last {history[-1]}")
        return EXIT_OK

    return _run(action)


def _cmd_sample(args: argparse.Namespace) -> int:
    def action() -> int:
        from generators.metrics import structurally_valid
        from generators.sample import StructureGenerator

        _positive("n", args.n)
        _positive("steps", args.steps)
        names = [args.out / f"{args.composition}_{i:03d}.cif" for i in range(args.n)]
        _check_sample_folder(args.out, names)
        generator = StructureGenerator(args.checkpoint)
        structures = generator.generate_composition(
            args.composition, args.n, seed=args.seed, steps=args.steps
        )
        args.out.mkdir(parents=True, exist_ok=True)
        valid = 0
        for path, structure in zip(names, structures, strict=True):
            structure.to(filename=str(path))
            valid += structurally_valid(structure)
        print(
            f"{len(structures)} structures of {args.composition} in {args.out} ({valid} structurally valid)"
        )
        return EXIT_OK

    return _run(action)


def _check_sample_folder(out: Path, names: list[Path]) -> None:
    """--out must be a folder (or not exist yet), and sampling never overwrites CIF files already there."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the CIF files (it is created if missing)")
    taken = [p.name for p in names if p.exists()]
    if taken:
        more = f" and {len(taken) - 3} more" if len(taken) > 3 else ""
        raise ValueError(
            f"--out {out} already holds {', '.join(taken[:3])}{more}; sampling would overwrite them. Choose "
            f"another --out, or move those files away"
        )


def _cmd_evaluate(args: argparse.Namespace) -> int:
    def action() -> int:
        import torch

        from generators.data import load_structures
        from generators.metrics import evaluate_generator
        from generators.sample import StructureGenerator

        _positive("samples", args.samples)
        _positive("limit", args.limit)
        _positive("steps", args.steps)
        torch.set_num_threads(args.threads)
        generator = StructureGenerator(args.checkpoint)
        references, _ = load_structures(args.data, args.limit)
        result = evaluate_generator(
            generator, references, samples=args.samples, seed=args.seed, steps=args.steps
        )
        result = {
            "checkpoint": str(args.checkpoint), "kind": generator.kind, "data": str(args.data),
            "trained_on": generator.checkpoint.dataset.get("path"), "seed": args.seed, "steps": args.steps,
            **result,
        }  # fmt: skip
        text = json.dumps(result, indent=2)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text + "\n")
        print(text)
        return EXIT_OK

    return _run(action)


def _cmd_corpus(args: argparse.Namespace) -> int:
    def action() -> int:
        from generators.corpus import collect_corpus

        _positive("max-atoms", args.max_atoms)
        summary = collect_corpus(
            args.runs, args.out, name=args.name, window=args.window, max_atoms=args.max_atoms,
            test_fraction=args.test_fraction, val_fraction=args.val_fraction, held_out=args.hold_out,
            seed=args.seed,
        )  # fmt: skip
        rows, types = summary.rows, summary.structure_types
        print(
            f"{args.out}: {rows['all']} structures ({rows['train']} train, {rows['val']} val, {rows['test']} "
            f"test), {len(summary.elements)} elements, {sum(len(t) for t in types.values())} structure types "
            f"({len(types['test'])} held out); dropped {summary.dropped_above_window} above the window, "
            f"{summary.dropped_as_duplicates} duplicates, {summary.dropped_too_large} larger than "
            f"{args.max_atoms} atoms"
        )
        return EXIT_OK

    return _run(action)
