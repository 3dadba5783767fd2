"""Deployment: ONNX export, int8 quantisation, raw-text prediction
(docs/deploy.md)."""
