"""Character-level text data: load a (compressed) UTF-8 file, split it, sample batches."""

from __future__ import annotations

import gzip
import lzma
from pathlib import Path

import torch
from torch import Tensor

DEFAULT_CORPUS = Path(__file__).resolve().parent.parent / "data" / "shakespeare.txt.xz"


def load_text(path: str | Path) -> str:
    """The UTF-8 text of ``path``; ``.xz`` and ``.gz`` files are decompressed."""
    path = Path(path)
    if path.suffix == ".xz":
        raw = lzma.decompress(path.read_bytes())
    elif path.suffix == ".gz":
        raw = gzip.decompress(path.read_bytes())
    else:
        raw = path.read_bytes()
    return raw.decode("utf-8")


class CharCorpus:
    """A text as character ids, split into a training head and a held-out validation tail.

    The vocabulary is every distinct character of the whole text (it is only the alphabet; the
    validation split must not hold ids the model has no embedding for). The validation split is the
    contiguous tail, not random windows, so no validation text is also seen in training.
    """

    def __init__(self, text: str, val_fraction: float = 0.1) -> None:
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.chars = sorted(set(text))
        # Vectorised encoding: code points -> rank among the sorted distinct code points.
        code_points = torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32)
        alphabet = torch.tensor([ord(c) for c in self.chars], dtype=torch.int32)
        ids = torch.searchsorted(alphabet, code_points).to(torch.int16 if len(self.chars) < 2**15 else torch.int32)
        cut = int(len(ids) * (1.0 - val_fraction))
        self.train, self.val = ids[:cut], ids[cut:]

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def decode(self, ids: Tensor) -> str:
        return "".join(self.chars[i] for i in ids.tolist())

    def check_fits(self, ctx: int, batch_size: int) -> None:
        for name, split in (("training", self.train), ("validation", self.val)):
            if len(split) < ctx + 2:
                raise ValueError(f"the {name} split has {len(split)} characters, fewer than ctx+2={ctx + 2}")

    def train_batch(self, batch_size: int, ctx: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Random windows of the training split (inputs, next-character targets), as int64."""
        starts = torch.randint(len(self.train) - ctx - 1, (batch_size,), generator=generator)
        return self._windows(self.train, starts, ctx)

    def val_batches(self, n_batches: int, batch_size: int, ctx: int) -> list[tuple[Tensor, Tensor]]:
        """A fixed set of validation windows spread evenly over the split (the same for every run)."""
        n = n_batches * batch_size
        last = len(self.val) - ctx - 1
        starts = torch.linspace(0, last, n).round().long()
        return [self._windows(self.val, s, ctx) for s in starts.split(batch_size)]

    @staticmethod
    def _windows(ids: Tensor, starts: Tensor, ctx: int) -> tuple[Tensor, Tensor]:
        index = starts[:, None] + torch.arange(ctx + 1)
        window = ids[index].long()
        return window[:, :-1].contiguous(), window[:, 1:].contiguous()
