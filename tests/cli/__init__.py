"""Tests of pickrank.cli: the commands through the real CLI."""
