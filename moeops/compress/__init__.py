"""Model compression: student construction for distillation (student.py) and quantization."""
