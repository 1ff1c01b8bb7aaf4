"""Particle-swarm crystal structure search in the style of CALYPSO (Wang, Lv, Zhu, Ma, PRB 82, 094116).

A particle is a crystal of one allowed cell content. Its *position* is the structure its last relaxation
ended in (CALYPSO's rule: the relaxed structure replaces the particle, so the swarm moves between local
minima, not through raw coordinates). Each move is the PSO update

    v <- w v + c1 r1 (pbest - x) + c2 r2 (gbest - x),   x_next = x + v

in a space where the difference of two structures means something:

* Structure difference ``y - x`` (``structure_step``): both cells are Niggli reduced, y's basis is replaced
  by the unimodular combination (entries -1..1) whose shape best matches x's, and the lattice part is the
  symmetric log-strain taking x's metric to y's (rotation free, 6 numbers). Atoms of each species are paired
  by the Hungarian assignment (scipy ``linear_sum_assignment``) on minimum-image distances. Origin shifts
  that put an atom of the rarest species onto each of its counterparts (at most ``MAX_ANCHORS``) are scored
  for every near-equivalent basis at once; the best few are refined by alternating assignment and mean
  shift. The per-atom displacements (Cartesian, in x's frame and atom order) have their mean removed,
  since a rigid translation is no change at all. Only right-handed bases are used, so a full step lands
  on y itself, never on its mirror image.
* ``x + v`` (``apply_step``) strains x's cell by exp(E) and adds the displacements. The result is
  symmetrised in place (``symmetrized``): spglib finds the operations at a loose tolerance and the metric
  and positions are averaged over them. That keeps particles in symmetry-constrained subspaces as CALYPSO
  does, and unlike standardising the cell it never changes the number or order of atoms.
* r1, r2 are one uniform number per term and move (not per coordinate): the move stays a coherent
  interpolation toward the target structures instead of a random distortion; exploration comes from
  relaxation, perturbation of repeated structures and regeneration. Velocities are clamped (largest
  displacement ``MAX_DISPLACEMENT`` Å, largest principal log-strain ``MAX_STRAIN``).

Choices the algorithm description leaves open:

* Global best per content: a difference exists only between cells of the same content, so a particle's
  social target is the lowest-enthalpy relaxed structure *of its own content* seen so far (by any particle
  or immigrant). Across contents energies per atom still compete, in the regeneration ranking.
* Generations in a steady-state run: every ``swarm_size`` finished relaxations form a generation; then the
  worst ``regenerate_fraction`` of the idle particles (by current enthalpy per atom) are flagged, and each
  restarts from a fresh random structure (new content, no memory) the next time it is free.
* A particle moves only after its previous result is back. ``propose`` serves, in order: the
  ``swarm_size`` particles of generation 0; idle particles, longest idle first; new particles while the
  swarm is below ``SWARM_GROWTH`` x ``swarm_size`` (more workers than particles); then immigrants, random
  structures tied to no particle whose results still feed the per-content bests.
* Failed relaxations (any status but RELAXED, which carries no usable structure) regenerate the particle.
  Proposals the engine screens out (REJECTED / DUPLICATE) leave the particle where it was and make its
  next move perturb more; after ``MAX_STALLS`` in a row it is regenerated.
* A move that fails the geometry check is retried at half and a quarter of the step; one that matches the
  particle's position, personal best or social target (StructureMatcher) is perturbed by a growing random
  displacement. When nothing works the particle is regenerated. So a particle sitting on the best is not
  idle: it explores the neighbourhood of the best minimum, as the best particle of a CALYPSO swarm does.

Checkpoints are plain JSON (structures as lattice, species and fractional coordinates, floats exact).
Random structures come from ``random_search.random_symmetric_structure``, which hands pyxtal a generator
seeded from ours per call, so a restored search draws the same structures.
"""

from __future__ import annotations

import functools
import itertools
import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import spglib
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Lattice, Structure
from scipy.optimize import linear_sum_assignment

from generators.seeding import seeds_from_config
from globopt.candidate import Evaluation, Proposal, Status
from globopt.geometry import GeometryLimits, geometry_problem
from globopt.search.base import SearchAlgorithm, SearchExhausted
from globopt.search.random_search import compatible_spacegroups, random_symmetric_structure

# pyxtal occasionally fails to fill a group (or makes a cell the geometry check refuses); draw again.
MAX_GENERATION_ATTEMPTS = 200
# The swarm grows with new particles up to this multiple of swarm_size when every particle is busy.
SWARM_GROWTH = 2
# Velocity clamp: no atom is displaced further than this in one move (Å) ...
MAX_DISPLACEMENT = 2.0
# ... and no principal log-strain of the cell exceeds this (about +-35 % per move).
MAX_STRAIN = 0.3
# spglib tolerance for re-symmetrising x + v (Å): loose enough to restore the symmetry a move nearly keeps.
SYMPREC = 0.1
# Step fractions tried when x + v fails the geometry check.
STEP_SCALES = (1.0, 0.5, 0.25)
# Random perturbations tried on a move that reproduces a known structure; sigma grows with each try (Å).
DEDUP_TRIES = 3
PERTURB_SIGMA = 0.15
PERTURB_STRAIN = 0.03
# Screened-out proposals in a row after which a particle is regenerated.
MAX_STALLS = 3
# Two cell bases count as equally good matches when their relative metric mismatch differs by less.
BASIS_TOLERANCE = 0.05
MAX_BASES = 24
# Origin shifts tried per basis (anchor atoms of the rarest species), and how many of the best
# (basis, shift) pairs get alternating assignment / shift refinement rounds.
MAX_ANCHORS = 12
REFINED_TRIALS = 4
SHIFT_ROUNDS = 2

_IMAGES = np.array(list(itertools.product((-1, 0, 1), repeat=3)), dtype=float)


def _unimodular_matrices() -> np.ndarray:
    """3x3 integer matrices with entries in {-1, 0, 1} and determinant +1: right-handed basis changes.

    Determinant -1 would also give the same lattice, but laying the target over a left-handed basis
    describes its mirror image, so the step would lead to the enantiomorph instead of the target.
    """
    matrices = np.array(list(itertools.product((-1, 0, 1), repeat=9)), dtype=float).reshape(-1, 3, 3)
    return matrices[np.isclose(np.linalg.det(matrices), 1.0)]


_UNIMODULAR = _unimodular_matrices()


@functools.lru_cache(maxsize=64)
def _spacegroups_for(counts: tuple[int, ...], allowed: tuple[int, ...] | None) -> tuple[int, ...]:
    """compatible_spacegroups, cached: building pyxtal's 230 Group objects takes seconds per content."""
    return tuple(compatible_spacegroups(list(counts), list(allowed) if allowed else None))


# -- structures as plain JSON ------------------------------------------------------------------------------
def encode_structure(structure: Structure) -> dict[str, Any]:
    """Compact JSON form. Site properties are dropped: relaxed structures carry numpy-valued ones (from
    ASE) that json cannot write, and the search needs only lattice, species and coordinates."""
    return {
        "lattice": structure.lattice.matrix.tolist(),
        "species": [str(site.specie) for site in structure],
        "frac": structure.frac_coords.tolist(),
    }


def decode_structure(data: dict[str, Any]) -> Structure:
    return Structure(Lattice(data["lattice"]), data["species"], data["frac"])


def _clean(structure: Structure) -> Structure:
    """The same crystal without site properties, so that memory and a decoded checkpoint agree exactly."""
    return decode_structure(encode_structure(structure))


def niggli_reduced(structure: Structure) -> Structure:
    """Niggli-reduced cell with the atom order kept (velocities are indexed by atom) and orientation kept."""
    lattice = structure.lattice.get_niggli_reduced_lattice()
    species = [str(site.specie) for site in structure]
    return Structure(lattice, species, structure.cart_coords, coords_are_cartesian=True, to_unit_cell=True)


# -- the difference space --------------------------------------------------------------------------------
@dataclass
class Step:
    """A difference of two structures of the same content, expressed on the first one.

    ``strain``: symmetric 3x3 log-strain in the reference's Cartesian frame; ``displacement``: (n, 3)
    Cartesian displacements in Å, in the reference's atom order, mean removed. Steps add and scale like
    vectors, which is all the PSO update needs.
    """

    strain: np.ndarray
    displacement: np.ndarray

    def __add__(self, other: Step) -> Step:
        return Step(self.strain + other.strain, self.displacement + other.displacement)

    def __mul__(self, factor: float) -> Step:
        return Step(self.strain * factor, self.displacement * factor)

    __rmul__ = __mul__

    @classmethod
    def zero(cls, n_atoms: int) -> Step:
        return cls(np.zeros((3, 3)), np.zeros((n_atoms, 3)))

    def clamped(self) -> Step:
        """Velocity clamp of classic PSO, applied as a uniform scale so the direction is kept."""
        longest = float(np.linalg.norm(self.displacement, axis=1).max(initial=0.0))
        scale_d = min(1.0, MAX_DISPLACEMENT / longest) if longest > 0 else 1.0
        largest = float(np.abs(np.linalg.eigvalsh(self.strain)).max())
        scale_e = min(1.0, MAX_STRAIN / largest) if largest > 0 else 1.0
        return Step(self.strain * scale_e, self.displacement * scale_d)

    def size(self, volume_per_atom: float) -> float:
        """RMS length in Å: atom displacements plus strain times the typical interatomic length."""
        length = volume_per_atom ** (1.0 / 3.0)
        mean_sq = float((self.displacement**2).sum(axis=1).mean()) if len(self.displacement) else 0.0
        return math.sqrt(mean_sq + (length * float(np.linalg.norm(self.strain))) ** 2)

    def to_state(self) -> dict[str, Any]:
        return {"strain": self.strain.tolist(), "displacement": self.displacement.tolist()}

    @classmethod
    def from_state(cls, data: dict[str, Any]) -> Step:
        return cls(np.array(data["strain"], dtype=float), np.array(data["displacement"], dtype=float))


def _sym_function(matrix: np.ndarray, func) -> np.ndarray:
    """f(A) of a symmetric matrix through its eigen-decomposition (log, exp, sqrt of metrics)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * func(values)) @ vectors.T


def _log_strain(reference: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Symmetric E with reference @ exp(E) having target's metric (rows are lattice vectors)."""
    b = np.linalg.solve(reference, target)  # reference @ b == target
    return _sym_function(b @ b.T, lambda w: 0.5 * np.log(w))


def _candidate_bases(reference: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Unimodular M for which M @ target is a basis shaped like the reference, best first."""
    g_ref = reference @ reference.T
    g_tgt = target @ target.T
    scale = (abs(np.linalg.det(reference)) / abs(np.linalg.det(target))) ** (2.0 / 3.0)
    mapped = scale * np.einsum("kij,jl,kml->kim", _UNIMODULAR, g_tgt, _UNIMODULAR)
    mismatch = np.linalg.norm(mapped - g_ref, axis=(1, 2)) / np.trace(g_ref)
    order = np.argsort(mismatch, kind="stable")
    close = order[mismatch[order] <= mismatch[order[0]] + BASIS_TOLERANCE][:MAX_BASES]
    return _UNIMODULAR[close]


def _min_image(delta: np.ndarray, lattice: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Shortest periodic images of fractional differences (..., 3): (fractional vectors, squared Å)."""
    delta = delta - np.round(delta)
    images = delta[..., None, :] + _IMAGES
    squared = ((images @ lattice) ** 2).sum(axis=-1)
    best = squared.argmin(axis=-1)
    chosen = np.take_along_axis(images, best[..., None, None], axis=-2)[..., 0, :]
    return chosen, np.take_along_axis(squared, best[..., None], axis=-1)[..., 0]


def _assign(
    ref: np.ndarray, tgt: np.ndarray, groups: list[tuple[np.ndarray, np.ndarray]], lattice: np.ndarray
) -> tuple[np.ndarray, float]:
    """Pair atoms of each species optimally; (fractional displacements in reference order, cost in Å^2)."""
    delta = np.zeros_like(ref)
    cost = 0.0
    for ref_idx, tgt_idx in groups:
        vectors, squared = _min_image(tgt[tgt_idx][None, :, :] - ref[ref_idx][:, None, :], lattice)
        rows, cols = linear_sum_assignment(squared)
        delta[ref_idx[rows]] = vectors[rows, cols]
        cost += float(squared[rows, cols].sum())
    return delta, cost


def _shift_costs(
    ref: np.ndarray,
    tgt: np.ndarray,
    groups: list[tuple[np.ndarray, np.ndarray]],
    lattice: np.ndarray,
    shifts: np.ndarray,
) -> np.ndarray:
    """Assignment cost (Å^2) for each trial origin shift, with the distances computed for all at once."""
    costs = np.zeros(len(shifts))
    for ref_idx, tgt_idx in groups:
        delta = tgt[tgt_idx][None, None, :, :] - shifts[:, None, None, :] - ref[ref_idx][None, :, None, :]
        _, squared = _min_image(delta, lattice)
        for k, matrix in enumerate(squared):
            rows, cols = linear_sum_assignment(matrix)
            costs[k] += matrix[rows, cols].sum()
    return costs


def _refine(
    ref: np.ndarray,
    tgt: np.ndarray,
    groups: list[tuple[np.ndarray, np.ndarray]],
    lattice: np.ndarray,
    shift: np.ndarray,
) -> tuple[np.ndarray, float]:
    """Alternate assignment and mean-displacement shift; (displacements with mean removed, cost in Å^2)."""
    for _ in range(SHIFT_ROUNDS):
        delta, _ = _assign(ref, tgt - shift, groups, lattice)
        shift = shift + delta.mean(axis=0)
    delta, cost = _assign(ref, tgt - shift, groups, lattice)
    return delta - delta.mean(axis=0), cost


def _strain_cost(reference: Structure, strain: np.ndarray) -> float:
    """Strain in the units of the assignment cost (Å^2): as if every atom moved by strain x bond length."""
    length_sq = (reference.volume / len(reference)) ** (2.0 / 3.0)
    return len(reference) * length_sq * float((strain**2).sum())


@dataclass
class _Trial:
    """One way of laying the target over the reference: cell basis, origin shift and its rough cost."""

    score: float
    strain: np.ndarray
    frac: np.ndarray  # target fractional coordinates in the chosen basis
    shift: np.ndarray


def _trials(reference: Structure, target: Structure, groups) -> list[_Trial]:
    """Every near-equivalent basis combined with anchor shifts (an atom of the rarest species onto each
    of its counterparts), scored by assignment cost plus strain cost, best first."""
    ref_lattice = reference.lattice.matrix
    ref_frac = reference.frac_coords
    ref_anchors, tgt_anchors = min(groups, key=lambda group: len(group[0]))
    trials = []
    for basis in _candidate_bases(ref_lattice, target.lattice.matrix):
        strain = _log_strain(ref_lattice, basis @ target.lattice.matrix)
        tgt_frac = target.frac_coords @ np.linalg.inv(basis)
        shifts = tgt_frac[tgt_anchors[:MAX_ANCHORS]] - ref_frac[ref_anchors[0]]
        strain_cost = _strain_cost(reference, strain)
        costs = _shift_costs(ref_frac, tgt_frac, groups, ref_lattice, shifts)
        trials += [
            _Trial(float(c) + strain_cost, strain, tgt_frac, s) for c, s in zip(costs, shifts, strict=True)
        ]
    trials.sort(key=lambda trial: trial.score)
    return trials


def structure_step(reference: Structure, target: Structure) -> Step:
    """``target - reference`` in the PSO space (see the module docstring); reference should be reduced.

    Raises ValueError when the two cells do not hold the same atoms.
    """
    ref_species = np.array([str(site.specie) for site in reference])
    tgt_species = np.array([str(site.specie) for site in target])
    if sorted(ref_species) != sorted(tgt_species):
        raise ValueError("a step exists only between cells of the same content")
    target = niggli_reduced(target)
    groups = [(np.flatnonzero(ref_species == s), np.flatnonzero(tgt_species == s)) for s in set(ref_species)]
    groups.sort(key=lambda group: (len(group[0]), group[0][0]))
    ref_lattice = reference.lattice.matrix
    best: tuple[float, Step] | None = None
    for trial in _trials(reference, target, groups)[:REFINED_TRIALS]:
        delta, cost = _refine(reference.frac_coords, trial.frac, groups, ref_lattice, trial.shift)
        score = cost + _strain_cost(reference, trial.strain)
        if best is None or score < best[0]:
            best = (score, Step(trial.strain, delta @ ref_lattice))
    assert best is not None
    return best[1]


def apply_step(structure: Structure, step: Step) -> Structure:
    """``structure + step``: strain the cell, then displace the atoms (fractions follow the new cell)."""
    lattice = structure.lattice.matrix
    frac = structure.frac_coords + step.displacement @ np.linalg.inv(lattice)
    new_lattice = lattice @ _sym_function(step.strain, np.exp)
    species = [str(site.specie) for site in structure]
    return Structure(Lattice(new_lattice), species, frac, to_unit_cell=True)


def structure_distance(a: Structure, b: Structure) -> float:
    """RMS size (Å) of the step from a to b: how far apart two structures are in the PSO space."""
    reduced = niggli_reduced(a)
    return structure_step(reduced, b).size(reduced.volume / len(reduced))


# -- symmetry ---------------------------------------------------------------------------------------------
def _operation_permutation(
    frac: np.ndarray,
    numbers: np.ndarray,
    operation: tuple[np.ndarray, np.ndarray],
    lattice: np.ndarray,
    tolerance: float,
) -> np.ndarray | None:
    """Atom j that atom i lands on under one operation, or None when the images do not permute the atoms."""
    rotation, translation = operation
    images = frac @ rotation.T + translation
    _, squared = _min_image(images[:, None, :] - frac[None, :, :], lattice)
    squared = np.where(numbers[:, None] == numbers[None, :], squared, np.inf)
    target = squared.argmin(axis=1)
    if len(set(target.tolist())) != len(frac) or squared.min(axis=1).max() > tolerance**2:
        return None
    return target


def symmetrized(structure: Structure, symprec: float = SYMPREC) -> Structure:
    """Average metric and positions over the operations spglib finds at ``symprec``.

    The average over a group is exactly invariant under it, so the result has (at least) that space group,
    with the same cell, atom count and atom order. Returns the input when no non-trivial symmetry is found.
    """
    lattice = structure.lattice.matrix
    frac = structure.frac_coords
    numbers = np.array(structure.atomic_numbers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = spglib.get_symmetry((lattice, frac, numbers), symprec=symprec)
    if not found or len(found["rotations"]) <= 1:
        return structure
    rotations = np.asarray(found["rotations"], dtype=float)
    translations = np.asarray(found["translations"], dtype=float)
    metric = lattice @ lattice.T
    averaged_metric = np.einsum("kji,jl,klm->im", rotations, metric, rotations) / len(rotations)
    new_lattice = _sym_function(averaged_metric, np.sqrt) @ _sym_function(metric, lambda w: w**-0.5) @ lattice
    estimate = np.zeros_like(frac)
    for rotation, translation in zip(rotations, translations, strict=True):
        target = _operation_permutation(frac, numbers, (rotation, translation), new_lattice, 3 * symprec)
        if target is None:
            return structure
        images = frac @ rotation.T + translation
        shifts = np.round(images - frac[target])
        estimate += (frac[target] + shifts - translation) @ np.linalg.inv(rotation).T
    species = [str(site.specie) for site in structure]
    return Structure(Lattice(new_lattice), species, estimate / len(rotations), to_unit_cell=True)


# -- swarm state ------------------------------------------------------------------------------------------
@dataclass
class Best:
    """A relaxed structure worth steering toward."""

    enthalpy: float
    candidate_id: int
    structure: Structure

    def to_state(self) -> dict[str, Any]:
        return {
            "enthalpy": self.enthalpy,
            "id": self.candidate_id,
            "structure": encode_structure(self.structure),
        }

    @classmethod
    def from_state(cls, data: dict[str, Any] | None) -> Best | None:
        if data is None:
            return None
        return cls(float(data["enthalpy"]), int(data["id"]), decode_structure(data["structure"]))


@dataclass
class Particle:
    content: int  # index into the search's contents
    position: Best | None = None  # last relaxed structure (CALYPSO: the relaxed structure is the position)
    pbest: Best | None = None
    velocity: Step | None = None
    waiting: bool = False  # a proposal of this particle is with the engine
    regenerate: bool = False  # restart from a random structure at its next turn
    stalls: int = 0  # screened-out proposals in a row
    restarts: int = 0  # random structures drawn so far (0: the next one is its init)

    def to_state(self) -> dict[str, Any]:
        return {
            "content": self.content,
            "position": self.position.to_state() if self.position else None,
            "pbest": self.pbest.to_state() if self.pbest else None,
            "velocity": self.velocity.to_state() if self.velocity else None,
            "waiting": self.waiting,
            "regenerate": self.regenerate,
            "stalls": self.stalls,
            "restarts": self.restarts,
        }

    @classmethod
    def from_state(cls, data: dict[str, Any]) -> Particle:
        return cls(
            content=int(data["content"]),
            position=Best.from_state(data["position"]),
            pbest=Best.from_state(data["pbest"]),
            velocity=Step.from_state(data["velocity"]) if data["velocity"] else None,
            waiting=bool(data["waiting"]),
            regenerate=bool(data["regenerate"]),
            stalls=int(data["stalls"]),
            restarts=int(data["restarts"]),
        )


@dataclass
class _Owner:
    """Whose proposal a candidate is: a particle index (-1 for an immigrant) and the content index."""

    particle: int
    content: int


class ParticleSwarmSearch(SearchAlgorithm):
    """CALYPSO-style particle swarm over relaxed structures (algorithm and choices: module docstring).

    Protocol with the engine: after every ``propose()`` the engine stores the proposal and calls
    ``proposed(candidate_id)`` with the id it assigned, before anything else happens to the search; that is
    how ``tell`` later finds the particle. A proposal the engine screens out must still get
    ``proposed(id)`` followed by ``tell(id, Evaluation(status=REJECTED or DUPLICATE))``, so its particle is
    freed. Should ``propose()`` be called again with no ``proposed()`` in between, the earlier proposal is
    taken as screened out and its particle freed.
    """

    def __init__(
        self,
        contents: list[dict[str, int]],
        limits: GeometryLimits,
        seed: int,
        swarm_size: int = 20,
        inertia: float = 0.6,
        cognitive: float = 1.5,
        social: float = 1.5,
        regenerate_fraction: float = 0.2,
        spacegroups: list[int] | None = None,
        volume_factor: float = 1.1,
        initial_population=None,
    ) -> None:
        if swarm_size < 1:
            raise ValueError(f"swarm_size must be at least 1, got {swarm_size}")
        self.limits = limits
        self.swarm_size = swarm_size
        self.inertia = inertia
        self.cognitive = cognitive
        self.social = social
        self.regenerate_fraction = regenerate_fraction
        self.volume_factor = volume_factor
        self.contents: list[dict[str, int]] = []
        self.groups: list[list[int]] = []
        for content in contents:
            allowed = tuple(spacegroups) if spacegroups else None
            groups = _spacegroups_for(tuple(content.values()), allowed)
            if groups:
                self.contents.append(dict(content))
                self.groups.append(list(groups))
        if not self.contents:
            where = f"among {spacegroups}" if spacegroups else "at all"
            raise SearchExhausted(f"no space group {where} can hold the cell content(s) {contents}")
        self.matcher = StructureMatcher()
        self.rng = np.random.default_rng(seed)
        # share of generation 0 drawn from a trained generative model (generators/seeding.py)
        self.seeder = seeds_from_config(initial_population, swarm_size, self.contents, limits, seed)
        self.particles: list[Particle] = []
        self.content_best: list[Best | None] = [None] * len(self.contents)
        self.ready: list[int] = []  # idle particles, longest idle first
        self.outstanding: dict[int, _Owner] = {}
        self.unbound: _Owner | None = None  # the last proposal, until the engine names its id
        self.finished_in_generation = 0
        self.generation = 0
        self.proposals = 0

    # -- engine interface ---------------------------------------------------------------------------------
    def propose(self) -> Proposal:
        if self.unbound is not None:  # the engine screened the last proposal without telling us
            self._release(self.unbound, Status.REJECTED)
            self.unbound = None
        index = self._next_particle()
        if index is None:
            content = self._draw_content()
            structure, group = self._random_structure(content)
            proposal = Proposal(structure, origin=f"pso:immigrant:sg{group}")
            owner = _Owner(-1, content)
        else:
            proposal = self._particle_proposal(index)
            owner = _Owner(index, self.particles[index].content)
            self.particles[index].waiting = True
        self.unbound = owner
        self.proposals += 1
        return proposal

    def proposed(self, candidate_id: int) -> None:
        """Bind the id the engine gave the last proposal, so its result finds the particle."""
        if self.unbound is not None:
            self.outstanding[candidate_id] = self.unbound
            self.unbound = None

    def tell(self, candidate_id: int, evaluation: Evaluation) -> None:
        owner = self.outstanding.pop(candidate_id, None)
        best = _usable(candidate_id, evaluation)
        if owner is None:  # not (or no longer) ours, e.g. re-issued work: still useful as information
            if best is not None:
                content = self._content_of(best.structure)
                if content is not None:
                    self._offer_content_best(content, best)
            return
        if best is not None:
            self._offer_content_best(owner.content, best)
        if owner.particle >= 0:
            self._update_particle(owner.particle, best, evaluation.status)
        if evaluation.status.used_potential:
            self.finished_in_generation += 1
            if self.finished_in_generation >= self.swarm_size:
                self._end_generation()

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "pso",
            "rng": self.rng.bit_generator.state,
            "particles": [p.to_state() for p in self.particles],
            "content_best": [b.to_state() if b else None for b in self.content_best],
            "ready": list(self.ready),
            "outstanding": [[cid, o.particle, o.content] for cid, o in self.outstanding.items()],
            "unbound": [self.unbound.particle, self.unbound.content] if self.unbound else None,
            "finished_in_generation": self.finished_in_generation,
            "generation": self.generation,
            "proposals": self.proposals,
            "generator_seeds": None if self.seeder is None else self.seeder.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "pso":
            raise ValueError(f"checkpointed search is {state.get('kind')!r}, not pso")
        if len(state["content_best"]) != len(self.contents):
            raise ValueError("checkpointed search was made for different cell contents")
        self.rng.bit_generator.state = state["rng"]
        self.particles = [Particle.from_state(p) for p in state["particles"]]
        self.content_best = [Best.from_state(b) for b in state["content_best"]]
        self.ready = [int(i) for i in state["ready"]]
        self.outstanding = {int(cid): _Owner(int(p), int(c)) for cid, p, c in state["outstanding"]}
        unbound = state["unbound"]
        self.unbound = _Owner(int(unbound[0]), int(unbound[1])) if unbound else None
        self.finished_in_generation = int(state["finished_in_generation"])
        self.generation = int(state["generation"])
        self.proposals = int(state["proposals"])
        if self.seeder is not None:
            self.seeder.load_state_dict(state.get("generator_seeds"))

    # -- bookkeeping --------------------------------------------------------------------------------------
    def _next_particle(self) -> int | None:
        """Generation 0 first, then the longest-idle particle, then growth; None means an immigrant."""
        if len(self.particles) < self.swarm_size:
            return self._new_particle()
        if self.ready:
            return self.ready.pop(0)
        if len(self.particles) < SWARM_GROWTH * self.swarm_size:
            return self._new_particle()
        return None

    def _new_particle(self) -> int:
        self.particles.append(Particle(content=self._draw_content()))
        return len(self.particles) - 1

    def _draw_content(self) -> int:
        return int(self.rng.integers(len(self.contents)))

    def _content_of(self, structure: Structure) -> int | None:
        counts = {str(el): round(n) for el, n in structure.composition.items()}
        for index, content in enumerate(self.contents):
            if counts == content:
                return index
        return None

    def _offer_content_best(self, content: int, best: Best) -> None:
        current = self.content_best[content]
        if current is None or best.enthalpy < current.enthalpy:
            self.content_best[content] = best

    def _release(self, owner: _Owner, status: Status) -> None:
        if owner.particle >= 0:
            self._update_particle(owner.particle, None, status)

    def _update_particle(self, index: int, best: Best | None, status: Status) -> None:
        """CALYPSO's rule: the relaxed structure becomes the position; failures restart the particle."""
        particle = self.particles[index]
        particle.waiting = False
        self.ready.append(index)
        if best is not None:
            particle.position = best
            particle.stalls = 0
            if particle.pbest is None or best.enthalpy < particle.pbest.enthalpy:
                particle.pbest = best
        elif status in (Status.REJECTED, Status.DUPLICATE, Status.SKIPPED):
            particle.stalls += 1
            if particle.position is None or particle.stalls > MAX_STALLS:
                particle.regenerate = True
        else:
            particle.regenerate = True

    def _end_generation(self) -> None:
        """Flag the worst idle particles for a random restart (CALYPSO replaces its worst each generation)."""
        self.finished_in_generation = 0
        self.generation += 1
        count = round(self.regenerate_fraction * self.swarm_size)
        ranked = sorted(
            (p.position.enthalpy, i)
            for i, p in enumerate(self.particles)
            if p.position is not None and not p.waiting and not p.regenerate
        )
        for _, index in ranked[::-1][:count]:
            self.particles[index].regenerate = True

    # -- proposals ----------------------------------------------------------------------------------------
    def _particle_proposal(self, index: int) -> Proposal:
        particle = self.particles[index]
        if particle.position is None or particle.regenerate:
            return self._restart(index)
        proposal = self._move(index)
        return proposal if proposal is not None else self._restart(index)

    def _restart(self, index: int) -> Proposal:
        """A fresh random structure for the particle; a restart forgets everything but the slot."""
        particle = self.particles[index]
        kind = "init" if particle.restarts == 0 else "regen"
        if particle.restarts > 0:
            particle.content = self._draw_content()
        particle.position = particle.pbest = particle.velocity = None
        particle.regenerate = False
        particle.stalls = 0
        particle.restarts += 1
        seeded = self.seeder.next() if kind == "init" and self.seeder is not None else None
        if seeded is not None:
            particle.content = seeded[0]
            return Proposal(seeded[1], origin=seeded[2])
        structure, group = self._random_structure(particle.content)
        return Proposal(structure, origin=f"pso:{kind}:sg{group}")

    def _random_structure(self, content_index: int) -> tuple[Structure, int]:
        """A pyxtal structure in a random compatible group that also passes the geometry check."""
        last_error = ""
        for _ in range(MAX_GENERATION_ATTEMPTS):
            made = random_symmetric_structure(
                self.contents[content_index], self.groups[content_index], self.rng, self.volume_factor
            )
            if isinstance(made, str):
                last_error = made
                continue
            structure, group = _clean(made[0]), made[1]
            last_error = geometry_problem(structure, self.limits)
            if not last_error:
                return structure, group
        raise SearchExhausted(f"pyxtal failed {MAX_GENERATION_ATTEMPTS} times in a row (last: {last_error})")

    def _move(self, index: int) -> Proposal | None:
        """x + v, symmetrised and checked; smaller steps on bad geometry, more noise on repeats."""
        particle = self.particles[index]
        assert particle.position is not None and particle.pbest is not None
        social = self.content_best[particle.content] or particle.pbest
        x = niggli_reduced(particle.position.structure)
        velocity = self._velocity(particle, x, social.structure)
        known = [particle.position.structure, particle.pbest.structure, social.structure]
        for scale in STEP_SCALES:
            for attempt in range(DEDUP_TRIES + 1):
                level = attempt + particle.stalls
                step = velocity * scale
                if level:
                    step = step + self._perturbation(len(x), level)
                candidate = symmetrized(apply_step(x, step))
                if geometry_problem(candidate, self.limits):
                    if level == 0:
                        break  # the step itself is too long: shorten it
                    continue  # this noise pushed atoms together: draw other noise
                if not any(self.matcher.fit(candidate, other) for other in known):
                    particle.velocity = step
                    parents = (particle.pbest.candidate_id, social.candidate_id)
                    return Proposal(candidate, origin=f"pso:move:p{index}", parents=parents)
        return None

    def _velocity(self, particle: Particle, x: Structure, social: Structure) -> Step:
        """v <- w v + c1 r1 (pbest - x) + c2 r2 (gbest - x), clamped."""
        assert particle.pbest is not None
        previous = particle.velocity
        if previous is None or previous.displacement.shape != (len(x), 3):
            previous = Step.zero(len(x))
        r1, r2 = self.rng.random(2)
        cognitive = structure_step(x, particle.pbest.structure)
        towards_social = structure_step(x, social)
        velocity = (
            self.inertia * previous + self.cognitive * r1 * cognitive + self.social * r2 * towards_social
        )
        return velocity.clamped()

    def _perturbation(self, n_atoms: int, level: int) -> Step:
        """Random displacement and strain growing with ``level``, to leave an already-known structure."""
        sigma = PERTURB_SIGMA * level
        strain = self.rng.normal(0.0, PERTURB_STRAIN * level, (3, 3))
        displacement = self.rng.normal(0.0, sigma, (n_atoms, 3))
        return Step((strain + strain.T) / 2, displacement - displacement.mean(axis=0))


def _usable(candidate_id: int, evaluation: Evaluation) -> Best | None:
    """The relaxed structure and fitness of a successful evaluation; None for any other outcome."""
    enthalpy = evaluation.enthalpy_per_atom
    if evaluation.status is not Status.RELAXED or evaluation.relaxed is None or enthalpy is None:
        return None
    if not math.isfinite(enthalpy):
        return None
    return Best(float(enthalpy), candidate_id, _clean(evaluation.relaxed))
