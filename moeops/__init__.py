"""moeops: corpus → validated tokens → DeepSeek-style MoE → evaluation, as a DVC pipeline under Prefect."""

__version__ = "0.1.0"
