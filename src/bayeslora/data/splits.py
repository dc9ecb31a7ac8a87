"""Split definitions that are computed rather than read from a file.

Kept apart from the file loaders so the Hugging Face Hub path (``hub.py``) applies exactly the same
definitions to the same ids.

* WinoGrande ``dev``: the release's ``dev.jsonl`` is our held-out ``test``, so tuning needs another
  split. We take a fixed sample of :data:`WINOGRANDE_DEV_SIZE` qIDs (seed 0) among the ``train_l`` rows
  whose qID is not in ``train_m``. ``train_xs/s/m`` are nested inside ``train_m`` and so never overlap
  it; ``winogrande_l`` trains on ``train_l`` minus the sample.
* BoolQ ``dev``/``test``: the even/odd ``idx`` halves of the SuperGLUE validation set (BoolQ has no
  public labelled test set).
* ``boolq_val_even``: where no BoolQ train file exists, a seeded two thirds of the ``dev`` half
  (``val_even``) is trained on and the other third scored as ``dev``; ``test`` stays the odd half. Not
  comparable with published BoolQ numbers (they train on the 9,427-row train split).
"""

from __future__ import annotations

import random
from collections.abc import Iterable

WINOGRANDE_DEV_SIZE = 1267
"""Same size as the release dev set, so dev and test metrics have the same sampling noise."""
WINOGRANDE_DEV_SEED = 0


def winogrande_dev_qids(train_l_qids: Iterable[str], train_m_qids: Iterable[str]) -> frozenset[str]:
    """The qIDs of the WinoGrande dev split: ``Random(0).sample(sorted(l - m), 1267)``.

    Sorting first makes the sample independent of file order; the result is a set because the rows are
    returned in ``train_l`` file order, not in sample order.
    """
    candidates = sorted(set(train_l_qids) - set(train_m_qids))
    if len(candidates) < WINOGRANDE_DEV_SIZE:
        raise ValueError(
            f"only {len(candidates)} train_l rows are outside train_m; the WinoGrande dev split needs "
            f"{WINOGRANDE_DEV_SIZE} (is train_l the full 10,234-row release file?)"
        )
    return frozenset(random.Random(WINOGRANDE_DEV_SEED).sample(candidates, WINOGRANDE_DEV_SIZE))


def boolq_parity(split: str) -> int:
    """Remainder of ``idx % 2`` that a BoolQ split keeps: dev = even (0), test = odd (1)."""
    return {"dev": 0, "test": 1}[split]


VAL_FRACTION = 0.1
VAL_MAX_ROWS = 500
VAL_SEED = 0


def val_size(n_train: int) -> int:
    """Rows of the ``val`` slice carved from a train split of ``n_train`` rows: 10%, at most 500, at least 1
    (none when the split has fewer than 2 rows)."""
    if n_train < 2:
        return 0
    return max(1, min(VAL_MAX_ROWS, round(VAL_FRACTION * n_train)))


def val_uids(train_uids: Iterable[str]) -> frozenset[str]:
    """The uids of the ``val`` slice: ``Random(0).sample(sorted(uids), val_size(n))``.

    ``val`` is where checkpoints are selected, post-hoc methods are fitted and every tuning decision is
    made, so ``dev`` is only ever reported on. Sorting makes the slice independent of file order; the
    fixed seed makes it the same for every method, run and machine.
    """
    candidates = sorted(set(train_uids))
    return frozenset(random.Random(VAL_SEED).sample(candidates, val_size(len(candidates))))


BOOLQ_TRAIN_FRACTION = 2 / 3
BOOLQ_TRAIN_SEED = 0


def boolq_val_even_train_uids(uids: Iterable[str]) -> frozenset[str]:
    """The ``val_even`` uids that ``boolq_val_even`` trains on: ``Random(0).sample(sorted(uids), round(2n/3))``."""
    candidates = sorted(set(uids))
    return frozenset(random.Random(BOOLQ_TRAIN_SEED).sample(candidates, round(BOOLQ_TRAIN_FRACTION * len(candidates))))
