"""EWC (Kirkpatrick et al. 2017): a diagonal Fisher per task, one penalty term per task.

The Fisher is estimated as Hsu et al.'s benchmark code does: squared mini-batch gradients of the
loss on the model's own predicted labels, over one pass of the task's training data.
"""

from __future__ import annotations

import torch

from .base import QuadraticPenalty, parameters_of


def diagonal_fisher(model, batches, loss_fn) -> dict[str, torch.Tensor]:
    params = parameters_of(model)
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    was_training = model.training
    model.eval()
    batch_list = list(batches())
    total = sum(len(b[0]) for b in batch_list)
    for x, y, heads in batch_list:
        model.zero_grad(set_to_none=True)
        loss_fn(x, y, heads, targets="predicted").backward()
        for n, p in params.items():
            if p.grad is not None:
                fisher[n] += p.grad.detach() ** 2 * len(x) / total
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return fisher


class EWC(QuadraticPenalty):
    name = "ewc"
    default_coef = 100.0    # R1 protocol
    online = False

    def importance(self, batches, loss_fn):
        return diagonal_fisher(self.model, batches, loss_fn)
