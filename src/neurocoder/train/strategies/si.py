"""Synaptic Intelligence (Zenke et al. 2017): importance from each parameter's contribution to the
drop in loss along its training path, ``omega += w / (delta^2 + xi)``.

The path integral needs the gradient of the task loss alone; since the penalty is quadratic its
gradient is known, and is subtracted from the total gradient instead of a second backward pass.
"""

from __future__ import annotations

import torch

from .base import QuadraticPenalty, parameters_of


class SI(QuadraticPenalty):
    name = "si"
    default_coef = 3000.0   # as Hsu et al.'s split-MNIST scripts (the source of R2's SI numbers)
    online = True
    damping = 0.1

    def __init__(self, model, coef=None, **options):
        super().__init__(model, coef)
        params = parameters_of(model)
        self.path = {n: torch.zeros_like(p) for n, p in params.items()}
        self.start = {n: p.detach().clone() for n, p in params.items()}
        self.previous = None

    def before_step(self) -> None:
        self.previous = {n: p.detach().clone() for n, p in parameters_of(self.model).items()}
        grads = {}
        term = self.terms[0] if self.terms else None
        for n, p in parameters_of(self.model).items():
            if p.grad is None:
                continue
            grad = p.grad.detach()
            if term is not None:
                grad = grad - 2 * self.coef * term["importance"][n] * (p.detach() - term["anchor"][n])
            grads[n] = grad
        self.task_grads = grads

    def after_step(self) -> None:
        for n, p in parameters_of(self.model).items():
            if n in self.task_grads:
                self.path[n] -= self.task_grads[n] * (p.detach() - self.previous[n])

    def after_task(self, task_index, batches, loss_fn):
        params = parameters_of(self.model)
        old = self.terms[0]["importance"] if self.terms else {n: torch.zeros_like(p) for n, p in params.items()}
        reference = self.terms[0]["anchor"] if self.terms else self.start
        importance = {n: old[n] + self.path[n] / ((p.detach() - reference[n]) ** 2 + self.damping)
                      for n, p in params.items()}
        self.terms = [{"importance": importance, "anchor": {n: p.detach().clone() for n, p in params.items()}}]
        for w in self.path.values():
            w.zero_()

    def state_dict(self):
        return {"terms": self.terms, "path": self.path, "start": self.start}

    def load_state_dict(self, state):
        self.terms, self.path, self.start = state["terms"], state["path"], state["start"]
