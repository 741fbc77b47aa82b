"""L2: pull every parameter towards its value after the previous task (identity importance)."""

from __future__ import annotations

import torch

from .base import QuadraticPenalty, parameters_of


class L2(QuadraticPenalty):
    name = "l2"
    default_coef = 0.5      # R1 protocol
    online = True

    def importance(self, batches, loss_fn):
        return {n: torch.ones_like(p) for n, p in parameters_of(self.model).items()}

    def after_task(self, task_index, batches, loss_fn):
        # One term: anchor at the latest parameters, importance stays 1 (not accumulated).
        anchor = {n: p.detach().clone() for n, p in parameters_of(self.model).items()}
        self.terms = [{"importance": self.importance(batches, loss_fn), "anchor": anchor}]
