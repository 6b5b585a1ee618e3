"""Self-contained HTML pages: the gallery of a ranking and the comparison page, with their shared helpers."""
