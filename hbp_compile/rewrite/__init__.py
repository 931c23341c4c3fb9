"""Stage 3, rewrite: each stream becomes one call of the HighwayStream autograd.Function."""
