"""The reward server: the HTTP app, request parsing, dynamic batching, and the Python client."""
