"""Reading training and test structures: CDVAE csv files, folders of CIFs, ASE databases.

Every reader returns pymatgen Structures with a short label each; a file that cannot be read, or a
structure that cannot be parsed, is an error naming the file (and row) rather than a silent skip, because
a data set quietly missing rows gives misleading match rates.
"""

from __future__ import annotations

import csv
import sys
import warnings
from pathlib import Path

from pymatgen.core import Structure


class DataError(ValueError):
    """The data set cannot be read; the message names the file and what was expected."""


def load_structures(path: str | Path, limit: int | None = None) -> tuple[list[Structure], list[str]]:
    """Structures and their labels from a CDVAE csv (column ``cif``), a folder of ``*.cif`` files or an
    ASE database (``.db``/``.json``). ``limit`` keeps the first rows only (quick experiments, tests)."""
    path = Path(path)
    if not path.exists():
        raise DataError(
            f"data set {path} does not exist (expected a CDVAE csv, a folder of CIFs or an ASE db)"
        )
    if path.is_dir():
        return _from_cif_folder(path, limit)
    if path.suffix.lower() == ".csv":
        return _from_cdvae_csv(path, limit)
    if path.suffix.lower() in (".db", ".json"):
        return _from_ase_db(path, limit)
    if path.suffix.lower() == ".cif":
        return [_parse_cif(path.read_text(), str(path))], [path.stem]
    raise DataError(
        f"data set {path}: unknown format {path.suffix!r}; expected a CDVAE .csv, a folder of .cif files "
        f"or an ASE database (.db or .json)"
    )


def _parse_cif(text: str, where: str) -> Structure:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return Structure.from_str(text, fmt="cif")
    except Exception as exc:  # pymatgen raises many types for broken CIFs
        raise DataError(f"{where}: cannot parse the CIF ({exc})") from exc


def _from_cdvae_csv(path: Path, limit: int | None) -> tuple[list[Structure], list[str]]:
    csv.field_size_limit(sys.maxsize)
    structures, labels = [], []
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or "cif" not in reader.fieldnames:
            raise DataError(
                f"{path}: no 'cif' column (got {reader.fieldnames}); expected the CDVAE csv format "
                f"(material_id, cif, ...)"
            )
        for row_number, row in enumerate(reader, start=2):
            if limit is not None and len(structures) >= limit:
                break
            structures.append(_parse_cif(row["cif"], f"{path} row {row_number}"))
            labels.append(str(row.get("material_id") or row_number))
    if not structures:
        raise DataError(f"{path}: no structures in the file")
    return structures, labels


def _from_cif_folder(path: Path, limit: int | None) -> tuple[list[Structure], list[str]]:
    files = sorted(path.glob("*.cif"))
    if not files:
        raise DataError(f"{path}: folder has no *.cif files")
    files = files[:limit] if limit is not None else files
    return [_parse_cif(f.read_text(), str(f)) for f in files], [f.stem for f in files]


def _from_ase_db(path: Path, limit: int | None) -> tuple[list[Structure], list[str]]:
    from ase.db import connect
    from pymatgen.io.ase import AseAtomsAdaptor

    try:
        db = connect(str(path))
        rows = list(db.select(limit=limit) if limit is not None else db.select())
    except Exception as exc:
        raise DataError(f"{path}: not a readable ASE database ({exc})") from exc
    if not rows:
        raise DataError(f"{path}: the ASE database has no rows")
    structures = []
    for row in rows:
        atoms = row.toatoms()
        if not atoms.pbc.all() or atoms.cell.rank < 3:
            raise DataError(f"{path} row id={row.id}: not a periodic crystal (needs a full 3D cell)")
        structures.append(AseAtomsAdaptor.get_structure(atoms))
    return structures, [str(row.id) for row in rows]
