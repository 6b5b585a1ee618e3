"""Tests of pickrank.core: the engine, scoring, score math, cache, provenance."""
