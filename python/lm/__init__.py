"""Building blocks of ``python/train_lm.py``: the character-level corpus, the small GPT, the LR
schedule."""

from .data import CharCorpus, load_text
from .lr import warmup_cosine
from .model import GPT, PRESETS, GPTConfig, Preset

__all__ = ["CharCorpus", "load_text", "GPT", "GPTConfig", "PRESETS", "Preset", "warmup_cosine"]
