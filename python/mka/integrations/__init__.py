"""Integrations with other libraries; each imports its library only inside its own package
(``mka.integrations.hf``: Hugging Face transformers)."""
