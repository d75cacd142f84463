"""upcycle: turn dense Hugging Face checkpoints into Mixture-of-Experts models."""

__version__ = "0.1.0"
