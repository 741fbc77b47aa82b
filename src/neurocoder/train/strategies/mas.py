"""Memory Aware Synapses (Aljundi et al. 2018): importance = mean absolute gradient of the squared
output norm, accumulated over tasks; unsupervised (no labels)."""

from __future__ import annotations

import torch

from .base import QuadraticPenalty, parameters_of


class MAS(QuadraticPenalty):
    name = "mas"
    default_coef = 10.0     # our choice, stated in the README
    online = True

    def importance(self, batches, loss_fn):
        params = parameters_of(self.model)
        importance = {n: torch.zeros_like(p) for n, p in params.items()}
        was_training = self.model.training
        self.model.eval()
        batch_list = list(batches())
        for x, y, heads in batch_list:
            self.model.zero_grad(set_to_none=True)
            self.model(x, heads).pow(2).mean().backward()
            for n, p in params.items():
                if p.grad is not None:
                    importance[n] += p.grad.detach().abs() / len(batch_list)
        self.model.zero_grad(set_to_none=True)
        self.model.train(was_training)
        return importance
