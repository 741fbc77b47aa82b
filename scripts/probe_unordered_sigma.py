"""Probe (issue 5): does the ordering of the singular values stop a Neurocoder layer from
composing a program as a sum of cued pieces?

Runs the ``neurocoder`` command with sigma_n = softplus(s_n) instead of METHOD.md's positive,
descending sigma (sigma_n = sum over m >= n of softplus(s_m)), in both layer paths, for this
process only. The library keeps the ordering; this is an ablation, not an option. The run
folder's config records this script as the command.

    python scripts/probe_unordered_sigma.py run program-reuse --set model=nc-ff --set seeds=2 \\
        --set nc_options.rank=6 --out runs/reuse-unordered
"""

import sys

import torch
import torch.nn.functional as F

import neurocoder.fused as fused
import neurocoder.layers as layers


def unordered_singular_values(raw: torch.Tensor) -> torch.Tensor:
    """(..., R) raw reads -> positive singular values, in no particular order."""
    return F.softplus(raw)


def identity_instead_of_reverse_cumsum(R: int, like: torch.Tensor) -> torch.Tensor:
    """The fused path multiplies softplus(s) by this (R, R) matrix; the identity leaves it unsummed."""
    return torch.eye(R, device=like.device, dtype=like.dtype)


layers.singular_values = unordered_singular_values
fused._reverse_cumsum = identity_instead_of_reverse_cumsum

if __name__ == "__main__":
    from neurocoder.cli import main

    sys.exit(main(sys.argv[1:]))
