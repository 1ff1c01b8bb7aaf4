"""Generative models of crystals that seed the search (the crystal-structure-prediction task: given the
atoms of a cell, generate lattice and positions).

- ``representation``: lattice (Niggli cell parameters, standardised) + fractional coordinates on the torus
  + atom types as conditioning.
- ``networks``: periodic, permutation-equivariant message passing over all atom pairs of a cell.
- ``diffusion``: joint DDPM (lattice) + wrapped-normal score matching (coordinates), DiffCSP-style.
- ``wgan``: WGAN-GP baseline on the same representation and backbone.
- ``data`` (CDVAE csv, CIF folders, ASE db), ``train``, ``sample``, ``metrics`` (match rate / RMSE /
  validity), ``checkpoint`` (versioned files; shipped ones in ``checkpoints/``), ``seeding`` (first
  generation of GA/PSO via the config's ``initial_population``).
"""
