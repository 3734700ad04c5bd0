"""Data: tokenizers, document sources and the segment streams that feed the model."""
