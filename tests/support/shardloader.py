"""A StatefulDataLoader-like iterator over one rank's shard, for per-rank state tests.

Like torchdata's ``StatefulDataLoader`` with a ``DistributedSampler``, every
rank draws shuffled batches from its own shard, and ``state_dict()`` holds
JSON values plus tensors (its position, the epoch's order and its generator).
"""
from __future__ import annotations

from typing import Any, Dict

import torch


class ShardLoader:
    """Batches of rows of ``data`` from shard ``rank`` of ``world``, reshuffled every epoch by its own generator."""

    def __init__(self, data: torch.Tensor, rank: int, world: int, batch_size: int, seed: int) -> None:
        self.data = data
        self.indices = torch.arange(rank, len(data), world)
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = 0
        self.position = 0
        self.order = self.indices[torch.randperm(len(self.indices), generator=self.generator)]
        self.last_indices: list = []

    def __iter__(self) -> "ShardLoader":
        return self

    def __next__(self) -> torch.Tensor:
        if self.position + self.batch_size > len(self.order):
            self.epoch += 1
            self.position = 0
            self.order = self.indices[torch.randperm(len(self.indices), generator=self.generator)]
        batch = self.order[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        self.last_indices = batch.tolist()   # which rows this batch held
        return self.data[batch]

    def state_dict(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "order": self.order.clone(),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.order = state["order"].clone()
        self.generator.set_state(state["generator"])
