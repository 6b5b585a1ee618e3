"""Ray: the engine that embeds on a Ray cluster, and the server on Ray Serve."""
