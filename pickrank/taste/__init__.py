"""Teach PickScore a taste: pairwise labels from a browser (`label`), a preference head fitted on them (`tune`)."""
