"""Outputs: where results may go (targets, guards), the record writers, copies of winners, terminal-safe text."""
