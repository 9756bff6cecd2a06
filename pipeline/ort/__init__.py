"""ONNX Runtime boards (rpi4): the emitted .onnx/.ort files, their measurement, and single-layer latency."""
