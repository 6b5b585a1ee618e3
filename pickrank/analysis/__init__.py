"""Statistics over scores: comparing systems (comparison/) and pairwise accuracy on labelled pairs (evaluate)."""
