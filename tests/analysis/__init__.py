"""Tests of pickrank.analysis: compare's statistics, eval."""
