"""Models built on the ``mka.nn`` attention modules."""

from .gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
