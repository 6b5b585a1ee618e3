"""The model: its source, loading, the embedder protocol, the torch and ONNX embedders, export, weight hashes."""
