"""Seeded generators for the synthetic program tasks.

Every generator takes a ``seed`` and returns tensors only; the same seed gives the same task.
"Programs" are linear maps R^d -> R^d; the model sees inputs (and, where stated, a cue or a
history as context) and must output ``program @ x``.

* :func:`modular_task`: K hidden regimes; each has its own input distribution (a cluster, so the
  regime is inferable from the input alone) and its own low-rank program.
* :func:`reuse_task`: M shared rank-1 pieces; each program is the sum of ``pieces_per_program``
  of them, named by a multi-hot cue. Some combinations are held out of training.
* :func:`shift_stream`: auto-regressive sequences whose generating program switches abruptly
  every ``segment`` steps, cycling through K programs, so earlier programs recur.
* :func:`remember_task`: two regimes (A, B) of :func:`modular_task`, learnt one after the other.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

__all__ = ["ProgramData", "modular_task", "reuse_task", "shift_stream", "ShiftStream", "remember_task"]


@dataclass
class ProgramData:
    """Inputs x (N, d), optional context (N, c), targets y (N, d), hidden program id (N,)."""

    x: torch.Tensor
    y: torch.Tensor
    program: torch.Tensor
    context: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: torch.Tensor) -> "ProgramData":
        return ProgramData(self.x[index], self.y[index], self.program[index],
                           None if self.context is None else self.context[index])


def _low_rank(generator: torch.Generator, dim: int, rank: int) -> torch.Tensor:
    a = torch.randn(dim, rank, generator=generator)
    b = torch.randn(rank, dim, generator=generator)
    return a @ b / (dim * rank) ** 0.5                                   # (d, d), entries ~ 1/sqrt(d)


def modular_task(seed: int, num_programs: int = 4, dim: int = 8, rank: int = 2, train: int = 4000,
                 test: int = 1000, separation: float = 3.0, noise: float = 0.5) -> dict:
    """K regimes: x ~ N(c_k, noise^2 I) with cluster centres c_k of norm ``separation``;
    y = W_k x with W_k of rank ``rank``. Returns {'train', 'test': ProgramData, 'programs': (K, d, d)}."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_programs, dim, generator=generator)
    centres = separation * centres / centres.norm(dim=1, keepdim=True)
    programs = torch.stack([_low_rank(generator, dim, rank) for _ in range(num_programs)])

    def sample(n: int) -> ProgramData:
        regime = torch.randint(0, num_programs, (n,), generator=generator)
        x = centres[regime] + noise * torch.randn(n, dim, generator=generator)
        y = torch.einsum("nij,nj->ni", programs[regime], x)
        return ProgramData(x, y, regime)

    return {"train": sample(train), "test": sample(test), "programs": programs, "centres": centres}


def reuse_task(seed: int, num_pieces: int = 6, pieces_per_program: int = 2, dim: int = 8,
               held_out: int = 5, train: int = 4000, test: int = 1000) -> dict:
    """Programs W_S = sum_{j in S} a_j b_j^T for subsets S of ``pieces_per_program`` pieces; the
    cue is the multi-hot indicator of S. ``held_out`` subsets never appear in training (chosen so
    every piece still appears in training). Returns {'train', 'test_seen', 'test_unseen':
    ProgramData (context = cue), 'combinations': list of tuples, 'unseen': list of indices,
    'pieces': (a, b), each (num_pieces, dim): piece j is the rank-1 map a_j b_j^T}."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(num_pieces, dim, generator=generator) / dim ** 0.25
    b = torch.randn(num_pieces, dim, generator=generator) / dim ** 0.25
    combinations = list(itertools.combinations(range(num_pieces), pieces_per_program))
    if held_out >= len(combinations):
        raise ValueError(f"reuse_task: held_out={held_out} leaves no training combination of {len(combinations)}")
    while True:
        order = torch.randperm(len(combinations), generator=generator).tolist()
        unseen = sorted(order[:held_out])
        seen = sorted(order[held_out:])
        if {p for i in seen for p in combinations[i]} == set(range(num_pieces)):
            break
    programs = torch.stack([sum(torch.outer(a[j], b[j]) for j in combo) for combo in combinations])
    cues = torch.zeros(len(combinations), num_pieces)
    for i, combo in enumerate(combinations):
        cues[i, list(combo)] = 1.0

    def sample(n: int, allowed: list[int]) -> ProgramData:
        pick = torch.tensor(allowed)[torch.randint(0, len(allowed), (n,), generator=generator)]
        x = torch.randn(n, dim, generator=generator)
        y = torch.einsum("nij,nj->ni", programs[pick], x)
        return ProgramData(x, y, pick, cues[pick])

    return {"train": sample(train, seen), "test_seen": sample(test, seen), "test_unseen": sample(test, unseen),
            "combinations": combinations, "seen": seen, "unseen": unseen, "programs": programs, "cues": cues,
            "pieces": (a, b)}


@dataclass
class ShiftStream:
    """An online stream of ``steps`` time steps, each a batch of ``parallel`` sequences.

    ``states``: (steps + history, parallel, d); at time t a model sees the history
    ``states[t : t + history]`` and must predict ``states[t + history]``. ``program``: (steps,)
    the generating program at each step; ``switches``: step indices where the program changes.
    """

    states: torch.Tensor
    program: torch.Tensor
    switches: list[int]
    history: int
    segment: int
    order: list[int] = field(default_factory=list)
    programs: torch.Tensor | None = None           # (K, d, d)
    centres: torch.Tensor | None = None            # (K, d), zeros unless centre_spread > 0

    def window(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(parallel, history * d) flattened history, and (parallel, d) the next state."""
        past = self.states[t:t + self.history]                                  # (H, B, d)
        return past.permute(1, 0, 2).flatten(1), self.states[t + self.history]


def shift_stream(seed: int, num_programs: int = 3, dim: int = 4, segment: int = 300, cycles: int = 3,
                 parallel: int = 16, history: int = 3, noise: float = 0.05, centre_spread: float = 0.0) -> ShiftStream:
    """Sequences x_{t+1} = A_k x_t + noise, rescaled to norm sqrt(d); the program k cycles
    0, 1, ..., K-1, 0, 1, ... every ``segment`` steps (``cycles`` times), so each program recurs
    ``cycles - 1`` times. A_k are random rotations, so the rescaling only undoes the noise's
    drift (sequences neither die nor explode). At a switch the sequences carry on from their
    current state.

    ``centre_spread`` > 0: program k runs around a centre c_k of its own (orthonormal directions
    while K <= d, norm ``centre_spread`` x sqrt(d)): x_{t+1} = c_k + A_k (x_t - c_k) + noise, the deviation rescaled
    to norm sqrt(d). Then the recent states tell which program runs (as the input tells the
    regime in :func:`modular_task`); with 0 (the default) every program visits the same sphere
    and only the relation between successive states tells them apart."""
    generator = torch.Generator().manual_seed(seed)
    programs = []
    for _ in range(num_programs):
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator))
        programs.append(q)
    programs = torch.stack(programs)
    centres = torch.zeros(num_programs, dim)
    if centre_spread > 0:
        # Orthonormal directions (while K <= d), so every pair of centres is equally far apart.
        directions = torch.randn(dim, num_programs, generator=generator)
        if num_programs <= dim:
            directions = torch.linalg.qr(directions)[0]
        directions = directions.T
        centres = centre_spread * dim ** 0.5 * directions / directions.norm(dim=1, keepdim=True)
    order = [c % num_programs for c in range(num_programs * cycles)]
    steps = segment * len(order)
    program = torch.tensor(order).repeat_interleave(segment)
    states = torch.empty(steps + history, parallel, dim)
    scale = dim ** 0.5
    state = torch.randn(parallel, dim, generator=generator)
    state = scale * state / state.norm(dim=1, keepdim=True)
    states[0] = state
    for t in range(1, steps + history):
        k = program[max(t - history, 0)]          # states[t + history] is made by program[t]
        deviation = (state - centres[k]) @ programs[k].T + noise * torch.randn(parallel, dim, generator=generator)
        state = centres[k] + scale * deviation / deviation.norm(dim=1, keepdim=True)
        states[t] = state
    switches = [i * segment for i in range(1, len(order))]
    return ShiftStream(states, program, switches, history, segment, order, programs, centres)


def remember_task(seed: int, dim: int = 8, rank: int = 2, train: int = 2000, test: int = 1000) -> dict:
    """Programs A and B with inputs from separate clusters (as :func:`modular_task` with K=2).
    Returns {'A': {'train', 'test'}, 'B': {'train', 'test'}} of ProgramData."""
    task = modular_task(seed, num_programs=2, dim=dim, rank=rank, train=2 * train, test=2 * test)
    out = {}
    for name, regime in (("A", 0), ("B", 1)):
        out[name] = {split: task[split].subset((task[split].program == regime).nonzero().squeeze(-1))
                     for split in ("train", "test")}
    return out
