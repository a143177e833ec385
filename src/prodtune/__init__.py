"""prodtune: fine-tune a small instruction model to answer questions about e-commerce products."""

__version__ = "0.1.0"
