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
    # True where the trainer adds the penalty's gradient with add_penalty_gradient() after backward
    # instead of backpropagating penalty() (QuadraticPenalty).
    adds_penalty_gradient = False

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

    The terms are applied in one combined form, over all parameters flattened into one vector:
    ``sum_t F_t (p - a_t)^2 = F (p - c)^2 + k`` with ``F = sum_t F_t``, the importance-weighted
    centre ``c = sum_t F_t a_t / F`` and the constant ``k = sum_t F_t (c - a_t)^2``. Its gradient,
    ``2 F (p - c) = 2 sum_t F_t (p - a_t)``, is the per-term sum's; the value too, up to rounding.
    Per term and per parameter tensor (:func:`per_term_penalty`) the penalty costs ~9 small
    operations per tensor and term each step, most of an EWC step's time on these models
    (``benchmarks/bench_strategies.py``); one term (online EWC, L2, SI) is applied exactly as its
    per-term form.
    """

    online = True

    def __init__(self, model: nn.Module, coef: float | None = None, **options) -> None:
        super().__init__(model, coef)
        self.terms: list[dict[str, dict[str, torch.Tensor]]] = []
        self._combined_for: list = []      # the term dicts the combined form was built from
        self._combined: tuple | None = None

    def importance(self, batches: Callable, loss_fn: Callable) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def combined(self) -> tuple[list[str], torch.Tensor, torch.Tensor, float]:
        """``(names, F, c, k)``: parameter names in flattening order, total importance and centre
        as flat vectors (sum of the parameters' sizes,), and the constant ``k``.

        Rebuilt whenever ``terms`` holds other term dicts than last time (strategies replace a
        term's dict, never edit it in place); the old dicts are kept referenced until then, so a
        new dict cannot reuse an old one's identity.
        """
        if self._combined is None or len(self._combined_for) != len(self.terms) or any(
                a is not b for a, b in zip(self._combined_for, self.terms)):
            params = parameters_of(self.model)
            names = list(params)

            def flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
                missing = [n for n in names if n not in tensors]
                if missing:
                    raise ValueError(f"{type(self).__name__}: the penalty terms hold no value for parameters {missing}; "
                                     f"they were recorded for another model")
                reshaped = [n for n in names if tensors[n].shape != params[n].shape]
                if reshaped:
                    n = reshaped[0]
                    raise ValueError(f"{type(self).__name__}: parameter {n!r} has shape {tuple(params[n].shape)} but its "
                                     f"penalty terms were recorded at {tuple(tensors[n].shape)} (a memory grown since?); "
                                     f"a quadratic penalty needs the parameters' shapes fixed across tasks")
                return torch.cat([tensors[n].detach().reshape(-1) for n in names])

            importances = [flat(t["importance"]) for t in self.terms]
            anchors = [flat(t["anchor"]) for t in self.terms]
            if len(self.terms) == 1:
                total, centre, constant = importances[0], anchors[0], 0.0
            else:
                total = torch.stack(importances).sum(0)
                weighted = torch.stack([f * a for f, a in zip(importances, anchors)]).sum(0)
                # Where no term gives any importance the centre is irrelevant (F = 0): the latest anchor.
                centre = torch.where(total > 0, weighted / total.where(total > 0, torch.ones_like(total)), anchors[-1])
                constant = float(sum((f.double() * (centre.double() - a.double()) ** 2).sum()
                                     for f, a in zip(importances, anchors)))
            self._combined = (names, total, centre, constant)
            self._combined_for = list(self.terms)
            # Per-tensor views of F and c in flattening order, for add_penalty_gradient.
            sizes = [params[n].numel() for n in names]
            self._views = tuple([part.view(params[n].shape) for n, part in zip(names, flat_tensor.split(sizes))]
                                for flat_tensor in (total, centre))
        return self._combined

    def penalty(self) -> torch.Tensor | float:
        if not self.terms:
            return 0.0
        names, total, centre, constant = self.combined()
        params = parameters_of(self.model)
        flat = torch.cat([params[n].reshape(-1) for n in names])
        return self.coef * ((total * (flat - centre) ** 2).sum() + constant)

    adds_penalty_gradient = True

    def add_penalty_gradient(self, value: bool = False) -> float | None:
        """Add the penalty's gradient, ``2 coef F (p - c)``, to every parameter's ``.grad`` in place.

        The same gradient as backpropagating :meth:`penalty` (to rounding; tested), without its
        autograd graph (a flat copy of every parameter, its elementwise passes and the split of its
        gradient back into each tensor); the step's time is compared in ``benchmarks/bench_strategies.py``. Call it after the task loss's backward and before
        :meth:`before_step` (SI reads the gradients there, the penalty's included). Returns the
        penalty's value when ``value`` is True (the progress bar shows the whole loss), else None.
        """
        if not self.terms:
            return 0.0 if value else None
        names, _, _, constant = self.combined()
        importances, centres = self._views
        params = parameters_of(self.model)
        tensors = [params[n] for n in names]
        with torch.no_grad():
            for p in tensors:
                if p.grad is None:     # a parameter the task loss did not reach
                    p.grad = torch.zeros_like(p)
            differences = torch._foreach_sub(tensors, centres)
            torch._foreach_addcmul_([p.grad for p in tensors], importances, differences, value=2 * self.coef)
            if not value:
                return None
            return self.coef * (sum(float((f * d * d).sum()) for f, d in zip(importances, differences)) + constant)

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


def per_term_penalty(strategy: QuadraticPenalty) -> torch.Tensor | float:
    """The penalty written term by term and tensor by tensor, as it reads (and as this project
    computed it before session 12): the reference :meth:`QuadraticPenalty.penalty` is tested
    and benchmarked against."""
    if not strategy.terms:
        return 0.0
    total = 0.0
    for term in strategy.terms:
        for name, p in parameters_of(strategy.model).items():
            total = total + (term["importance"][name] * (p - term["anchor"][name]) ** 2).sum()
    return strategy.coef * total
