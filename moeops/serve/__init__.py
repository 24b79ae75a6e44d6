"""The OpenAI-compatible ONNX Runtime server (`moeops serve`): engine (one loaded model version with
continuous batching), router, app, alias watcher and metrics. Torch-free: onnxruntime, numpy and
tokenizers only. Nothing is imported here, so that importing one module does not pull in the others."""
