"""archplan: plan and size LLM architectures; every analytic number is cross-checked against torch."""

__version__ = "0.1.0"
