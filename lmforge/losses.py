"""Training losses as pure functions: tensors in, a scalar out, no state.

Each docstring gives the formula; tests/test_*.py check each against a hand computation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # targets with this value carry no loss (prompt tokens, padding)


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions that carry loss.

        L = -(1 / |M|) * sum_{t in M} log softmax(z_t)[y_t],   M = {t : y_t != -100}

    logits (B, T, V), targets (B, T). Averaging over the loss tokens, not over rows, weighs a
    long answer by its length, as pretraining does. Computed in float32 (autocast logits are
    bf16 on GPU). With no loss token at all, returns 0 with a gradient (not NaN).
    """
    flat = targets.flatten()
    total = F.cross_entropy(
        logits.float().flatten(0, 1), flat, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return total / (flat != IGNORE_INDEX).sum().clamp(min=1)
