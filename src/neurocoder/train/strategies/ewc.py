"""EWC (Kirkpatrick et al. 2017): a diagonal Fisher per task, one penalty term per task.

The Fisher is estimated as Hsu et al.'s benchmark code does (the code behind R1's numbers and its
lambdas): squared mini-batch gradients of the loss on the model's own predicted labels, over one
pass of the task's training data, each weighted by its batch size over the number of batches
(``average='batches'``), so the sum is about batch size x the mean squared mini-batch gradient.
``average='samples'`` weights by batch size over the number of samples (the plain mean; what
this project did before session 11): a Fisher smaller by the batch size (128), i.e. a lambda 128x weaker.
"""

from __future__ import annotations

import torch

from .base import QuadraticPenalty, parameters_of


FISHER_AVERAGES = ("batches", "samples")


def diagonal_fisher(model, batches, loss_fn, average: str = "batches") -> dict[str, torch.Tensor]:
    """Squared mini-batch gradients, each times len(batch) / (number of batches | of samples)."""
    if average not in FISHER_AVERAGES:
        raise ValueError(f"fisher average {average!r} unknown; choose one of {list(FISHER_AVERAGES)}")
    params = parameters_of(model)
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    was_training = model.training
    model.eval()
    batch_list = list(batches())
    total = len(batch_list) if average == "batches" else sum(len(b[0]) for b in batch_list)
    for x, y, heads in batch_list:
        model.zero_grad(set_to_none=True)
        loss_fn(x, y, heads, targets="predicted").backward()
        reached = [n for n, p in params.items() if p.grad is not None]
        grads = [params[n].grad.detach() for n in reached]
        # One fused multiply-add per tensor (fisher += g * g * weight) rather than three passes.
        torch._foreach_addcmul_([fisher[n] for n in reached], grads, grads, value=len(x) / total)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return fisher


class EWC(QuadraticPenalty):
    name = "ewc"
    default_coef = 100.0    # R1 protocol
    online = False

    def __init__(self, model, coef=None, fisher_average: str = "batches", **options) -> None:
        super().__init__(model, coef, **options)
        self.fisher_average = fisher_average

    def importance(self, batches, loss_fn):
        return diagonal_fisher(self.model, batches, loss_fn, self.fisher_average)
