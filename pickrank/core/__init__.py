"""The scoring core: the engine, the local backend and batcher, score math, the embedding cache, provenance."""
