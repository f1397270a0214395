"""I/O adapters: model files in, quantized model files out. Each format's module imports its
own third-party package (onnx, safetensors) only when it is used."""
