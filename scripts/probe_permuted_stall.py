"""Why the released Neurocoder MLP stops learning permuted MNIST under online EWC: a diagnostic.

    python scripts/probe_permuted_stall.py [--model neurocoder-released] [--tasks 3] [--repeat 1]
        [--every 200] [--last-every N] [--last-steps N] [--freeze-after-first SUBSTRING ...]
        [--fisher-scale SUBSTRING=FACTOR ...] [--set key=value ...] [--out FILE.jsonl]
        (--set reset_optimizer=true: a fresh optimiser at every task after the first)

Trains one repeat of the `permuted-mnist` preset (online EWC, R1's Fisher and lambda, the
released code's Fisher with the orthogonality loss) through the continual trainer's own repeat,
and every ``--every`` steps logs: the cross-entropy, orthogonality loss and EWC penalty, the
norms of their gradients per layer, the mean size of Adam's last step per tensor (in units of the
learning rate), the fraction of dead hidden units (zero on every image of a
batch of the current task), each Neurocoder layer's mean singular value and the effective rank
of the weight it composes, the parameter tensors that moved most since the task began, and the
test accuracy on every task. At the start of each later task it logs the accumulated Fisher per
parameter tensor. One JSON object per line, printed and written to ``--out``.
``--set benchmark=split-mnist`` (or any other continual-learning setting) runs that instead.
A tool for one question (README, permuted MNIST), not part of any experiment's results.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import neurocoder  # noqa: E402
from neurocoder.experiments.registry import apply_overrides  # noqa: E402
from neurocoder.train.continual import (ContinualConfig, _batches, _Repeat, _steps_per_task,  # noqa: E402
                                       build_stream)


def _number(value) -> float:
    """A loss term as a float: a tensor (detached) or the 0.0 a strategy gives before its first task."""
    return value.detach().item() if isinstance(value, torch.Tensor) else float(value)


def grad_norms(model, loss) -> dict[str, float]:
    """Norm of d loss / d parameters, per top-level layer name (body.0, body.2, heads.0)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True, retain_graph=True)
    sums: dict[str, float] = {}
    for (name, _), grad in zip(params, grads):
        if grad is not None:
            layer = ".".join(name.split(".")[:2])
            sums[layer] = sums.get(layer, 0.0) + grad.pow(2).sum().item()
    return {k: math.sqrt(v) for k, v in sums.items()}


@torch.no_grad()
def inspect(model, x) -> dict:
    """On the batch x: dead and active hidden units, the spread of the logits across images, and
    per Neurocoder layer the mean singular value and the effective rank of the composed weight."""
    hidden1 = torch.relu(model.body[0](x))
    hidden2 = torch.relu(model.body[2](hidden1))
    out = {"dead_1": (hidden1.amax(0) <= 0).float().mean().item(),
           "dead_2": (hidden2.amax(0) <= 0).float().mean().item(),
           "active_1": (hidden1 > 0).float().mean().item(), "active_2": (hidden2 > 0).float().mean().item(),
           "logit_std": model.heads[0](hidden2).std(0).mean().item()}
    for name, layer, inputs in (("body.0", model.body[0], x), ("body.2", model.body[2], hidden1),
                                ("heads.0", model.heads[0], hidden2)):
        if isinstance(layer, neurocoder.NeurocoderLinear):
            _, trace = layer(inputs, return_trace=True)
            out[f"sigma_{name}"] = trace.sigma.mean().item()
            # Effective rank (exp of the entropy of the normalised singular values) of the weight
            # composed for each of 16 images: R = 10 if the components are all distinct, 1 if they
            # all read the same mixture of slots.
            singular = torch.linalg.svdvals(layer.compose_weight(inputs[:16]))             # (16, min(d_in, d_out))
            share = singular / singular.sum(-1, keepdim=True)
            out[f"weight_rank_{name}"] = torch.exp(-(share * share.clamp_min(1e-12).log()).sum(-1)).mean().item()
    return out


@torch.no_grad()
def adam_steps(optimizer) -> dict[str, float]:
    """Per parameter tensor, the mean size of Adam's last step in units of the learning rate:
    |m_hat| / (sqrt(v_hat) + eps), bias-corrected as Adam applies it. About 1 where gradients
    are steady; well above 1 where they grew faster than the slow second moment followed."""
    if not isinstance(optimizer, torch.optim.Adam):
        return {}
    (beta1, beta2), eps = optimizer.defaults["betas"], optimizer.defaults["eps"]
    out = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not p.requires_grad or not state or "exp_avg" not in state:   # frozen, or no step yet
                continue
            t = float(state["step"])
            m_hat = state["exp_avg"] / (1 - beta1 ** t)
            v_hat = state["exp_avg_sq"] / (1 - beta2 ** t)
            out[id(p)] = (m_hat.abs() / (v_hat.sqrt() + eps)).mean().item()
    return out


def main(argv: list[str] | None = None) -> _Repeat:
    """Run the probe; returns the trained repeat (its model, optimiser and strategy) for inspection."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="neurocoder-released")
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--every", type=int, default=200)
    parser.add_argument("--last-every", type=int, default=None,
                        help="log this often during the last task instead (default: --every)")
    parser.add_argument("--last-steps", type=int, default=None, help="stop the last task after this many steps")
    parser.add_argument("--freeze-after-first", nargs="*", default=[], metavar="SUBSTRING",
                        help="after the first task, stop training every parameter whose name contains one of "
                             "these (e.g. key_map s_keys: the content-key maps and the S bank's keys)")
    parser.add_argument("--fisher-scale", nargs="*", default=[], metavar="SUBSTRING=FACTOR",
                        help="multiply each task's Fisher of the parameters whose name contains SUBSTRING by "
                             "FACTOR before it joins the penalty (e.g. composer=30: a penalty weighted towards "
                             "the composers)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = apply_overrides(ContinualConfig(benchmark="permuted-mnist", strategy="online-ewc", model=args.model,
                                          num_tasks=args.tasks, importance_with_orthogonality=True), args.set)
    cfg = cfg.resolved()
    cfg.check()
    # As run_continual: every repeat of permuted MNIST draws permutations of its own.
    stream, data_info = build_stream(cfg, cfg.seed * 1000 + args.repeat)
    rep = _Repeat(cfg, stream, args.repeat)
    if args.fisher_scale:
        try:
            scales = [(text.split("=")[0], float(text.split("=")[1])) for text in args.fisher_scale]
        except (IndexError, ValueError):
            parser.error(f"--fisher-scale takes SUBSTRING=FACTOR pairs (e.g. composer=30), got {args.fisher_scale}")
        importance = rep.strategy.importance

        def scaled_importance(batches, loss_fn):
            fisher = importance(batches, loss_fn)
            for name in fisher:
                for substring, factor in scales:
                    if substring in name:
                        fisher[name] = fisher[name] * factor
            return fisher

        rep.strategy.importance = scaled_importance
    steps_per_task = _steps_per_task(cfg, stream, data_info)
    log = open(args.out, "w") if args.out else None
    for task_index in range(args.tasks):
        task = stream.tasks[task_index]
        probe_x = task.test_x[:512]
        torch.manual_seed(rep.seed * 100 + task_index)
        generator = torch.Generator().manual_seed(rep.seed * 100 + task_index)
        heads = rep.heads_for(task_index, len(task.train_y))
        rep.model.train()
        rep.begin_task(task_index)
        last = task_index == args.tasks - 1
        steps = steps_per_task[task_index]
        every = args.last_every if last and args.last_every else args.every
        task_start = {n: p.detach().clone() for n, p in rep.model.named_parameters()}
        terms = getattr(rep.strategy, "terms", None)
        if terms:
            # The accumulated Fisher per parameter tensor: its mean and largest entry.
            fisher = {n: {"mean": f.mean().item(), "max": f.max().item()} for n, f in terms[0]["importance"].items()}
            record = {"task": task_index + 1, "fisher": fisher}
            print(json.dumps(record))
            if log:
                log.write(json.dumps(record) + "\n")
        for step, (x, y, h) in enumerate(_batches(task.train_x, task.train_y, heads, cfg.batch_size, steps,
                                                  generator)):
            if last and args.last_steps is not None and step == args.last_steps:
                break
            cross_entropy = rep.loss(x, y, h)
            orthogonality = rep.regularization(h)
            task_loss = cross_entropy + orthogonality
            penalty = rep.strategy.penalty()
            if step % every == 0 or step == steps - 1:
                record = {"task": task_index + 1, "step": step, "cross_entropy": cross_entropy.item(),
                          "orthogonality": _number(orthogonality),
                          "penalty": _number(penalty)}
                if isinstance(penalty, torch.Tensor) and penalty.requires_grad:
                    record["grad_penalty"] = grad_norms(rep.model, penalty)
                record["grad_task"] = grad_norms(rep.model, task_loss)
                record.update(inspect(rep.model, probe_x))
                # Which parameter tensors moved most since the task began (relative change).
                moved = {n: ((p.detach() - task_start[n]).norm() / task_start[n].norm().clamp_min(1e-12)).item()
                         for n, p in rep.model.named_parameters()}
                record["moved_most"] = dict(sorted(moved.items(), key=lambda kv: -kv[1])[:6])
                steps_by_id = adam_steps(rep.optimizer)
                record["adam_step"] = {n: steps_by_id[id(p)] for n, p in rep.model.named_parameters()
                                       if id(p) in steps_by_id}
                record["accuracy"] = rep.evaluate()
                print(json.dumps(record))
                if log:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
            loss = task_loss + penalty
            rep.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            rep.strategy.before_step()
            rep.optimizer.step()
            rep.strategy.after_step()
        rep.next_task = task_index + 1

        def task_batches(task=task, task_index=task_index):
            g = torch.Generator().manual_seed(rep.seed * 100 + task_index + 50)
            n = len(task.train_y)
            yield from _batches(task.train_x, task.train_y, rep.heads_for(task_index, n), cfg.batch_size,
                                math.ceil(n / cfg.batch_size), g)

        def loss_fn(x, y, heads, targets=None):
            return rep.loss(x, y, heads, targets) + rep.regularization(heads)

        rep.strategy.after_task(task_index, task_batches, loss_fn)
        if task_index == 0 and args.freeze_after_first:
            frozen = [n for n, p in rep.model.named_parameters() if any(s in n for s in args.freeze_after_first)]
            for n, p in rep.model.named_parameters():
                if n in frozen:
                    p.requires_grad_(False)      # no gradient: Adam skips it
            print(json.dumps({"frozen_after_task_1": frozen}))
    if log:
        log.close()
    return rep


if __name__ == "__main__":
    main()
