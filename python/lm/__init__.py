"""Building blocks of ``python/train_lm.py``: the character-level corpus and the small GPT."""

from .data import CharCorpus, load_text
from .model import GPT, PRESETS, GPTConfig, Preset

__all__ = ["CharCorpus", "load_text", "GPT", "GPTConfig", "PRESETS", "Preset"]
