"""The reward server: request parsing, decoding and dynamic batching, the HTTP app, running it, the Python client."""
