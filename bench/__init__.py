"""authd's benchmarks: each suite returns named figures; ``python -m bench`` writes them as JSON."""
