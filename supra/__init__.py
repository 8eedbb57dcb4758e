"""supra: turn pretrained softmax-attention LLMs into linear-attention RNNs (SUPRA)."""

__version__ = "0.1.0"
