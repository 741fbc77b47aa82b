"""Memory Aware Synapses (Aljundi et al. 2018): importance = mean absolute gradient of the squared
output norm, accumulated over tasks; unsupervised (no labels)."""

from __future__ import annotations

import torch

from .base import QuadraticPenalty, parameters_of


class MAS(QuadraticPenalty):
    name = "mas"
    # Hsu et al.'s split-MNIST scripts (the source of R2's MAS numbers), with the same importance
    # (mean |gradient| of the mean squared output over the batches); until session 12 this project
    # used 10, its own untuned choice (--set coef=10 reproduces those runs).
    default_coef = 10000.0
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
