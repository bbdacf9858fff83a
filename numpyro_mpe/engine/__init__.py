"""The per-observation engine: chunk layout and loop, per-chunk terms, sums for the MAP, memories, cavities,
quadrature and the one per-observation pass."""
