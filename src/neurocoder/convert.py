"""Put Neurocoder layers into any PyTorch model, by module name, without touching its code."""

from __future__ import annotations

import fnmatch
import math
import warnings
from typing import Iterable

import torch
import torch.nn as nn

from .baselines import MoELinear, NSMLinear
from .layers import NeurocoderConv2d, NeurocoderLayer, NeurocoderLinear

__all__ = ["convert", "seed_from_weight", "INITS"]

INITS = ("random", "svd")
# Sharpness a learned-sharpness layer starts from after an SVD seed: peaked enough that each
# component reads (almost) only the slot holding its singular vector.
_SVD_SHARPNESS = 30.0


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern)


def convert(model: nn.Module, targets: str | Iterable[str], init: str = "random", **layer_options) -> nn.Module:
    """Replace matching ``nn.Linear`` and ``nn.Conv2d`` modules of ``model`` in place.

    Args:
        model: any module.
        targets: module-name patterns. A pattern matches a module whose qualified name (as in
            ``model.named_modules()``) equals it, ends with ``"." + pattern``, or matches it as a
            glob (``"classifier.*"``, ``"*"``). Only Linear and Conv2d modules are replaced.
        init: ``'random'`` (fresh programs) or ``'svd'`` (seed the memory from the SVD of the
            weight it replaces, see :func:`seed_from_weight`).
        **layer_options: passed to :class:`NeurocoderLinear` / :class:`NeurocoderConv2d`
            (num_programs, rank, key_dim, ...). The bias follows the replaced module.

    Returns:
        ``model``, with the replacements made. The new layers are on the replaced module's
        device and dtype. All or none: every replacement is checked before the first is put in.
        A module used in several places is replaced in all of them by one layer; a replaced
        weight tied to another module's (an LM head tied to its embedding) gives a warning, as
        the tie ends. Modules inside Neurocoder, NSM and MoE layers are never candidates.

    Raises:
        ValueError: a pattern matches no Linear or Conv2d module (the message lists those that
            exist), a Conv2d uses groups or a padding mode Neurocoder does not support, a module
            is one its parent applies without calling it (``nn.MultiheadAttention.out_proj``), or
            an unknown ``init``.
    """
    if init not in INITS:
        raise ValueError(f"convert: init must be one of {INITS}, got {init!r}")
    if isinstance(targets, str):
        targets = [targets]
    targets = list(targets)
    if not targets:
        raise ValueError("convert: targets is empty; name the modules to replace, e.g. targets=['fc2'] or ['*']")
    if "bias" in layer_options:
        raise ValueError("convert: do not pass 'bias'; each new layer keeps the bias setting of the module it replaces")
    # The small linear maps inside Neurocoder layers (key maps, composers) and the baselines are
    # their own machinery, not the model's layers: converting a model twice must not reach them.
    internal = {f"{name}.{sub}" if name else sub for name, module in model.named_modules()
                if isinstance(module, (NeurocoderLayer, NSMLinear, MoELinear))
                for sub, _ in module.named_modules() if sub}
    convertible = [(name, module) for name, module in model.named_modules()
                   if isinstance(module, (nn.Linear, nn.Conv2d)) and not isinstance(module, NeurocoderLayer)
                   and name not in internal]
    chosen: dict[str, nn.Module] = {}
    for pattern in targets:
        hits = [(name, module) for name, module in convertible if _matches(name, pattern)]
        if not hits:
            names = ", ".join(name for name, _ in convertible) or "none"
            raise ValueError(f"convert: pattern {pattern!r} matches no nn.Linear or nn.Conv2d in "
                             f"{type(model).__name__}; those it has: {names}")
        chosen.update(hits)
    # A module used in several places (named_modules lists it once) is replaced in all of them by
    # one Neurocoder layer, so what was shared stays shared.
    aliases: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(module), []).append(name)
    parameter_names: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        parameter_names.setdefault(id(parameter), []).append(name)
    # Every replacement is built (and checked) before the first is put in: a module that cannot
    # be replaced leaves the model as it was, not half converted.
    replacements = {}
    for name, module in chosen.items():
        for alias in aliases[id(module)]:
            _check_called(model, alias)
        replacement = _replacement(name, module, layer_options)
        if init == "svd":
            seed_from_weight(replacement, module.weight.detach(),
                             None if module.bias is None else module.bias.detach())
        tied = [other for other in parameter_names.get(id(module.weight), [])
                if not any(other.startswith(alias + ".") or alias == "" for alias in aliases[id(module)])]
        if tied:
            warnings.warn(f"convert: {name}.weight is also {', '.join(tied)} (tied weights); the Neurocoder layer "
                          f"that replaces {name} holds programs of its own, so the tie is gone", stacklevel=2)
        for alias in aliases[id(module)]:
            replacements[alias] = replacement
    for name, replacement in replacements.items():
        _set_submodule(model, name, replacement)
        parent_name = name.rpartition(".")[0]
        if isinstance(model.get_submodule(parent_name) if parent_name else model, nn.TransformerEncoderLayer):
            # Its inference fast path reads linear1/linear2's .weight and computes without calling
            # them; PyTorch takes that path only while no submodule has a hook, so one that does
            # nothing keeps the layer on its ordinary path, which calls the Neurocoder layer.
            replacement.register_forward_pre_hook(_keep_off_fast_path)
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder) and any(isinstance(m, NeurocoderLayer) for m in module.modules()):
            # Its nested-tensor path (eval, with a padding mask) also reads the first layer's
            # linear1/linear2 weights directly and would hand the layers nested tensors.
            module.use_nested_tensor = False
    return model


def _keep_off_fast_path(module: nn.Module, args):
    return None


def _check_called(model: nn.Module, name: str) -> None:
    """Refuse a module its parent never calls: nn.MultiheadAttention applies ``out_proj`` through
    its ``.weight`` and ``.bias``, so a Neurocoder layer there would never run."""
    parent_name = name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, nn.MultiheadAttention):
        raise ValueError(f"convert: {name} is nn.MultiheadAttention's output projection, which it applies through "
                         f"its .weight without calling the module, so it cannot be replaced; leave it out of targets "
                         f"(a Transformer's feed-forward layers, e.g. 'linear1', 'linear2', can be)")


def _replacement(name: str, module: nn.Module, options: dict) -> NeurocoderLayer:
    factory = {"device": module.weight.device, "dtype": module.weight.dtype}
    if isinstance(module, nn.Linear):
        return NeurocoderLinear(module.in_features, module.out_features, bias=module.bias is not None,
                                **options, **factory)
    if module.groups != 1:
        raise ValueError(f"convert: {name} is a grouped convolution (groups={module.groups}); "
                         f"NeurocoderConv2d supports groups=1 only - leave it out of targets")
    if module.padding_mode != "zeros":
        raise ValueError(f"convert: {name} uses padding_mode={module.padding_mode!r}; "
                         f"NeurocoderConv2d supports zero padding only")
    return NeurocoderConv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                            module.padding, module.dilation, bias=module.bias is not None, **options, **factory)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    if name == "":
        raise ValueError("convert: the model itself is a Linear/Conv2d; wrap it in a container first, "
                         "or build a NeurocoderLinear/NeurocoderConv2d directly")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _remove_span(rows: torch.Tensor, count: int) -> None:
    """In place: rows[count:] lose every part in the span of rows[:count] (2-D; the rows' space)."""
    if count == 0 or count >= rows.shape[0]:
        return
    basis = torch.linalg.qr(rows[:count].T.to(torch.float64)).Q                   # (dim, count)
    rest = rows[count:].to(torch.float64)
    rows[count:] = (rest - (rest @ basis) @ basis.T).to(rows.dtype)


def _inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    y = y.clamp_min(1e-6)
    return torch.where(y > 20, y, torch.log(torch.expm1(y)))


@torch.no_grad()
def seed_from_weight(layer: NeurocoderLayer, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Seed a layer's memory from the SVD of a dense weight so that, at initialisation, it
    applies (close to) the best rank-R approximation of that weight.

    ``weight`` is laid out as in ``nn.Linear`` (out, in) or ``nn.Conv2d`` (out, in, kh, kw).
    Slot n < min(P, rank of W) holds the n-th singular vector pair; the singular-value programs
    are set so that reading slot n at component n gives sigma_n = the n-th singular value. With
    the feed-forward composer, component n is pointed at slot n through the composer's query
    bias (its input weights are scaled down, so reads start nearly input-independent) and a
    learned sharpness starts peaked. The recurrent composer's reads are not aligned: its memory
    is seeded, but its output at initialisation is not the truncated SVD.
    """
    memory = layer.memory
    dense = weight.reshape(weight.shape[0], -1).T.to(torch.float64)               # (d_in, d_out)
    if tuple(dense.shape) != (memory.in_features, memory.out_features):
        raise ValueError(f"seed_from_weight: weight of shape {tuple(weight.shape)} does not fit "
                         f"{layer._label} (programs {memory.in_features} -> {memory.out_features})")
    left, singular, right_t = torch.linalg.svd(dense, full_matrices=False)
    P, R, k = memory.num_programs, layer.total_rank, memory.key_dim
    filled = min(P, singular.numel())
    dtype = memory.u_values.dtype
    memory.u_values[:filled] = left[:, :filled].T.to(dtype)
    memory.v_values[:filled] = right_t[:filled].to(dtype)

    # Component n reads slot n: sigma_n = sum_{m >= n} softplus(s_m) must equal singular[n].
    used = min(R, filled)
    target = torch.zeros(R, dtype=torch.float64)
    target[:used] = singular[:used]
    steps = target - torch.cat([target[1:], target.new_zeros(1)])
    memory.s_values[:min(R, P)] = _inverse_softplus(steps[:min(R, P)]).to(dtype)

    # Distinct unit keys for the slots that components read; orthonormal when k >= R.
    generator = torch.Generator().manual_seed(0)
    raw = torch.randn(max(k, R), max(k, R), generator=generator, dtype=torch.float64)
    basis = torch.linalg.qr(raw).Q[:R, :k]
    keys = torch.nn.functional.normalize(basis, dim=-1)                          # (R, k)
    slots = min(R, P)
    # Slots no component reads at first must draw no attention. A key with no part along the read
    # keys is not enough (a float32 residue of ~1e-8, once normalised, points anywhere), so such
    # keys also get a part along ``sink``, the opposite of the read keys' mean direction: their
    # cosine with every query is then negative, a weight below e^-30 at sharpness 30.
    sink = -torch.nn.functional.normalize(keys[:slots].sum(0), dim=0)                # (k,)
    for bank_keys in ((memory.s_keys, memory.u_keys, memory.v_keys) if memory.key_mode == "learned"
                      else (memory.s_keys,)):
        bank_keys[:slots] = keys[:slots].to(dtype)
        _remove_span(bank_keys, slots)
        bank_keys[slots:] += sink.to(dtype)
    if memory.key_mode == "content":
        # key(u) = A u + b; over the orthonormal singular vectors, A = E^T U maps slot n to key E_n.
        # Every other slot's value loses its part along them, so A maps it to ~0 and its key is
        # ~b, a small step along ``sink`` that moves the read keys by little (cosine 0.997 with
        # their queries: above 0.99). With more slots than the values' width, the slots past the singular
        # vectors could not all have keys of their own anyway.
        for key_map, values in ((memory.u_key_map, memory.u_values), (memory.v_key_map, memory.v_values)):
            _remove_span(values, used)
            key_map.weight.copy_((keys[:used].T @ values[:used].to(torch.float64)).to(dtype))
            key_map.bias.copy_((0.1 * sink).to(dtype))

    head = layer.composer.head
    if layer.composer_kind == "feedforward":
        linear = head.linear
        linear.weight.mul_(0.01)
        read = torch.arange(R) % slots
        s_read = read.clone()
        if R > P:
            # Components beyond the P slots read the U and V slots again; their singular values
            # must come out ~0, from an S slot that holds ~0 (the first one no singular value uses).
            if used < P:
                s_read[P:] = used
            else:
                warnings.warn(f"seed_from_weight: rank {R} exceeds num_programs {P} and the weight fills every slot, "
                              f"so components {P}..{R - 1} cannot start silent and the layer does not start at "
                              f"the truncated SVD; use num_programs > rank", stacklevel=2)
        query_bias = torch.cat([keys[read], keys[read], keys[s_read]]).reshape(-1)   # banks U, V, S
        linear.bias[:head.sizes[0]] = query_bias.to(dtype)
        start = head.sizes[0]
        if head.least_used:
            linear.bias[start:start + head.sizes[1]] = -10.0                    # gates start closed
        start += head.sizes[1]
        if head.learn_sharpness:
            linear.bias[start:start + head.sizes[2]] = math.log(math.expm1(_SVD_SHARPNESS))
        start += head.sizes[2]
        if head.residual:
            linear.bias[start] = -10.0                                          # working program starts off
    if bias is not None and getattr(layer, "bias", None) is not None:
        layer.bias.copy_(bias)
