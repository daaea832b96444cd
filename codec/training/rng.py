"""Random numbers that do not depend on how a batch is split between processes.

Each sample of a micro-step draws from its own CPU generator, seeded from
``(seed, micro_step, position in the global batch)``; batch-wide choices (e.g. Stage B's
encoder scale) come from one generator seeded from ``(seed, micro_step)``. So one process
with the global batch and N processes with a slice each draw the same numbers for the same
sample, and a resumed run draws what the uninterrupted run would have: no generator state
needs saving. (Dropout inside the model still uses torch's global generator, which is
saved per process in checkpoints.)
"""

from __future__ import annotations

from typing import Sequence

import torch

_MASK = (1 << 63) - 1


def _mix(*parts: int) -> int:
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = ((h ^ (p & _MASK)) * 0xBF58476D1CE4E5B9) & _MASK
        h ^= h >> 31
    return h


class BatchRandom:
    """Per-sample and batch-wide generators for one micro-step."""

    def __init__(self, seed: int, micro_step: int, positions: Sequence[int]):
        self.micro_step = micro_step
        self.positions = list(positions)
        self.samples = [torch.Generator().manual_seed(_mix(seed, micro_step, p)) for p in self.positions]
        self.batch = torch.Generator().manual_seed(_mix(seed, micro_step, -1))

    def __len__(self) -> int:
        return len(self.samples)

    def uniform(self) -> torch.Tensor:
        """One U[0,1) number per sample ``(B,)``."""
        return torch.cat([torch.rand(1, generator=g) for g in self.samples])

    def normal(self, shape: Sequence[int]) -> torch.Tensor:
        """Standard normal noise of ``(B, *shape)``, each sample from its own generator."""
        return torch.stack([torch.randn(*shape, generator=g) for g in self.samples])

    def batch_uniform(self) -> float:
        """One U[0,1) number for the whole global batch (identical on every process)."""
        return float(torch.rand(1, generator=self.batch))
