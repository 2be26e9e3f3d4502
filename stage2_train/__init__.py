"""Stage 2: train a student and projectors from memory-mapped teacher K/V caches."""
