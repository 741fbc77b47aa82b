import itertools
import os

import pytest
import torch

# Triton's kernels (neurocoder.triton_layer, tests/test_triton.py) run in its interpreter where
# there is no GPU; Triton reads this when a kernel is defined, so before anything imports them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Every combination of the options that change the computation.
OPTION_GRID = [
    dict(composer=composer, steps=steps, key_mode=key_mode, least_used=least_used, residual=residual,
         bias=bias, sharpness=sharpness)
    for (composer, steps), key_mode, least_used, residual, bias, sharpness in itertools.product(
        [("feedforward", 1), ("recurrent", 3)], ["learned", "content"], [0, 3], [False, True], [False, True],
        ["learned", 2.0])
]


def option_id(options: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in options.items())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
