"""Tests of pickrank.serve: the server and its client."""
