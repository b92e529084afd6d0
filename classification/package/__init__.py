"""Model packages: a trained checkpoint as one folder (ONNX, safetensors, classes, input spec, model card) that
runs without this repository's training code (``spec``, ``export``, ``runtime``, ``predict``)."""
