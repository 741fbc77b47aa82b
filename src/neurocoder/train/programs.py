"""The synthetic-program trainer: one task, one model, several seeds, one run folder.

Tasks (``PROGRAM_TASKS``; generators in :mod:`neurocoder.data.programs`):

* ``modular``: K hidden regimes with programs of their own; the regime is inferable from the
  input only. Measures: relative test error (MSE / mean square of the target), and the normalised
  mutual information between the hidden regime and the slot each sample read most.
* ``reuse``: programs are sums of 2 of 6 shared rank-1 pieces named by a cue (the context);
  5 of the 15 combinations are never trained on. Measures: relative error on seen and unseen
  combinations; the cosine similarity of the mean reads of combination pairs that share a piece
  versus pairs that share none.
* ``shift``: an online stream (one update per step, on a batch of 16 parallel sequences) whose
  program switches every 300 steps, cycling through 3 programs three times. Input: the current
  state (``shift_input``); context: the last 3 states (``shift_context``). Measures: the error
  just after each switch, the recovery time (steps until the 10-step moving average of the
  relative error falls below 0.1), for first appearances and for recurrences of a program.
* ``remember``: learn program A, then B (inputs from separate clusters); the error on A before
  and after learning B.

Seeds: seed index i of a run made with ``--set seed=S`` initialises the model from seed
``1000 S + i`` and trains on task ``task_seed(S, i) = 100 + 1000 S + i``; every model run with the
same S sees the same tasks. (Before session 23 the task was ``100 + i`` whatever S, so runs made
with another S repeated tasks 100, 101, ... with other initial weights.)

Run folder: ``config.json``, ``seeds/seed-NN.json`` (each finished seed, with its ``seed`` and
``task_seed``; a resumed run skips them; each seed takes seconds to a minute, so it is the unit of
resumption), ``results.json``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from neurocoder.data.programs import modular_task, remember_task, reuse_task, shift_stream
from neurocoder.experiments.program_models import (PROGRAM_MODELS, build_program_model, parameter_groups,
                                                   regularization, routing_maps, routing_parameters)
from neurocoder.runs import atomic_write_text, changed_settings, finished_seeds, start_seeded_run

__all__ = ["ProgramConfig", "run_programs", "PROGRAM_TASKS", "normalised_mutual_information", "task_seed", "shift_context",
           "shift_fit", "shift_inputs"]

PROGRAM_TASKS = {
    "modular": "K hidden regimes, each with its own low-rank program; regime inferable from the input",
    "reuse": "programs built from shared rank-1 pieces named by a cue; unseen combinations at test",
    "shift": "online auto-regression whose program switches every 300 steps; programs recur",
    "remember": "learn program A, then B; error on A afterwards",
}
ONLINE_OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}
RECOVERY_THRESHOLD = 0.1     # relative error a model must get back under after a switch
RECOVERY_SMOOTHING = 10      # steps in the moving average
SHIFT_CONTEXTS = ("states", "transitions", "fit", "fit-pooled", "fit-pooled-affine", "cue", "states+cue")
SHIFT_INPUTS = ("state", "history")


@dataclass
class ProgramConfig:
    task: str = "modular"
    model: str = "nc-ff"
    seeds: int = 5
    seed: int = 0
    epochs: int = 60                 # modular, reuse; remember: per program
    batch_size: int = 64
    lr: float = 3e-3
    online_lr: float = 1e-2          # shift: the learning rate of the online updates
    online_optimizer: str = "adam"   # shift: 'adam' or 'sgd' (plain SGD: a slot nobody reads gets ~no update)
    shift_centre_spread: float = 0.0  # shift: > 0 gives each program a centre of its own (see shift_stream)
    # shift: the optimiser of the parameters that choose what is read (routing_parameters: the
    # composer and keys; the MLP's hidden layer as the control), 'same' as online_optimizer or
    # one of ONLINE_OPTIMIZERS; at online_lr x routing_lr_scale. E.g. plain SGD for the stored
    # programs (a slot nobody reads gets no update) with Adam for the routing, whose gradients
    # under SGD are too small to tell programs apart.
    routing_optimizer: str = "same"
    # shift: what the context (the composer's input; the MLP's extra input) holds: 'states', the
    # last states; or 'transitions', the sum over successive pairs of x_{t+1} x_t^T (d x d), whose
    # expectation over states on the sphere is the running program up to a scale: a context that
    # names the program on the default stream, where the states alone do not (see shift_context).
    # 'cue': a one-hot of the program that made the target (the stream names its program, as the
    # reuse task's cue names its pieces); 'states+cue': the last states and the cue. A probe that
    # separates telling programs apart from keeping them (see docs/notes/programs.md, session 31).
    # 'fit': the linear map x_{t+1} = M x_t fitted by ridge least squares to the window's
    # successive pairs (d x d), read off the observed states only, unlike the cue: on the default
    # stream with shift_history > d + 1 it is the running program to a few per cent (shift_fit).
    # 'fit-pooled': one such map fitted to the pairs of every sequence of the batch together (the
    # 16 parallel sequences of a step share their program), the same for each sequence: with 16
    # pairs even a window of 2 states fixes the 4 x 4 map, one step after a switch.
    # 'fit-pooled-affine': the same with an offset, x_{t+1} = M x_t + b (d x d + d), for the
    # streams with centres, where each program is affine (b = (I - A_k) c_k).
    shift_context: str = "states"
    # shift: how many of the latest states the window holds (the 'states' context and the
    # 'history' input; the pairs 'transitions' and 'fit' read).
    shift_history: int = 3
    # shift: the layer's input: 'state', the current state (d); 'history', the last states
    # (history x d, the same states the default context holds). shift_input_constant appends a
    # constant 1 to it, so that a composed weight can carry a program's own offset (with centres,
    # x_{t+1} = A_k x_t + (I - A_k) c_k is affine; a layer's bias is shared by every program).
    shift_input: str = "state"
    shift_input_constant: bool = False
    # The learning rate of the parameters that choose what is read (composer and keys; NSM's query
    # and keys; MoE's gate; the MLP's hidden layer as a control), relative to the rest.
    routing_lr_scale: float = 1.0
    # An L1 penalty (this weight times the sum of absolute values) on the weight matrices that map
    # the input or context to the read (``routing_maps``): sparse routing, each read choice
    # depending on few inputs (a probe for reuse, where a component should follow one cue entry).
    routing_l1: float = 0.0
    orthogonality_weight: float = 0.1
    nc_options: dict | None = None   # Neurocoder layer options (NC_OPTIONS otherwise)
    threads: int | None = None

    def check(self) -> None:
        problems = []
        if self.task not in PROGRAM_TASKS:
            problems.append(f"task={self.task!r} (choose {sorted(PROGRAM_TASKS)})")
        if self.model not in PROGRAM_MODELS:
            problems.append(f"model={self.model!r} (choose {sorted(PROGRAM_MODELS)})")
        if self.online_optimizer not in ONLINE_OPTIMIZERS:
            problems.append(f"online_optimizer={self.online_optimizer!r} (choose {sorted(ONLINE_OPTIMIZERS)})")
        if self.routing_optimizer != "same" and self.routing_optimizer not in ONLINE_OPTIMIZERS:
            problems.append(f"routing_optimizer={self.routing_optimizer!r} (choose 'same' or one of "
                            f"{sorted(ONLINE_OPTIMIZERS)})")
        if not self.routing_lr_scale >= 0:
            problems.append(f"routing_lr_scale={self.routing_lr_scale} (must be >= 0)")
        if not self.routing_l1 >= 0:
            problems.append(f"routing_l1={self.routing_l1} (must be >= 0)")
        if not self.shift_centre_spread >= 0:
            problems.append(f"shift_centre_spread={self.shift_centre_spread} (must be >= 0)")
        if self.shift_context not in SHIFT_CONTEXTS:
            problems.append(f"shift_context={self.shift_context!r} (choose {sorted(SHIFT_CONTEXTS)})")
        if self.shift_input not in SHIFT_INPUTS:
            problems.append(f"shift_input={self.shift_input!r} (choose {sorted(SHIFT_INPUTS)})")
        if not (isinstance(self.shift_history, int) and self.shift_history >= 2):
            problems.append(f"shift_history={self.shift_history!r} (must be an integer >= 2: the window needs one "
                            f"pair of successive states)")
        # Settings the chosen task never reads: refused, so a run folder never records one as if
        # it had applied.
        if self.task != "shift":
            ignored = changed_settings(self, ("online_lr", "online_optimizer", "shift_centre_spread", "shift_context",
                                              "shift_history", "shift_input", "shift_input_constant",
                                              "routing_optimizer"))
            if ignored:
                problems.append(f"{ignored} set for task={self.task!r}: these settings apply to the online "
                                f"stream of task 'shift' only (drop them, or use program-shift)")
        elif ignored := changed_settings(self, ("epochs", "batch_size", "lr")):
            problems.append(f"{ignored} set for task='shift', which learns online, one update per "
                            f"step (its learning rate is online_lr; drop them)")
        for name in ("seeds", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} (must be >= 1)")
        for name in ("lr", "online_lr"):
            if not getattr(self, name) > 0:
                problems.append(f"{name}={getattr(self, name)} (must be > 0)")
        if problems:
            raise ValueError("bad config: " + "; ".join(problems))


def normalised_mutual_information(a: torch.Tensor, b: torch.Tensor) -> float:
    """NMI of two labelings (N,), arithmetic normalisation: I(a; b) / ((H(a) + H(b)) / 2).
    1 when each labeling determines the other, 0 when independent."""
    a = torch.unique(a, return_inverse=True)[1]
    b = torch.unique(b, return_inverse=True)[1]
    joint = torch.zeros(int(a.max()) + 1, int(b.max()) + 1, dtype=torch.float64)
    joint.index_put_((a, b), torch.ones(len(a), dtype=torch.float64), accumulate=True)
    joint /= joint.sum()
    pa, pb = joint.sum(1), joint.sum(0)
    nz = joint > 0
    mutual = (joint[nz] * (joint[nz] / (pa[:, None] * pb[None, :])[nz]).log()).sum().item()
    entropy = lambda p: -(p[p > 0] * p[p > 0].log()).sum().item()
    denominator = (entropy(pa) + entropy(pb)) / 2
    return mutual / denominator if denominator > 0 else 1.0


def _relative_error(model, data) -> float:
    with torch.no_grad():
        prediction = model(data.x, data.context)
        return (F.mse_loss(prediction, data.y) / data.y.pow(2).mean()).item()


def _penalties(model, cfg: ProgramConfig) -> torch.Tensor:
    """What is added to the task loss: the model's regulariser (Neurocoder's orthogonality loss
    at ``orthogonality_weight``; MoE's load balancing) and the ``routing_l1`` penalty."""
    loss = regularization(model) * (cfg.orthogonality_weight if model.kind.startswith("nc") else 1.0)
    if cfg.routing_l1:
        loss = loss + cfg.routing_l1 * sum(weight.abs().sum() for weight in routing_maps(model))
    return loss


def _fit(model, data, cfg: ProgramConfig, generator: torch.Generator, optimizer=None):
    optimizer = optimizer or torch.optim.Adam(parameter_groups(model, cfg.lr, cfg.routing_lr_scale), lr=cfg.lr)
    model.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(len(data), generator=generator)
        for i in range(0, len(order), cfg.batch_size):
            batch = data.subset(order[i:i + cfg.batch_size])
            loss = F.mse_loss(model(batch.x, batch.context), batch.y)
            loss = loss + _penalties(model, cfg)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()
    return optimizer


def _usage_by(reads: torch.Tensor, labels: torch.Tensor, count: int) -> torch.Tensor:
    """(count, S): mean read per label."""
    total = torch.zeros(count, reads.shape[1]).index_add_(0, labels, reads)
    return total / torch.bincount(labels, minlength=count).clamp_min(1)[:, None]


def _modular(cfg, seed, generator) -> dict:
    task = modular_task(seed)
    model = build_program_model(cfg.model, 8, 8, None, cfg.nc_options)
    _fit(model, task["train"], cfg, generator)
    test = task["test"]
    out = {"test_error": _relative_error(model, test), "train_error": _relative_error(model, task["train"]),
           "parameters": sum(p.numel() for p in model.parameters())}
    reads = model.reads(test.x)
    if reads is not None:
        out["nmi"] = normalised_mutual_information(test.program, reads.argmax(-1))
        out["usage_by_program"] = _usage_by(reads, test.program, 4).tolist()
    return out


def _reuse(cfg, seed, generator) -> dict:
    task = reuse_task(seed)
    model = build_program_model(cfg.model, 8, 8, 6, cfg.nc_options)
    _fit(model, task["train"], cfg, generator)
    out = {"seen_error": _relative_error(model, task["test_seen"]),
           "unseen_error": _relative_error(model, task["test_unseen"]),
           "parameters": sum(p.numel() for p in model.parameters())}
    # One mean read per combination, from fresh inputs of every combination.
    combos = task["combinations"]
    x = torch.randn(len(combos) * 64, 8, generator=generator)
    which = torch.arange(len(combos)).repeat_interleave(64)
    reads = model.reads(x, task["cues"][which])
    if reads is not None:
        mean = _usage_by(reads, which, len(combos))
        unit = mean / mean.norm(dim=1, keepdim=True).clamp_min(1e-12)
        cosine = unit @ unit.T
        share, disjoint = [], []
        for i in range(len(combos)):
            for j in range(i + 1, len(combos)):
                (share if set(combos[i]) & set(combos[j]) else disjoint).append(cosine[i, j].item())
        out["similarity_sharing_a_piece"] = sum(share) / len(share)
        out["similarity_sharing_none"] = sum(disjoint) / len(disjoint)
        out["usage_by_combination"] = mean.tolist()
    return out


def shift_context(history: torch.Tensor, dim: int) -> torch.Tensor:
    """(B, H x d) flattened states, oldest first -> (B, d x d): sum over successive pairs of
    x_{t+1} x_t^T. With x_{t+1} = A x_t + noise and states spread over the sphere of radius
    sqrt(d), each term's expectation is A (E[x x^T] = I): the program, read off two states."""
    states = history.unflatten(1, (-1, dim))                                 # (B, H, d)
    return torch.einsum("bti,btj->bij", states[:, 1:], states[:, :-1]).flatten(1)


def shift_fit(history: torch.Tensor, dim: int, ridge: float = 1e-3, pooled: bool = False,
              affine: bool = False) -> torch.Tensor:
    """(B, H x d) flattened states, oldest first -> (B, d x d): the linear map M that best
    predicts each state from the one before over the window's H - 1 pairs, by ridge least squares
    (the ridge keeps it defined while H - 1 < d). Unlike the sum of products of
    ``shift_context``, this undoes the states' own correlation: on a window of H > d + 1 states
    inside one segment of the default stream (x_{t+1} = A_k x_t + noise) it is A_k to within a
    few per cent (median over the sequences of a window: about 9% at H = 5, 7% at H = 6; noise
    0.05), whatever the states happen to be. With centres the map is affine, and one sequence's
    pairs do not fix an affine fit; see ``affine`` with ``pooled``.

    ``pooled``: one map fitted to the B x (H - 1) pairs of the whole batch, returned for every
    sequence. It assumes the sequences of a batch share their program, as the shift stream's
    parallel sequences do; then B >= d pairs fix the map even with H = 2.

    ``affine``: fit x_{t+1} = M x_t + b instead and return (B, d x (d + 1)), each row of M
    followed by its entry of b: the map of a stream with centres (b = (I - A_k) c_k). Meant with
    ``pooled``: one sequence's pairs lie on an orbit around the centre and do not fix the offset."""
    states = history.unflatten(1, (-1, dim))                                 # (B, H, d)
    inputs, targets = states[:, :-1], states[:, 1:]                          # (B, H-1, d) each
    if affine:
        inputs = torch.cat([inputs, inputs.new_ones(*inputs.shape[:2], 1)], dim=2)  # (B, H-1, d+1)
    width = inputs.shape[2]
    if pooled:
        inputs, targets = inputs.reshape(1, -1, width), targets.reshape(1, -1, dim)  # (1, B(H-1), .)
    gram = inputs.transpose(1, 2) @ inputs + ridge * torch.eye(width, dtype=states.dtype, device=states.device)
    fitted = torch.linalg.solve(gram, inputs.transpose(1, 2) @ targets)      # (B or 1, d(+1), d): [M b]^T
    return fitted.transpose(1, 2).flatten(1).expand(states.shape[0], dim * width)


def shift_inputs(history: torch.Tensor, program: int, dim: int, num_programs: int, cfg: "ProgramConfig"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's input and context at one step of the shift stream.

    history: (B, H x d) the last H states, oldest first; program: the index of the program that
    makes the target. Returns (input (B, d or H x d, + 1 with shift_input_constant), context
    (B, H x d states, d x d transitions, d x d fit or fit-pooled, d x (d + 1) fit-pooled-affine,
    K cue, or H x d + K states+cue))."""
    batch = history.shape[0]
    layer_input = history if cfg.shift_input == "history" else history[:, -dim:]
    if cfg.shift_input_constant:
        layer_input = torch.cat([layer_input, history.new_ones(batch, 1)], dim=1)
    cue = F.one_hot(torch.tensor(program), num_programs).to(history.dtype).expand(batch, num_programs)
    context = {"states": lambda: history, "transitions": lambda: shift_context(history, dim),
               "fit": lambda: shift_fit(history, dim), "fit-pooled": lambda: shift_fit(history, dim, pooled=True),
               "fit-pooled-affine": lambda: shift_fit(history, dim, pooled=True, affine=True),
               "cue": lambda: cue,
               "states+cue": lambda: torch.cat([history, cue], dim=1)}[cfg.shift_context]()
    return layer_input, context


def _recovery(errors: list[float], start: int, segment: int) -> int:
    """Steps after ``start`` until the moving average of ``errors`` is below the threshold
    (``segment`` if it never gets there within the segment)."""
    window = []
    for offset in range(segment):
        window.append(errors[start + offset])
        if len(window) > RECOVERY_SMOOTHING:
            window.pop(0)
        if len(window) == RECOVERY_SMOOTHING and sum(window) / len(window) < RECOVERY_THRESHOLD:
            return offset + 1 - RECOVERY_SMOOTHING + 1
    return segment


class _Optimizers:
    """Several optimisers stepped as one (each over its own parameters)."""

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        self.optimizers = optimizers

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()


def _online_optimizer(model, cfg):
    """The shift task's online optimiser: ``online_optimizer`` over every parameter group of
    :func:`parameter_groups`, or, with ``routing_optimizer`` set, that one over the routing
    parameters (at online_lr x routing_lr_scale) and ``online_optimizer`` over the rest."""
    make = ONLINE_OPTIMIZERS[cfg.online_optimizer]
    if cfg.routing_optimizer in ("same", cfg.online_optimizer):
        return make(parameter_groups(model, cfg.online_lr, cfg.routing_lr_scale), lr=cfg.online_lr)
    routing = set(routing_parameters(model))
    named = list(model.named_parameters())
    rest = [p for n, p in named if n not in routing]
    chosen = [p for n, p in named if n in routing]
    if not chosen:
        raise ValueError(f"routing_optimizer={cfg.routing_optimizer!r}: model {cfg.model!r} has no routing "
                         f"parameters to give it")
    route_lr = cfg.online_lr * cfg.routing_lr_scale
    return _Optimizers(make(rest, lr=cfg.online_lr),
                       ONLINE_OPTIMIZERS[cfg.routing_optimizer](chosen, lr=route_lr))


def _shift(cfg, seed, generator) -> dict:
    stream = shift_stream(seed, centre_spread=cfg.shift_centre_spread, history=cfg.shift_history)
    dim = stream.states.shape[-1]
    num_programs = len(stream.programs)
    window, _ = stream.window(0)
    layer_input, context = shift_inputs(window, int(stream.program[0]), dim, num_programs, cfg)
    model = build_program_model(cfg.model, layer_input.shape[1], dim, context.shape[1], cfg.nc_options)
    optimizer = _online_optimizer(model, cfg)
    errors = []
    model.train()
    for t in range(len(stream.program)):
        history, target = stream.window(t)
        layer_input, context = shift_inputs(history, int(stream.program[t]), dim, num_programs, cfg)
        prediction = model(layer_input, context)
        loss = F.mse_loss(prediction, target)
        errors.append((loss.detach() / target.pow(2).mean()).item())   # measured before the update
        loss = loss + _penalties(model, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    starts = [0] + stream.switches
    seen: set[int] = set()
    first, recurring, after_first, after_recurring = [], [], [], []
    for start in starts:
        program = int(stream.program[start])
        recovery = _recovery(errors, start, stream.segment)
        just_after = sum(errors[start:start + 10]) / 10
        (recurring if program in seen else first).append(recovery)
        (after_recurring if program in seen else after_first).append(just_after)
        seen.add(program)
    return {"errors": errors, "switches": stream.switches, "segment": stream.segment, "order": stream.order,
            "recovery_first": sum(first) / len(first), "recovery_recurring": sum(recurring) / len(recurring),
            "error_after_switch_first": sum(after_first) / len(after_first),
            "error_after_switch_recurring": sum(after_recurring) / len(after_recurring),
            "final_error": sum(errors[-50:]) / 50, "parameters": sum(p.numel() for p in model.parameters())}


def _remember(cfg, seed, generator) -> dict:
    task = remember_task(seed)
    model = build_program_model(cfg.model, 8, 8, None, cfg.nc_options)
    optimizer = _fit(model, task["A"]["train"], cfg, generator)
    before = _relative_error(model, task["A"]["test"])
    _fit(model, task["B"]["train"], cfg, generator, optimizer)
    return {"A_error_before_B": before, "A_error_after_B": _relative_error(model, task["A"]["test"]),
            "B_error": _relative_error(model, task["B"]["test"]),
            "parameters": sum(p.numel() for p in model.parameters())}


TASK_FUNCTIONS = {"modular": _modular, "reuse": _reuse, "shift": _shift, "remember": _remember}
# Scalar figures summarised over seeds (mean, std) in results.json, per task.
SUMMARY_KEYS = {
    "modular": ["test_error", "train_error", "nmi"],
    "reuse": ["seen_error", "unseen_error", "similarity_sharing_a_piece", "similarity_sharing_none"],
    "shift": ["recovery_first", "recovery_recurring", "error_after_switch_first", "error_after_switch_recurring",
              "final_error"],
    "remember": ["A_error_before_B", "A_error_after_B", "B_error"],
}


def task_seed(seed: int, index: int) -> int:
    """The seed of the task (data, programs, stream) behind seed index ``index`` of a run made with
    ``--set seed=seed``: every model run with the same ``seed`` sees the same tasks, and another
    ``seed`` gives other tasks. ``seed=0`` gives tasks 100, 101, ... (the README's tables)."""
    return 100 + 1000 * seed + index


def _refuse_legacy_tasks(out: Path, seed: int) -> None:
    """Run folders written before the task followed ``seed`` (their seed files lack
    ``task_seed``) used tasks 100, 101, ... whatever the seed; resuming one made with another seed
    would mix two sets of tasks in one folder."""
    for path in sorted((out / "seeds").glob("seed-*.json")):
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue                      # finished_seeds names a corrupt file with its fix
        if "task_seed" not in record and seed != 0:
            raise ValueError(f"--resume: {path} predates task seeds that follow --set seed (its task was "
                             f"100 + its index, not {task_seed(seed, 0)} + index); a resumed run would mix the "
                             f"two: start a new run folder")


def run_programs(cfg: ProgramConfig, out: str | os.PathLike, resume: bool = False, preset: str | None = None,
                 quiet: bool = False) -> dict:
    """Run ``cfg.seeds`` seeds of one (task, model); returns ``results.json``'s dict."""
    run, out, config, say = start_seeded_run(cfg, "programs", out, resume, preset, quiet)
    if resume:
        _refuse_legacy_tasks(out, cfg.seed)
    say(f"{cfg.task} / {cfg.model}: {PROGRAM_TASKS[cfg.task]}; {cfg.seeds} seeds")
    for index in range(cfg.seeds):
        path = out / "seeds" / f"seed-{index:02d}.json"
        if path.is_file():
            continue
        seed = cfg.seed * 1000 + index
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed + 7)
        start = time.perf_counter()
        task = task_seed(cfg.seed, index)
        result = TASK_FUNCTIONS[cfg.task](cfg, task, generator)
        result.update(seed=seed, task_seed=task, seconds=time.perf_counter() - start)
        atomic_write_text(path, json.dumps(result))
        run.log(seed=index, **{k: result[k] for k in SUMMARY_KEYS[cfg.task] if k in result})
        say(f"seed {index}: " + ", ".join(f"{k} {result[k]:.3f}" for k in SUMMARY_KEYS[cfg.task] if k in result))
    seeds = finished_seeds(out)
    summary = {}
    for key in SUMMARY_KEYS[cfg.task]:
        values = torch.tensor([s[key] for s in seeds if key in s], dtype=torch.float64)
        if len(values):
            summary[key] = {"mean": values.mean().item(), "std": values.std().item() if len(values) > 1 else 0.0}
    results = {"config": config, "seeds": len(seeds), "parameters": seeds[0]["parameters"], "summary": summary,
               # A seed file from before task_seed was recorded can only be here with seed 0
               # (_refuse_legacy_tasks), whose tasks were 100 + index then too.
               "task_seeds": [s.get("task_seed", task_seed(cfg.seed, s["seed"] - 1000 * cfg.seed)) for s in seeds],
               "seconds_per_seed": sum(s["seconds"] for s in seeds) / len(seeds)}
    run.write_results(results)
    say(f"{cfg.task} / {cfg.model}: " + ", ".join(f"{k} {v['mean']:.3f} +- {v['std']:.3f}" for k, v in summary.items()))
    return results
