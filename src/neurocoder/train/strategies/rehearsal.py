"""Naive rehearsal: a fixed budget of stored samples, split evenly over the tasks seen so far;
every training batch is joined by an equally large batch drawn from the memory."""

from __future__ import annotations

import torch

from .base import Strategy


class Rehearsal(Strategy):
    name = "rehearsal"

    def __init__(self, model, coef=None, memory_size: int = 1100, seed: int = 0, **options):
        super().__init__(model, coef)
        self.memory_size = int(memory_size)
        self.generator = torch.Generator().manual_seed(seed)
        self.per_task: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def _memory(self):
        if not self.per_task:
            return None
        return tuple(torch.cat(parts) for parts in zip(*self.per_task))

    def training_batch(self, x, y, heads):
        memory = self._memory()
        if memory is None:
            return x, y, heads
        index = torch.randint(0, len(memory[0]), (len(x),), generator=self.generator)
        return torch.cat([x, memory[0][index]]), torch.cat([y, memory[1][index]]), torch.cat([heads, memory[2][index]])

    def after_task(self, task_index, batches, loss_fn):
        xs, ys, hs = zip(*batches())
        x, y, heads = torch.cat(xs), torch.cat(ys), torch.cat(hs)
        self.per_task.append((x, y, heads))
        quota = self.memory_size // len(self.per_task)
        kept = []
        for tx, ty, th in self.per_task:
            order = torch.randperm(len(tx), generator=self.generator)[:quota]
            kept.append((tx[order], ty[order], th[order]))
        self.per_task = kept

    def state_dict(self):
        return {"per_task": self.per_task, "generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.per_task = state["per_task"]
        self.generator.set_state(state["generator"])
