"""Exports of a trained model directory: ONNX (with KV cache), Hugging Face format, a Triton
Inference Server model repository, and a TensorRT engine cache (GPU only)."""
