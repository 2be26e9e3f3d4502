"""Stage 1: extract per-layer K/V of one or more teachers into reusable caches."""
