"""dfq-deploy: data-free quantization and deployment of PyTorch CNNs."""

__version__ = "0.1.0"
