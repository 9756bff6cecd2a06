"""cnn-deploy: low-rank decomposition, int8 quantization and embedded export of PyTorch CNNs."""
