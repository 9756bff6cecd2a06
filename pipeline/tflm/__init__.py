"""Microcontrollers (TFLite Micro): the operator table, the TF-free int8 .tflite writer, the interpreter,
measurement (arena, flash, agreement with ONNX Runtime) and the firmware sources."""
