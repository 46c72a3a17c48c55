"""Serving outside PyTorch: ``export`` writes ONNX graphs with per-layer key/value sizes,
``ort`` translates through them with ONNX Runtime. Needs the ``serve`` extra."""
