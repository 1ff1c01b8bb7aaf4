"""Generative models of crystals (diffusion, WGAN-GP) that seed the search.

Not implemented yet: this package is reserved by the layout in DESIGN.md and is built in its own issue.
Nothing in globopt imports it today.
"""
