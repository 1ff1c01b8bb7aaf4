"""Loading matgl M3GNet potentials so that they give the physics they were trained for.

matgl 4.x loads the published DGL-era checkpoints (matgl <= 2.x, e.g. ``M3GNet-MP-2021.2.8-PES``) without
complaint, but its PyG ``M3GNet`` sums the node-update messages into the other end of each bond, so those
weights then describe a different (unphysical) energy surface. This module finds a model folder, decides which
convention its weights were trained with, and builds the matching network; everything the engine needs from
matgl goes through :func:`load_potential` / :func:`make_calculator`.

torch and matgl are imported only inside functions: importing them costs seconds, and config validation
(:func:`model_elements`) must stay cheap.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import zipfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

if TYPE_CHECKING:
    from ase.calculators.calculator import Calculator
    from matgl.apps.pes import Potential

__all__ = [
    "DEFAULT_MODEL",
    "MODELS_ENV",
    "ModelInfo",
    "ModelLoadError",
    "ModelNotFoundError",
    "check_model",
    "check_model_folder",
    "find_model_dir",
    "load_potential",
    "make_calculator",
    "model_elements",
]

DEFAULT_MODEL = "M3GNet-MP-2021.2.8-PES"
MODELS_ENV = "GLOBOPT_MODELS"

CODE_PATH_DGL_ERA = "DGL-era checkpoint (matgl<=2.x) with destination-aggregation fix"
CODE_PATH_NATIVE = "native matgl 4.x model"

_MODEL_FILES = ("model.json", "model.pt", "state.pt")
# matgl 4.x keeps downloads here (matgl.config.MATGL_CACHE); spelled out so that resolving a name needs no
# matgl import. Older matgl put GitHub mirrors in <cache>/<name>/, Hugging Face puts
# <cache>/models--<owner>--<name>/snapshots/<revision>/.
_MATGL_CACHE = Path.home() / ".cache" / "matgl"
_HF_DEFAULT_OWNER = "materialyze"

logger = logging.getLogger("globopt.potential")


class ModelNotFoundError(LookupError):
    """The model is neither a local folder nor downloadable by name (no internet, or an unknown name)."""


class ModelLoadError(RuntimeError):
    """A model folder exists but cannot become a potential (missing, truncated or mismatched files)."""


@dataclass(frozen=True)
class ModelInfo:
    """What was loaded and by which code path, so that logs and run records say which physics was used."""

    name: str
    path: Path | None
    code_path: str
    elements: frozenset[str] | None


# ----------------------------------------------------------------------------------------------------
# Locating models (no torch/matgl)
# ----------------------------------------------------------------------------------------------------


def _search_dirs() -> list[Path]:
    """Folders searched for model names, in priority order: user folders first, then matgl's own cache."""
    dirs = [Path(p).expanduser() for p in os.environ.get(MODELS_ENV, "").split(os.pathsep) if p]
    dirs.append(_MATGL_CACHE)
    return dirs


def _hf_snapshot(cache: Path, name: str) -> Path | None:
    """A complete Hugging Face snapshot of ``name`` in ``cache``, preferring the revision ``main`` points at.

    This lets a model that matgl once downloaded by name be reused offline.
    """
    owner, _, repo = name.rpartition("/")
    repo_dir = cache / f"models--{owner or _HF_DEFAULT_OWNER}--{repo}".replace("/", "--")
    snapshots = repo_dir / "snapshots"
    if not snapshots.is_dir():
        return None
    candidates = sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        preferred = snapshots / ref.read_text().strip()
        candidates = [preferred, *(c for c in candidates if c != preferred)]
    for snap in candidates:
        if all((snap / f).is_file() for f in _MODEL_FILES):
            return snap
    return None


def find_model_dir(model: str) -> Path | None:
    """Resolve ``model`` to a local folder, or None when only a download by name could provide it.

    An existing folder path wins, so a user can always point at an exact checkpoint; otherwise
    ``<dir>/<model>`` is tried in each ``GLOBOPT_MODELS`` folder and then in matgl's cache (both its old
    GitHub-mirror layout and the Hugging Face snapshot layout).
    """
    if not model.strip():
        return None
    direct = Path(model).expanduser()
    if direct.is_dir():
        return direct.resolve()
    for folder in _search_dirs():
        candidate = folder / model
        if candidate.is_dir():
            return candidate.resolve()
    snapshot = _hf_snapshot(_MATGL_CACHE, model)
    return snapshot.resolve() if snapshot is not None else None


def _read_model_json(folder: Path) -> dict[str, Any]:
    """Parse ``model.json``, turning every failure into a ModelLoadError that names the file."""
    path = folder / "model.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read model description {path}: {exc}") from exc
    if not isinstance(meta, dict) or "@class" not in meta:
        raise ModelLoadError(f"{path} is not a matgl model description (no '@class' entry)")
    return meta


def _inner_model(meta: dict[str, Any]) -> dict[str, Any]:
    """The serialised graph network inside a Potential description (or the description itself)."""
    inner = meta.get("kwargs", {}).get("model")
    return inner if isinstance(inner, dict) else {"init_args": meta.get("kwargs", {}), **meta}


def _elements_from_meta(meta: dict[str, Any]) -> frozenset[str] | None:
    elements = _inner_model(meta).get("init_args", {}).get("element_types")
    return frozenset(elements) if elements else None


def model_elements(model: str) -> frozenset[str] | None:
    """Element symbols the local model covers; None when it is not local or does not list them.

    Cheap on purpose (reads only ``model.json``) so config validation can reject uncovered elements before
    any worker pays for importing torch.
    """
    folder = find_model_dir(model)
    if folder is None:
        return None
    return _elements_from_meta(_read_model_json(folder))


def check_model_folder(folder: Path) -> None:
    """Raise ModelLoadError naming the file when a model folder is incomplete, truncated or not a model.

    Cheap (no torch): the three files must exist and be non-empty, model.json must be a matgl
    description, and model.pt / state.pt must be intact torch archives (zip files whose CRCs check out).
    A copy interrupted half-way is the usual cause, and it would otherwise surface as a 50-line traceback
    inside the first relaxation.
    """
    fix = "copy the complete checkpoint folder again (model.json, model.pt, state.pt)"
    missing = [f for f in _MODEL_FILES if not (folder / f).is_file()]
    if missing:
        raise ModelLoadError(f"model folder {folder} lacks {', '.join(missing)}; {fix}")
    for name in _MODEL_FILES:
        path = folder / name
        if path.stat().st_size == 0:
            raise ModelLoadError(f"{path} is empty; {fix}")
    try:
        _read_model_json(folder)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{exc}; {fix}") from None
    for name in ("model.pt", "state.pt"):
        path = folder / name
        with open(path, "rb") as handle:
            legacy_pickle = handle.read(2) == b"\x80\x02"  # torch < 1.6 format: cannot be checked cheaply
        if legacy_pickle:
            continue
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError) as exc:
            raise ModelLoadError(f"{path} is truncated or not a torch checkpoint ({exc}); {fix}") from None
        if bad is not None:
            raise ModelLoadError(f"{path} is damaged (entry {bad} fails its checksum); {fix}")


def check_model(model: str) -> frozenset[str] | None:
    """Resolve ``model`` as :func:`load_potential` will and check its files; the elements it covers.

    Raises ModelNotFoundError when no local folder holds it and it cannot be downloaded, ModelLoadError
    when its folder is damaged. Returns None for a model only matgl's download can provide (its elements
    are known once it is loaded).
    """
    folder = find_model_dir(model)
    if folder is None:
        reason = _hub_unreachable_reason(model)
        if reason is not None:
            raise _not_found(model, reason)
        return None
    check_model_folder(folder)
    return _elements_from_meta(_read_model_json(folder))


def _is_dgl_era(meta: dict[str, Any]) -> bool:
    """Whether ``model.json`` describes an M3GNet whose weights expect destination-side node aggregation.

    The files carry no matgl version, so the rule uses what each era's code necessarily wrote:

    * a ``DGLEraM3GNet`` (a potential re-saved after loading through this module) is DGL-era by definition;
    * only an ``M3GNet`` graph network is affected (matgl 3.0.0, #758, moved its node update to the source
      atom and retrained the published weights; other architectures load unchanged here);
    * an inner ``@module`` ending in ``_dgl`` was written by the DGL backend of matgl 2.x -> DGL-era;
      one ending in ``_pyg`` by the PyG port -> native;
    * otherwise the ``dropout`` constructor argument decides: every M3GNet since late matgl 2.x (and every
      PyG M3GNet) records it, because matgl saves all constructor arguments; the original checkpoints
      (MP-2021.2.8, MatPES-PBE-v2025.1) predate it -> DGL-era when it is absent.
    """
    inner = _inner_model(meta)
    if inner.get("@class") == "DGLEraM3GNet":  # re-saved from this module
        return True
    if inner.get("@class") != "M3GNet":
        return False
    module = str(inner.get("@module", ""))
    if module.endswith("_dgl"):
        return True
    if module.endswith("_pyg"):
        return False
    return "dropout" not in inner.get("init_args", {})


# ----------------------------------------------------------------------------------------------------
# The fixed network (built lazily: defining it needs torch and matgl)
# ----------------------------------------------------------------------------------------------------


@cache
def _dgl_era_classes() -> dict[str, type]:
    import torch
    from matgl.layers import M3GNetGraphConv
    from matgl.models import M3GNet
    from matgl.utils.maths import scatter_add

    class DestinationSumGraphConv(M3GNetGraphConv):
        """M3GNet graph convolution whose node update sums each bond's message into the bond's destination.

        The message itself (gated MLP of [v_src, v_dst, e, (u)] times a linear map of the radial basis) is
        matgl 4.x's; only the receiving atom differs, as in DGL's ``update_all(copy_e, sum)``.
        """

        def node_update_(  # type: ignore[override]
            self,
            edge_index: torch.Tensor,
            edge_feat: torch.Tensor,
            node_feat: torch.Tensor,
            rbf: torch.Tensor,
            u_per_edge: torch.Tensor | None,
            num_nodes: int,
        ) -> torch.Tensor:
            src, dst = edge_index[0], edge_index[1]
            parts = [node_feat[src], node_feat[dst], edge_feat]
            if self.include_state:
                assert u_per_edge is not None
                parts.append(u_per_edge)
            messages = self.node_update_func(torch.hstack(parts)) * self.node_weight_func(rbf)
            return scatter_add(messages, dst, dim_size=num_nodes, dim=0)

    class DGLEraM3GNet(M3GNet):
        """matgl 4.x M3GNet that reproduces checkpoints trained with the DGL implementation (matgl <= 2.x).

        Two things changed between the versions, with identical state-dict keys and shapes:

        1. Node update: the old code summed each directed bond's message into its destination atom, matgl
           >= 3 sums into the source atom. Messages depend on the direction-specific bond feature, so no
           re-mapping of weights makes the new code equivalent; the aggregation must follow the weights.
           This is the one thing overridden here (every block's convolution sums into the destination).
        2. Three-body terms: the old code used positions in the list of bonds pruned to the three-body
           cutoff as if they were full-graph bond ids; matgl >= 4.0.4 maps them back to the parent bonds.
           Kept as in matgl 4.x on purpose: the old indexing reproduces the original numbers only to ~1e-4 eV
           better and makes the energy jump when a bond crosses the three-body cutoff, which hurts
           optimisation. With matgl 4.x's indexing the surface is smooth and within ~0.4 meV/atom and
           ~0.025 eV/Å of the original.
        """

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            # matgl records constructor arguments by the subclass signature; keep them so save() round-trips.
            self.save_args({}, kwargs)
            for block in self.graph_layers:
                conv = block.conv
                block.conv = DestinationSumGraphConv(
                    conv.include_state,
                    conv.edge_update_func,
                    conv.edge_weight_func,
                    conv.node_update_func,
                    conv.node_weight_func,
                    conv.state_update_func,
                )

    for cls in (DestinationSumGraphConv, DGLEraM3GNet):
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
    return {"DestinationSumGraphConv": DestinationSumGraphConv, "DGLEraM3GNet": DGLEraM3GNet}


def __getattr__(name: str) -> type:
    # Exposes the lazily defined classes as module attributes, so pickling and matgl's save/load (which
    # import "@module"."@class") find them without making `import surrogates.m3gnet` pull in torch.
    if name in ("DestinationSumGraphConv", "DGLEraM3GNet"):
        return _dgl_era_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------


def _torch_load(path: Path) -> Any:
    """Load one checkpoint file safely (weights_only), naming the file in any failure."""
    import matgl.utils.io  # noqa: F401  (registers the numpy types matgl pickles into model.pt as safe)
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc


def _build_dgl_era_potential(folder: Path, meta: dict[str, Any]) -> Potential:
    """Rebuild the saved Potential around DGLEraM3GNet and load the unchanged weights into it."""
    from matgl.apps.pes import Potential

    if meta.get("@class") != "Potential":
        raise ModelLoadError(f"{folder / 'model.json'}: expected a Potential, found {meta.get('@class')!r}")
    args = _torch_load(folder / "model.pt")
    state = _torch_load(folder / "state.pt")
    inner = args.get("model") if isinstance(args, dict) else None
    if not isinstance(inner, dict) or not isinstance(inner.get("init_args"), dict):
        raise ModelLoadError(f"{folder / 'model.pt'} does not hold the constructor arguments of an M3GNet")
    try:
        model = _dgl_era_classes()["DGLEraM3GNet"](**inner["init_args"])
        extra = {k: v for k, v in args.items() if k != "model" and not k.startswith("@")}
        potential = Potential(model=model, **extra)
        result = potential.load_state_dict(state, strict=False)
    except Exception as exc:
        raise ModelLoadError(f"{folder}: checkpoint does not fit matgl's M3GNet: {exc}") from exc
    params = {name for name, _ in potential.named_parameters()}
    missing = sorted(k for k in result.missing_keys if k in params)
    # AtomRef.onehot is an obsolete cached identity matrix that matgl 4.x no longer registers.
    unexpected = sorted(k for k in result.unexpected_keys if not k.endswith(".onehot"))
    if missing or unexpected:
        raise ModelLoadError(
            f"{folder / 'state.pt'} does not match the network described by model.pt: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}; the folder mixes files of different models "
            f"or holds a damaged copy: copy the complete checkpoint folder again"
        )
    return potential


def _load_native(folder: Path) -> Potential:
    """Load a folder with matgl's own loader, after checking each file so a failure names the culprit."""
    import matgl
    from matgl.apps.pes import Potential

    for fname in ("model.pt", "state.pt"):
        _torch_load(folder / fname)
    try:
        potential = matgl.load_model(folder)
    except Exception as exc:
        cause = exc.__cause__ or exc
        raise ModelLoadError(f"matgl cannot load {folder}: {type(cause).__name__}: {cause}") from exc
    if not isinstance(potential, Potential):
        raise ModelLoadError(f"{folder} holds a {type(potential).__name__}, not an interatomic potential")
    return potential


def _load_local(folder: Path) -> tuple[Potential, str, frozenset[str] | None]:
    """Load a model folder by the code path its checkpoint needs; returns (potential, code path, elements)."""
    check_model_folder(folder)
    meta = _read_model_json(folder)
    if _is_dgl_era(meta):
        return _build_dgl_era_potential(folder, meta), CODE_PATH_DGL_ERA, _elements_from_meta(meta)
    return _load_native(folder), CODE_PATH_NATIVE, _elements_from_meta(meta)


def _hub_unreachable_reason(name: str) -> str | None:
    """Why a download of ``name`` cannot work, or None if it is worth trying.

    Offline, huggingface_hub retries with back-off for ~45 s before matgl gives up; a failed lookup must not
    stall a run that long, so obvious cases are settled here: offline mode, a name that is a path, or a hub
    host that does not even resolve/connect within a few seconds.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name):
        return "it looks like a folder path, and that folder does not exist"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # a direct probe says nothing about reachability through a proxy
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=3.0).close()
    except OSError as exc:
        return f"{host} is unreachable ({exc})"
    return None


def _not_found(name: str, reason: str) -> ModelNotFoundError:
    configured = [p for p in os.environ.get(MODELS_ENV, "").split(os.pathsep) if p]
    if not configured:
        models_env = f"${MODELS_ENV} is not set"
    else:
        absent = [p for p in configured if not Path(p).expanduser().is_dir()]
        models_env = f"${MODELS_ENV}={os.pathsep.join(configured)}" + (
            f" (no such folder: {', '.join(absent)})" if absent else ""
        )
    hint = ""
    if name.lower() in ("emt", "chgnet"):
        hint = f" To use {name}, write `kind: {name.lower()}` under potential: instead of `model: {name}`."
    return ModelNotFoundError(
        f"model {name!r} was not found: it is not an existing folder, not in any of "
        f"{[str(d) for d in _search_dirs()]} ({models_env}; then matgl's cache), and it cannot be "
        f"downloaded by name: {reason}. Set {MODELS_ENV} to a folder that contains {name}/ (model.json, "
        f"model.pt, state.pt), or give the model as a folder path.{hint}"
    )


def _load_by_name(name: str) -> tuple[Potential, Path | None, str]:
    """Let matgl download ``name``; if the download landed in its cache, load that copy with detection.

    Returns the potential, the cache folder it now lives in (None if not found there) and the code path.
    """
    reason = _hub_unreachable_reason(name)
    if reason is not None:
        raise _not_found(name, reason)
    import matgl

    try:
        potential = matgl.load_model(name)
    except Exception as exc:
        raise _not_found(name, f"matgl failed with {type(exc).__name__}: {exc.__cause__ or exc}") from exc
    cached = find_model_dir(name)
    if cached is not None:
        loaded, code_path, _ = _load_local(cached)
        return loaded, cached, code_path
    return potential, None, CODE_PATH_NATIVE


_CACHE: dict[tuple[str, str], tuple[Potential, ModelInfo]] = {}
_CACHE_LOCK = threading.Lock()


def load_potential(model: str = DEFAULT_MODEL, device: str = "cpu") -> tuple[Potential, ModelInfo]:
    """The potential for ``model`` (folder path or name) on ``device``, loaded once per process.

    Importing matgl and building the network take seconds, so workers must share one instance per model
    instead of paying that per candidate.
    """
    folder = find_model_dir(model)
    key = (str(folder) if folder is not None else model, device)
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key]
        downloaded_to: Path | None = None
        if folder is not None:
            potential, code_path, elements = _load_local(folder)
        else:
            potential, downloaded_to, code_path = _load_by_name(model)
            elements = None
        if elements is None:
            elements = frozenset(getattr(potential.model, "element_types", ()) or ()) or None
        potential = potential.to(device).eval()
        name = folder.name if folder is not None and Path(model).expanduser().is_dir() else model
        info = ModelInfo(name=name, path=folder, code_path=code_path, elements=elements)
        where = info.path or f"matgl hub download ({downloaded_to or 'not cached'})"
        logger.info("potential %s loaded from %s (%s) on %s", info.name, where, code_path, device)
        _CACHE[key] = (potential, info)
        if downloaded_to is not None:  # later calls resolve the name to the cached copy: share the instance
            _CACHE[(str(downloaded_to), device)] = (potential, info)
        return potential, info


def make_calculator(model: str = DEFAULT_MODEL, device: str = "cpu") -> Calculator:
    """An ASE calculator (energy eV, forces eV/Å, Voigt stress eV/Å³ in ASE's sign) for relaxations.

    matgl's Potential reports stress in GPa; PESCalculator with ``stress_unit="eV/A3"`` converts it, and the
    sign already matches ASE (positive = tensile, the cell wants to shrink), as checked against the
    matgl 2.0.4 reference data. Voigt output avoids ASE's per-call 3x3 conversion warning.
    """
    from surrogates.m3gnet_batch import batched_calculator_class

    potential, _ = load_potential(model, device)
    # a matgl PESCalculator that can also evaluate several structures in one call (m3gnet_batch.py)
    return batched_calculator_class()(potential, stress_unit="eV/A3", use_voigt=True)
