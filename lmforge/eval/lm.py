"""Language-modelling loss on held-out token windows: what pretraining optimises, and what
fine-tuning should not destroy (SFT reports it before and after, see stages/sft.py)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F

from lmforge.data.shards import TokenBatches
from lmforge.train_utils import Dist, all_reduce_mean


def lm_loss(
    model: torch.nn.Module,
    batches: TokenBatches,
    n_batches: int,
    micro: int,
    d: Dist,
    amp: Callable[[], AbstractContextManager],
) -> float:
    """Mean next-token loss (nats/token) over the first n_batches * micro * world_size
    unshuffled windows of `batches`, split over ranks (the same windows whatever the split)."""
    was_training = model.training
    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(n_batches):
            x, y = batches.fixed_batch(i, micro, d.rank, d.world_size)
            x, y = x.to(d.device), y.to(d.device)
            with amp():
                logits = model(x)
            total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten()).item()
    model.train(was_training)
    return all_reduce_mean(total / n_batches, d)
