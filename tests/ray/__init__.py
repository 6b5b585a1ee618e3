"""Tests of pickrank.ray: the Ray engine and Ray Serve."""
