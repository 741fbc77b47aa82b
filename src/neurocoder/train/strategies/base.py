"""What every continual-learning strategy can hook into.

The trainer calls, for each task: ``before_task``; for each step ``training_batch`` (may add
replayed samples), ``penalty`` (added to the loss), ``before_step`` (after backward) and
``after_step`` (after ``optimizer.step()``); and ``after_task`` once the task is learnt. ``state_dict`` /
``load_state_dict`` carry everything a resumed run needs.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn


def parameters_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


class Strategy:
    name = "naive"
    default_coef = 0.0
    joint = False          # the offline upper bound trains on all tasks at once

    def __init__(self, model: nn.Module, coef: float | None = None, **options) -> None:
        self.model = model
        self.coef = self.default_coef if coef is None else float(coef)

    def before_task(self, task_index: int) -> None:
        pass

    def training_batch(self, x: torch.Tensor, y: torch.Tensor, heads: torch.Tensor) -> tuple:
        return x, y, heads

    def penalty(self) -> torch.Tensor | float:
        return 0.0

    def before_step(self) -> None:
        """After backward, before ``optimizer.step()``."""

    def after_step(self) -> None:
        pass

    def after_task(self, task_index: int, batches: Callable, loss_fn: Callable) -> None:
        """``batches()`` yields (x, y, heads) over the task's training data (batch 128);
        ``loss_fn(x, y, heads, targets=None)`` is the task loss; ``targets`` replace y: a tensor of
        labels, or ``"predicted"`` for the model's own most likely labels among the outputs the
        loss covers (in class-incremental training, the classes seen so far)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class QuadraticPenalty(Strategy):
    """``coef * sum_terms sum_params importance * (p - anchor)^2`` (as Hsu et al.'s code: no 1/2).

    ``online`` keeps one term (importance accumulated, anchor = latest parameters); otherwise
    every task adds its own term.
    """

    online = True

    def __init__(self, model: nn.Module, coef: float | None = None, **options) -> None:
        super().__init__(model, coef)
        self.terms: list[dict[str, dict[str, torch.Tensor]]] = []

    def importance(self, batches: Callable, loss_fn: Callable) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def penalty(self) -> torch.Tensor | float:
        if not self.terms:
            return 0.0
        params = parameters_of(self.model)
        total = 0.0
        for term in self.terms:
            for name, p in params.items():
                total = total + (term["importance"][name] * (p - term["anchor"][name]) ** 2).sum()
        return self.coef * total

    def after_task(self, task_index: int, batches: Callable, loss_fn: Callable) -> None:
        new = self.importance(batches, loss_fn)
        anchor = {n: p.detach().clone() for n, p in parameters_of(self.model).items()}
        if self.online and self.terms:
            old = self.terms[0]["importance"]
            self.terms[0] = {"importance": {n: old[n] + new[n] for n in new}, "anchor": anchor}
        else:
            self.terms.append({"importance": new, "anchor": anchor})

    def state_dict(self) -> dict:
        return {"terms": self.terms}

    def load_state_dict(self, state: dict) -> None:
        self.terms = state["terms"]
