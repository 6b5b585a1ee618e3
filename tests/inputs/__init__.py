"""Tests of pickrank.inputs: discovery, reading, decoding, generator metadata."""
