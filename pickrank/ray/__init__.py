"""Ray: the one place that starts or joins it, the engine that embeds on a Ray cluster, and the server on Ray Serve."""
