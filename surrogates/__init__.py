"""Surrogates of the quantum-mechanical energy.

The interatomic potentials the engine relaxes with (M3GNet, any ASE calculator), and the Gaussian-process
surrogate that ranks proposals before any of them is relaxed.
"""
