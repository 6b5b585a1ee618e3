"""Inputs: discovery, candidate sets, guarded reading, decoding and preprocessing, workers, generator metadata."""
