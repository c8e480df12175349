"""mellow: a staged training pipeline for small audio-language models."""
__version__ = "0.1.0"
