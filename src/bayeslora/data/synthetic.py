"""A synthetic multiple-choice task, generated in code: a DEMO for the offline CPU quickstart.

It is not a benchmark. It exists so that ``bayeslora`` can be tried end to end (train, calibrate,
shift) in a few minutes on a small encoder with no download, and so that calibration numbers can be
compared with known optima.

Design (every example is short: an encoder (question, choice) pair is ~10 MiniLM tokens):

* **Rule.** The question names a colour (``"Which thing is red?"``); each of the 2-4 choices is
  ``"<size> <colour> <object>"`` with distinct colours; the true answer is the choice with the named
  colour. The rule is decidable from the text (:func:`rule_answer`).
* **Label noise.** With probability ``noise`` the stored label is replaced by a uniformly random *other*
  choice. So the Bayes-optimal predictor answers the rule, is right with probability ``1 - noise``
  (:func:`bayes_accuracy`) and, being calibrated, says so; its NLL is :func:`bayes_nll`.
* **Spurious cue.** Exactly one choice is ``big``, the others ``small``. In train/dev/test the big one
  is the true answer with probability ``cue_strength`` (else a random distractor): a cheap shortcut that
  is right most of the time (:func:`cue_accuracy`).
* **OOD split.** The cue always sits on a wrong choice, and colours and objects come from a disjoint
  vocabulary. The rule still holds (Bayes accuracy unchanged), but a model that learned "pick big" is
  confidently wrong: that is what a calibrated posterior should notice.

Everything is deterministic given ``SyntheticConfig.seed`` (each split has its own string-seeded RNG,
independent of ``PYTHONHASHSEED`` and of the other splits' sizes).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from .example import Kind, MCExample

SPLITS: tuple[str, ...] = ("train", "dev", "test", "ood")
COLORS = ("red", "blue", "green", "yellow", "black", "white", "brown", "gray")
OBJECTS = ("ball", "cup", "box", "hat", "book", "chair", "lamp", "shoe")
OOD_COLORS = ("purple", "orange", "pink", "silver", "gold", "violet")
OOD_OBJECTS = ("kite", "vase", "drum", "bell", "coat", "fork")
TEMPLATES = ("Which thing is {color}?", "Pick the {color} one.", "Find the {color} item.")
CUE, NOT_CUE = "big", "small"


@dataclass(frozen=True)
class SyntheticConfig:
    """Sizes and noise of the synthetic task; defaults fit a 2-3 minute CPU quickstart on MiniLM."""

    n_train: int = 512
    n_dev: int = 200
    n_test: int = 200
    n_ood: int = 200
    noise: float = 0.15
    """Probability that a label is flipped to a random other choice (all splits)."""
    cue_strength: float = 0.9
    """In-distribution probability that the spurious ``big`` cue marks the true answer (OOD: 0)."""
    min_choices: int = 2
    max_choices: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_train", "n_dev", "n_test", "n_ood"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 2 <= self.min_choices <= self.max_choices <= min(len(OOD_COLORS), len(COLORS)):
            raise ValueError(f"need 2 <= min_choices <= max_choices <= 6, got {self.min_choices}, {self.max_choices}")
        limit = (self.min_choices - 1) / self.min_choices
        if not 0.0 <= self.noise < limit:
            raise ValueError(
                f"noise must be in [0, {limit:.3f}) so the rule stays the most likely label, got {self.noise}"
            )
        if not 0.0 <= self.cue_strength <= 1.0:
            raise ValueError(f"cue_strength must be in [0, 1], got {self.cue_strength}")

    def size(self, split: str) -> int:
        """Number of examples in ``split``."""
        return {"train": self.n_train, "dev": self.n_dev, "test": self.n_test, "ood": self.n_ood}[check_split(split)]


def make_split(split: str, config: SyntheticConfig = SyntheticConfig()) -> list[MCExample]:
    """Generate one split (``train``, ``dev``, ``test`` or ``ood``) deterministically."""
    rng = random.Random(f"bayeslora-synthetic:{config.seed}:{check_split(split)}")
    return [_example(rng, split, i, config) for i in range(config.size(split))]


def _example(rng: random.Random, split: str, i: int, config: SyntheticConfig) -> MCExample:
    ood = split == "ood"
    n = rng.randint(config.min_choices, config.max_choices)
    colors = rng.sample(OOD_COLORS if ood else COLORS, n)  # colors[0] is the named colour
    objects = rng.sample(OOD_OBJECTS if ood else OBJECTS, n)
    truth = rng.randrange(n)
    order = rng.sample(range(1, n), n - 1)  # order[position] indexes colors/objects ...
    order.insert(truth, 0)  # ... and the named colour sits at position `truth`
    cue_on_truth = (not ood) and rng.random() < config.cue_strength
    cued = truth if cue_on_truth else rng.choice([p for p in range(n) if p != truth])
    choices = tuple(
        f"{CUE if pos == cued else NOT_CUE} {colors[order[pos]]} {objects[order[pos]]}" for pos in range(n)
    )
    label = truth
    if rng.random() < config.noise:
        label = rng.choice([p for p in range(n) if p != truth])
    question = rng.choice(TEMPLATES).format(color=colors[0])
    uid, source = f"synthetic-{split}-{i}", f"synthetic:{split}:{i}"
    return MCExample(uid, question, choices, label, None, Kind.MULTIPLE_CHOICE, source)


def rule_answer(example: MCExample) -> int:
    """The noise-free answer: the position of the choice whose colour the question names."""
    words = example.question.rstrip("?.").split()
    named = next(w for w in reversed(words) if w in COLORS or w in OOD_COLORS)
    return next(i for i, c in enumerate(example.choices) if c.split()[1] == named)


def cue_answer(example: MCExample) -> int:
    """What the shortcut predicts: the position of the ``big`` choice."""
    return next(i for i, c in enumerate(example.choices) if c.split()[0] == CUE)


def _choice_counts(config: SyntheticConfig) -> range:
    return range(config.min_choices, config.max_choices + 1)  # each equally likely


def chance_accuracy(config: SyntheticConfig = SyntheticConfig()) -> float:
    """Expected accuracy of a uniform random guess: the mean of 1/C over the choice counts."""
    counts = _choice_counts(config)
    return sum(1 / c for c in counts) / len(counts)


def bayes_accuracy(config: SyntheticConfig = SyntheticConfig()) -> float:
    """Accuracy of the Bayes-optimal predictor (answer the rule) on any split: ``1 - noise``."""
    return 1.0 - config.noise


def bayes_nll(config: SyntheticConfig = SyntheticConfig()) -> float:
    """Expected NLL (nats) of the Bayes posterior ``(1 - noise, noise/(C-1), ...)``: its entropy."""
    eps, counts = config.noise, _choice_counts(config)

    def entropy(c: int) -> float:
        rest = eps * math.log(eps / (c - 1)) if eps > 0 else 0.0
        return -((1 - eps) * math.log(1 - eps) + rest)

    return sum(entropy(c) for c in counts) / len(counts)


def cue_accuracy(split: str, config: SyntheticConfig = SyntheticConfig()) -> float:
    """Expected accuracy of the shortcut "pick the big one" (OOD: the cue is never on the truth)."""
    q = 0.0 if check_split(split) == "ood" else config.cue_strength
    counts = _choice_counts(config)
    per_c = [q * (1 - config.noise) + (1 - q) * config.noise / (c - 1) for c in counts]
    return sum(per_c) / len(per_c)


def empirical_accuracy(examples: list[MCExample], predict: str = "rule") -> float:
    """Fraction of ``examples`` whose label equals the ``rule`` (or ``cue``) prediction."""
    fn = {"rule": rule_answer, "cue": cue_answer}[predict]
    return sum(fn(ex) == ex.answer for ex in examples) / max(len(examples), 1)


def check_split(split: str) -> str:
    """Return ``split`` if the synthetic task has it, else raise ValueError listing the splits."""
    if split not in SPLITS:
        raise ValueError(f"synthetic task has splits {list(SPLITS)}, not {split!r}")
    return split
