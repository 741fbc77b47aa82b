"""Probe: does Neurocoder read the same slots when a program of the pattern-shift stream recurs?

Runs the shift task's online loop (the trainer's own functions, nothing patched) for the
``nc-ff`` model with session 32's settings (programs named by centres, a constant input, 64 slots,
fixed sharpness 10, learned keys, no bias, no orthogonality loss, Adam at ``--lr`` with the
routing at 0.1x), and records each step's mean U-bank slot usage over the batch. For each switch
to a program seen before it prints, at several offsets after the switch, the cosine between the
reads and that program's reads over the last 20 steps of its previous segment, and the relative
error; and how alike the samples of one batch read (cosine of each sample's usage to the batch
mean, last 20 steps of every segment). Printed, not saved: a diagnostic, not a result.

    python scripts/probe_shift_reads.py --context states --streams 5 --seed 33
    python scripts/probe_shift_reads.py --context cue --streams 5 --seed 33
    python scripts/probe_shift_reads.py --context fit --history 5 --spread 0 --lr 0.003 --seed 36

``--spread 0`` is the table's stream (the states do not name the program; no constant input,
whose job is a program's offset around its centre).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from neurocoder.data.programs import shift_stream
from neurocoder.experiments.program_models import build_program_model
from neurocoder.train.programs import ProgramConfig, _online_optimizer, shift_inputs, task_seed

OFFSETS = (0, 1, 2, 3, 4, 8, 16, 64, 250)
TAIL = 20      # steps at the end of a segment that make a program's reference reads


def probe_stream(cfg: ProgramConfig, seed: int, index: int) -> tuple[dict, dict, list[float], list[float]]:
    """Per offset (those inside a segment): cosines to the program's previous reads and errors over
    this stream's recurring switches; each segment's within-batch read similarity; every step's
    relative error (the trainer's ``errors``)."""
    torch.manual_seed(seed * 1000 + index)           # the trainer's model seed for this index
    stream = shift_stream(task_seed(seed, index), centre_spread=cfg.shift_centre_spread, history=cfg.shift_history)
    dim, num_programs = stream.states.shape[-1], len(stream.programs)
    window, _ = stream.window(0)
    layer_input, context = shift_inputs(window, int(stream.program[0]), dim, num_programs, cfg)
    model = build_program_model(cfg.model, layer_input.shape[1], dim, context.shape[1], cfg.nc_options)
    optimizer = _online_optimizer(model, cfg)
    usage, errors, alike = [], [], []
    for t in range(len(stream.program)):
        history, target = stream.window(t)
        layer_input, context = shift_inputs(history, int(stream.program[t]), dim, num_programs, cfg)
        reads = model.reads(layer_input, context)                        # (batch, slots)
        usage.append(reads.mean(0))
        alike.append(F.cosine_similarity(reads, reads.mean(0, keepdim=True), dim=1).mean().item())
        loss = F.mse_loss(model(layer_input, context), target)
        errors.append((loss.detach() / target.pow(2).mean()).item())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    usage = torch.stack(usage)
    offsets = [o for o in OFFSETS if o < stream.segment]
    tail = min(TAIL, stream.segment)
    cosines = {o: [] for o in offsets}
    errs = {o: [] for o in offsets}
    reference: dict[int, torch.Tensor] = {}
    within = []
    for start in [0] + stream.switches:
        program = int(stream.program[start])
        if program in reference:
            for offset in offsets:
                cosines[offset].append(F.cosine_similarity(usage[start + offset], reference[program], dim=0).item())
                errs[offset].append(errors[start + offset])
        end = start + stream.segment
        reference[program] = usage[end - tail:end].mean(0)
        within.append(sum(alike[end - tail:end]) / tail)
    return cosines, errs, within, errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", choices=["states", "cue", "fit", "fit-pooled", "fit-pooled-affine", "transitions"], default="states")
    parser.add_argument("--spread", type=float, default=2.0, help="shift_centre_spread (0: the table's stream)")
    parser.add_argument("--history", type=int, default=3, help="shift_history, the window's length")
    parser.add_argument("--streams", type=int, default=5)
    parser.add_argument("--seed", type=int, default=33, help="as the trainer's --set seed (streams 100 + 1000 seed + i)")
    parser.add_argument("--lr", type=float, default=0.007)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = ProgramConfig(task="shift", model="nc-ff", shift_centre_spread=args.spread,
                        shift_input_constant=args.spread > 0, shift_history=args.history,
                        orthogonality_weight=0.0, shift_context=args.context, online_optimizer="adam",
                        online_lr=args.lr, routing_lr_scale=0.1,
                        nc_options=dict(num_programs=64, sharpness=10, key_mode="learned", bias=False))
    cosines = {o: [] for o in OFFSETS}
    errs = {o: [] for o in OFFSETS}
    within = []
    for index in range(args.streams):
        c, e, w, _ = probe_stream(cfg, args.seed, index)
        for offset in OFFSETS:
            cosines[offset] += c[offset]
            errs[offset] += e[offset]
        within += w

    def mean(values):
        return sum(values) / len(values)

    print(f"context {args.context}, spread {args.spread}, history {args.history}, lr {args.lr}, "
          f"streams {task_seed(args.seed, 0)}-{task_seed(args.seed, args.streams - 1)}, "
          f"{len(cosines[0])} recurring switches; steps after the switch: {list(OFFSETS)}")
    print("  cosine of the reads to the program's reads at the end of its last segment:",
          [round(mean(cosines[o]), 2) for o in OFFSETS])
    print("  relative error:", [round(mean(errs[o]), 2) for o in OFFSETS])
    print(f"  samples of one batch, cosine of each one's reads to the batch mean (segment ends): {mean(within):.3f}")


if __name__ == "__main__":
    main()
