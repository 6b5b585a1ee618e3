"""Tests of pickrank.models: model sources, embedders, ONNX export, hashing."""
