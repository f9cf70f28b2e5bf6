"""The two tasks of ``schedule_study.py``: a residual CNN on scikit-learn's digits, and the GPT of
``train_lm.py`` on its character corpus.

Each task builds, for one seed, a model, a batch source and an evaluation, all offline:

* ``cnn``: the 8x8 digits images that ship inside scikit-learn (1797 images, 10 classes), split once
  80/20 into train and test by a fixed permutation (the same split for every seed). The model is a
  small pre-activation-free ResNet (conv-BN-ReLU blocks with identity shortcuts) with dropout and
  stochastic depth, as in the schedule study's "ResNet18 w/ dropout + SD" setting, scaled down to
  8x8 inputs: a 3x3 stem to 16 channels, two blocks at 16 channels (8x8), a strided block to 32
  channels (4x4), one more block at 32, global average pooling, dropout, a linear head. Evaluation
  reports the test loss and accuracy and the whole training split's loss in eval mode (no dropout,
  no layer drop): a less noisy measure of optimisation progress than the per-batch training loss.
* ``lm``: ``python/lm`` (``GPT``, ``CharCorpus``, ``PRESETS``) imported as ``train_lm.py`` does, at
  the ``cpu`` preset's model size with a smaller batch so that a few dozen steps fit the budget.

For a given seed every optimizer sees the same initial weights, the same batches in the same order
and the same dropout / stochastic-depth draws (the model's random number use does not depend on the
optimizer), so runs with the same seed are paired.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # the lm package next to this file


# ------------------------------------------------------------------------------------------- CNN
class StochasticDepthBlock(nn.Module):
    """``relu(shortcut(x) + branch(x))`` where, in training, the whole branch is dropped for the batch
    with probability ``p_sd`` (kept branches are scaled by ``1 / (1 - p_sd)``, so evaluation uses the
    plain sum). The branch is conv-BN-ReLU-dropout-conv-BN."""

    def __init__(self, c_in: int, c_out: int, stride: int, p_drop: float, p_sd: float) -> None:
        super().__init__()
        self.p_sd = p_sd
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.drop = nn.Dropout(p_drop)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        identity = self.shortcut(x)
        # The coin and the dropout masks come from torch's global generator, whose use depends only
        # on the seed and earlier coins, never on the weights: every optimizer sees the same draws.
        if self.training and self.p_sd > 0:
            keep = bool(torch.rand(()) >= self.p_sd)
            if not keep:
                # Run nothing through the branch: its parameters get no gradient this step.
                return F.relu(identity)
            scale = 1.0 / (1.0 - self.p_sd)
        else:
            scale = 1.0
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(self.drop(out)))
        return F.relu(identity + out * scale)


class DigitsResNet(nn.Module):
    def __init__(self, width: int = 16, p_drop: float = 0.3, p_sd: float = 0.3, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.Sequential(
            StochasticDepthBlock(width, width, 1, p_drop, p_sd),
            StochasticDepthBlock(width, width, 1, p_drop, p_sd),
            StochasticDepthBlock(width, 2 * width, 2, p_drop, p_sd),
            StochasticDepthBlock(2 * width, 2 * width, 1, p_drop, p_sd),
        )
        self.drop = nn.Dropout(p_drop)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.stem(x))
        return self.head(self.drop(x.mean(dim=(2, 3))))


def load_digits_tensors(test_fraction: float = 0.2, split_seed: int = 1234) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's digits as ``(x_train [N,1,8,8], y_train, x_test, y_test)``, standardised with the
    training split's mean and standard deviation."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise SystemExit("the cnn task needs scikit-learn (it ships the digits data): pip install scikit-learn") from exc
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(split_seed))
    cut = int(len(y) * (1.0 - test_fraction))
    train, test = order[:cut], order[cut:]
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return x[train], y[train], x[test], y[test]


# ------------------------------------------------------------------------------------------ tasks
@dataclass
class Run:
    """What a task hands the training loop for one seed."""

    model: nn.Module
    param_groups: list[dict]
    next_batch: Callable[[], tuple[Tensor, Tensor]]
    loss_fn: Callable[[nn.Module, Tensor, Tensor], Tensor]
    evaluate: Callable[[nn.Module], dict[str, float]]


@dataclass
class Task:
    name: str
    description: str
    steps: int  # default steps per run
    eval_every: int
    lr: float
    config: dict = field(default_factory=dict)
    make_run: Callable[[int, dict], Run] | None = None


def _decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": matrices, "weight_decay": weight_decay}, {"params": vectors, "weight_decay": 0.0}]


def _epoch_sampler(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):  # drop the ragged last batch
            yield order[start : start + batch_size]


def cnn_task() -> Task:
    data: dict[str, Tensor] = {}

    def make_run(seed: int, config: dict) -> Run:
        if not data:
            data["x"], data["y"], data["xt"], data["yt"] = load_digits_tensors()
        x, y, xt, yt = data["x"], data["y"], data["xt"], data["yt"]
        torch.manual_seed(seed)
        model = DigitsResNet(config["width"], config["dropout"], config["stochastic_depth"])
        sampler = _epoch_sampler(len(y), config["batch_size"], torch.Generator().manual_seed(seed))

        def next_batch() -> tuple[Tensor, Tensor]:
            index = next(sampler)
            return x[index], y[index]

        @torch.no_grad()
        def evaluate(m: nn.Module) -> dict[str, float]:
            was_training = m.training
            m.eval()
            logits = m(xt)
            train_loss = F.cross_entropy(m(x), y).item()
            m.train(was_training)
            return {
                "test_loss": F.cross_entropy(logits, yt).item(),
                "test_acc": (logits.argmax(1) == yt).float().mean().item(),
                "train_eval_loss": train_loss,
            }

        return Run(
            model,
            _decay_groups(model, config["weight_decay"]),
            next_batch,
            lambda m, xb, yb: F.cross_entropy(m(xb), yb),
            evaluate,
        )

    return Task(
        name="cnn",
        description="residual CNN (dropout 0.3, stochastic depth 0.3) on scikit-learn's 8x8 digits",
        steps=240,
        eval_every=40,
        lr=2e-2,  # both Adam and SOAP are near their best here (sweep 1e-3..4e-2 in python/SCHEDULES.md)
        config={"width": 16, "dropout": 0.3, "stochastic_depth": 0.3, "batch_size": 64, "weight_decay": 0.01},
        make_run=make_run,
    )


def lm_task() -> Task:
    from lm import GPT, PRESETS, CharCorpus, GPTConfig, load_text
    from lm.data import DEFAULT_CORPUS

    preset = PRESETS["cpu"]
    corpus_box: dict[str, CharCorpus] = {}

    def make_run(seed: int, config: dict) -> Run:
        if "corpus" not in corpus_box:
            corpus_box["corpus"] = CharCorpus(load_text(DEFAULT_CORPUS), 0.1)
        corpus = corpus_box["corpus"]
        torch.manual_seed(seed)
        model = GPT(GPTConfig(corpus.vocab_size, config["ctx"], config["d_model"], config["n_layers"], config["n_heads"]))
        generator = torch.Generator().manual_seed(seed)
        val = corpus.val_batches(config["eval_batches"], config["batch_size"], config["ctx"])

        @torch.no_grad()
        def evaluate(m: nn.Module) -> dict[str, float]:
            was_training = m.training
            m.eval()
            loss = torch.stack([m(xb, yb) for xb, yb in val]).mean().item()
            m.train(was_training)
            return {"test_loss": loss}

        return Run(
            model,
            model.param_groups(config["weight_decay"]),
            lambda: corpus.train_batch(config["batch_size"], config["ctx"], generator),
            lambda m, xb, yb: m(xb, yb),
            evaluate,
        )

    return Task(
        name="lm",
        description=f"train_lm.py's GPT at the cpu preset's size (d {preset.d_model}, {preset.n_layers} layers) on its "
        "character corpus, smaller batch",
        steps=80,
        eval_every=40,
        lr=preset.lr.get("soap", 3e-3),
        config={
            "d_model": preset.d_model,
            "n_layers": preset.n_layers,
            "n_heads": preset.n_heads,
            "ctx": preset.ctx,
            "batch_size": 16,
            "eval_batches": 2,
            "weight_decay": 0.1,
        },
        make_run=make_run,
    )


TASKS: dict[str, Callable[[], Task]] = {"cnn": cnn_task, "lm": lm_task}
