"""Tests of pickrank.output: writers and output guards."""
