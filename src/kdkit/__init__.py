"""kdkit: knowledge distillation for classifiers, encoders and language models."""

__version__ = "0.1.0"
