"""Stage 2, ONNX: export from torch, simplify (onnxsim) and quantize to int8 (ONNX Runtime static QDQ, the one
calibration every target shares); graph costs and an ONNX Runtime runner."""
