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
Random structures come from ``pyxtal_sampling.random_symmetric_structure``, which hands pyxtal a generator
seeded from ours per call, so a restored search draws the same structures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Structure

from generators.seeding import seeds_from_config
from globopt.candidate import Evaluation, Proposal, Status
from globopt.geometry import GeometryLimits, geometry_problem
from globopt.search.base import SearchAlgorithm, SearchExhausted
from globopt.search.pyxtal_sampling import CellSymmetry, random_symmetric_structure, symmetry_options
from globopt.search.structure_difference import (
    Step,
    apply_step,
    niggli_reduced,
    structure_step,
    symmetrized,
)
from globopt.structure_codec import structure_from_dict, structure_to_dict, without_site_properties

# pyxtal occasionally fails to fill a group (or makes a cell the geometry check refuses); draw again.
MAX_GENERATION_ATTEMPTS = 200
# The swarm grows with new particles up to this multiple of swarm_size when every particle is busy.
SWARM_GROWTH = 2
# Step fractions tried when x + v fails the geometry check.
STEP_SCALES = (1.0, 0.5, 0.25)
# Random perturbations tried on a move that reproduces a known structure; sigma grows with each try (Å).
DEDUP_TRIES = 3
PERTURB_SIGMA = 0.15
PERTURB_STRAIN = 0.03
# Screened-out proposals in a row after which a particle is regenerated.
MAX_STALLS = 3


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
            "structure": structure_to_dict(self.structure),
        }

    @classmethod
    def from_state(cls, data: dict[str, Any] | None) -> Best | None:
        if data is None:
            return None
        return cls(float(data["enthalpy"]), int(data["id"]), structure_from_dict(data["structure"]))


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
        spacegroup_prior: str = "uniform",
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
        self.groups: list[tuple[CellSymmetry, ...]] = []
        for content in contents:
            allowed = list(spacegroups) if spacegroups else None
            options = symmetry_options(list(content.values()), allowed, spacegroup_prior)
            if options:
                self.contents.append(dict(content))
                self.groups.append(options)
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
            structure, group = without_site_properties(made[0]), made[1]
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
    return Best(float(enthalpy), candidate_id, without_site_properties(evaluation.relaxed))
