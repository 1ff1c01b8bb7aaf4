"""Energy models: the M3GNet wrapper, other ASE calculators, and (later) Gaussian-process surrogates."""
