"""sparsebench: activation sparsity in LLMs, measured honestly."""

__version__ = "0.1.0"
