"""Statistics over scores: comparing systems (compare) and pairwise accuracy on labelled pairs (eval)."""
