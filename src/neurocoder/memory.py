"""Program memory: the stored pieces a Neurocoder layer composes its weight from.

Three banks, each slot a value plus a key:

===========  =====================  ======================================
bank         values                 keys
===========  =====================  ======================================
U            ``u``: (P, d_in)       learned (P, k), or content: ``u A_u + b_u``
V            ``v``: (P, d_out)      learned (P, k), or content: ``v A_v + b_v``
S            ``s``: (P,)            always learned (P, k): a scalar has no content to map
===========  =====================  ======================================

Programs are data: a memory saves to and loads from a safetensors file whose header carries
JSON metadata (shapes, key mode, library version). Slots can be frozen (their values and keys
stay bit-identical whatever the optimiser does) and the memory can grow by new slots.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterable

import torch
import torch.nn as nn

from ._checks import check_positive_int
from ._version import __version__

__all__ = ["ProgramMemory", "KEY_MODES", "BANKS"]

KEY_MODES = ("learned", "content")
BANKS = ("u", "v", "s")
_FORMAT = "neurocoder-programs"
_FORMAT_VERSION = 1


class ProgramMemory(nn.Module):
    """A memory of ``num_programs`` singular-vector and singular-value programs.

    Args:
        num_programs: P, slots per bank.
        in_features: d_in, width of a U program (for a convolution: C_in * kh * kw).
        out_features: d_out, width of a V program.
        key_dim: k, size of every key.
        key_mode: ``'learned'`` (keys are free parameters) or ``'content'`` (keys of U and V
            are a learned linear map of the slot's value, so a key follows its program).
        usage_momentum: momentum of the running average of usage over batches.
        orthogonality_over_keys: compute the orthogonality loss over each slot's key and value
            together, ``[K_U | U]`` and ``[K_V | V]``, as the authors' released code does (its
            banks store key and value in one matrix and its loss covers the whole matrix).
            In ``learned`` key mode K are the keys the reads use; in ``content`` mode, where the
            reads use keys computed from the values, the released bank's key columns are read by
            nothing but this loss, so the memory holds them as ``u_key_columns`` (P, k) and
            ``v_key_columns`` (P, k), free parameters that only the loss moves (and that freezing
            a slot leaves free: they never reach an output). Default False: the loss on the
            values alone, as METHOD.md specifies.

    Attributes:
        u: (P, d_in) the U programs as a tensor (frozen slots included).
        v: (P, d_out) the V programs.
        s: (P,) the singular-value programs.
        usage_average: (3, P) running average over training batches of the largest weight
            each slot received in a composition, banks in the order U, V, S (diagnostics).
        frozen: (P,) bool, which slots are frozen.
    """

    def __init__(
        self,
        num_programs: int,
        in_features: int,
        out_features: int,
        key_dim: int,
        key_mode: str = "content",
        usage_momentum: float = 0.99,
        orthogonality_over_keys: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        for name, value in (("num_programs", num_programs), ("in_features", in_features),
                            ("out_features", out_features), ("key_dim", key_dim)):
            check_positive_int("ProgramMemory", name, value)
        if key_mode not in KEY_MODES:
            raise ValueError(f"ProgramMemory: key_mode must be one of {KEY_MODES}, got {key_mode!r}")
        if not 0.0 <= usage_momentum < 1.0:
            raise ValueError(f"ProgramMemory: usage_momentum must be in [0, 1), got {usage_momentum!r}")
        if not isinstance(orthogonality_over_keys, bool):
            raise TypeError(f"ProgramMemory: orthogonality_over_keys must be True or False, "
                            f"got {orthogonality_over_keys!r}")
        factory = {"device": device, "dtype": dtype}
        self.num_programs = num_programs
        self.in_features = in_features
        self.out_features = out_features
        self.key_dim = key_dim
        self.key_mode = key_mode
        self.usage_momentum = usage_momentum
        self.orthogonality_over_keys = orthogonality_over_keys

        P = num_programs
        self.u_values = nn.Parameter(torch.empty(P, in_features, **factory))
        self.v_values = nn.Parameter(torch.empty(P, out_features, **factory))
        self.s_values = nn.Parameter(torch.empty(P, **factory))
        self.s_keys = nn.Parameter(torch.empty(P, key_dim, **factory))
        if key_mode == "learned":
            self.u_keys = nn.Parameter(torch.empty(P, key_dim, **factory))
            self.v_keys = nn.Parameter(torch.empty(P, key_dim, **factory))
        else:
            self.u_key_map = nn.Linear(in_features, key_dim, **factory)
            self.v_key_map = nn.Linear(out_features, key_dim, **factory)
            if orthogonality_over_keys:
                self.u_key_columns = nn.Parameter(torch.empty(P, key_dim, **factory))
                self.v_key_columns = nn.Parameter(torch.empty(P, key_dim, **factory))

        # Snapshots of frozen slots. Reads take frozen slots from here, so nothing an optimiser
        # does to the parameters (momentum, weight decay) can move them.
        self.register_buffer("frozen", torch.zeros(P, dtype=torch.bool, device=device))
        for bank, width in (("u", in_features), ("v", out_features)):
            self.register_buffer(f"frozen_{bank}_values", torch.zeros(P, width, **factory))
        self.register_buffer("frozen_s_values", torch.zeros(P, **factory))
        for bank in BANKS:
            self.register_buffer(f"frozen_{bank}_keys", torch.zeros(P, key_dim, **factory))
        self.register_buffer("usage_average", torch.zeros(3, P, **factory))
        # Learned attention offset per slot and bank, (3, P); created by grow() only, so a memory
        # that never grew has exactly the parameters of the method.
        self.register_parameter("slot_bias", None)
        self._has_frozen = False
        self.register_load_state_dict_post_hook(_refresh_frozen_flag)
        self.reset_parameters()

    # ----------------------------------------------------------------------------- set-up
    def reset_parameters(self) -> None:
        """Xavier-uniform values and keys, as the released code initialises its memory."""
        P, k = self.num_programs, self.key_dim
        nn.init.xavier_uniform_(self.u_values)
        nn.init.xavier_uniform_(self.v_values)
        bound = math.sqrt(6.0 / (P + k + 1))
        nn.init.uniform_(self.s_values, -bound, bound)
        nn.init.uniform_(self.s_keys, -bound, bound)
        if self.key_mode == "learned":
            nn.init.xavier_uniform_(self.u_keys)
            nn.init.xavier_uniform_(self.v_keys)
        else:
            self.u_key_map.reset_parameters()
            self.v_key_map.reset_parameters()
            if self.orthogonality_over_keys:
                # Xavier bounds of the released (P, k + d) bank that holds key and value together.
                for columns, width in ((self.u_key_columns, self.in_features), (self.v_key_columns, self.out_features)):
                    bound = math.sqrt(6.0 / (P + k + width))
                    nn.init.uniform_(columns, -bound, bound)

    def extra_repr(self) -> str:
        frozen = int(self.frozen.sum()) if self._has_frozen else 0
        return (f"num_programs={self.num_programs}, in_features={self.in_features}, "
                f"out_features={self.out_features}, key_dim={self.key_dim}, "
                f"key_mode={self.key_mode!r}, frozen={frozen}"
                + (", orthogonality_over_keys=True" if self.orthogonality_over_keys else ""))

    # ----------------------------------------------------------------------------- reading
    def _effective(self, live: torch.Tensor, bank: str, part: str) -> torch.Tensor:
        if not self._has_frozen:
            return live
        snapshot = getattr(self, f"frozen_{bank}_{part}")
        mask = self.frozen if live.dim() == 1 else self.frozen[:, None]
        return torch.where(mask, snapshot, live)

    @property
    def u(self) -> torch.Tensor:
        """(P, d_in) U programs."""
        return self._effective(self.u_values, "u", "values")

    @property
    def v(self) -> torch.Tensor:
        """(P, d_out) V programs."""
        return self._effective(self.v_values, "v", "values")

    @property
    def s(self) -> torch.Tensor:
        """(P,) singular-value programs."""
        return self._effective(self.s_values, "s", "values")

    def _live_keys(self, u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.key_mode == "learned":
            return self.u_keys, self.v_keys
        return self.u_key_map(u), self.v_key_map(v)

    def keys(self) -> torch.Tensor:
        """(3, P, k) keys of the U, V and S banks."""
        ku, kv = self._live_keys(self.u, self.v)
        return torch.stack([
            self._effective(ku, "u", "keys"),
            self._effective(kv, "v", "keys"),
            self._effective(self.s_keys, "s", "keys"),
        ])

    def orthogonality_loss(self) -> torch.Tensor:
        """``||U U^T - I||_F + ||V V^T - I||_F`` on the program values (a scalar).

        It keeps the stored singular vectors orthonormal. With more slots than a bank's width
        it cannot reach zero. With ``orthogonality_over_keys`` each bank's keys join its values
        (``[K_U | U]``, ``[K_V | V]``), as in the released code.
        """
        u, v = self.u, self.v
        if self.orthogonality_over_keys:
            if self.key_mode == "learned":
                ku, kv = self._effective(self.u_keys, "u", "keys"), self._effective(self.v_keys, "v", "keys")
            else:
                ku, kv = self.u_key_columns, self.v_key_columns
            u, v = torch.cat([ku, u], dim=1), torch.cat([kv, v], dim=1)
        eye = torch.eye(self.num_programs, device=u.device, dtype=u.dtype)
        return torch.linalg.matrix_norm(u @ u.T - eye) + torch.linalg.matrix_norm(v @ v.T - eye)

    @torch.no_grad()
    def update_usage(self, usage: torch.Tensor) -> None:
        """Fold one batch's usage, (3, P), into the running average."""
        self.usage_average.mul_(self.usage_momentum).add_(usage.to(self.usage_average.dtype),
                                                          alpha=1.0 - self.usage_momentum)

    # ----------------------------------------------------------------------------- freezing
    def _slot_mask(self, slots: Iterable[int] | torch.Tensor | slice | None) -> torch.Tensor:
        P = self.num_programs
        if slots is None:
            return torch.ones(P, dtype=torch.bool, device=self.frozen.device)
        if isinstance(slots, slice):
            slots = range(P)[slots]
        index = torch.as_tensor(list(slots) if not isinstance(slots, torch.Tensor) else slots,
                                dtype=torch.long).flatten()
        if index.numel() and (index.min() < -P or index.max() >= P):
            raise ValueError(f"ProgramMemory: slot indices must lie in [0, {P}) (or count back from the end, "
                             f"down to -{P}), got {index.tolist()}")
        mask = torch.zeros(P, dtype=torch.bool)
        mask[index] = True
        return mask.to(self.frozen.device)

    @torch.no_grad()
    def freeze(self, slots: Iterable[int] | torch.Tensor | slice | None = None) -> None:
        """Freeze slots (all when ``slots`` is None): their values and keys get no updates.

        Reads take frozen slots from a snapshot taken now, so they stay bit-identical
        whatever an optimiser does to the underlying parameters.
        """
        mask = self._slot_mask(slots) & ~self.frozen
        ku, kv = self._live_keys(self.u, self.v)
        current = {
            "u_values": self.u_values, "v_values": self.v_values, "s_values": self.s_values,
            "u_keys": ku, "v_keys": kv, "s_keys": self.s_keys,
        }
        for name, tensor in current.items():
            snapshot = getattr(self, f"frozen_{name}")
            snapshot[mask] = tensor.detach()[mask].to(snapshot.dtype)
        self.frozen |= mask
        self._has_frozen = bool(self.frozen.any())

    @torch.no_grad()
    def unfreeze(self, slots: Iterable[int] | torch.Tensor | slice | None = None) -> None:
        """Let frozen slots learn again, starting from their frozen values."""
        mask = self._slot_mask(slots) & self.frozen
        self.u_values[mask] = self.frozen_u_values[mask]
        self.v_values[mask] = self.frozen_v_values[mask]
        self.s_values[mask] = self.frozen_s_values[mask]
        self.s_keys[mask] = self.frozen_s_keys[mask]
        if self.key_mode == "learned":
            self.u_keys[mask] = self.frozen_u_keys[mask]
            self.v_keys[mask] = self.frozen_v_keys[mask]
        self.frozen &= ~mask
        self._has_frozen = bool(self.frozen.any())

    @property
    def frozen_slots(self) -> list[int]:
        return self.frozen.nonzero().flatten().tolist()

    # ----------------------------------------------------------------------------- growing
    @torch.no_grad()
    def grow(self, num_new: int, attention_offset: float = -4.0, noise: float = 0.01) -> None:
        """Add ``num_new`` slots at the end of every bank, placed so old inputs barely read them.

        Softmax attention over more slots dilutes every old read, so the memory gains a learned
        per-slot attention offset (``slot_bias``, (3, P), added to the attention logits): zero
        for old slots, ``attention_offset`` for new ones, which keeps old inputs' reads close
        while the new slots learn. Least-used reading finds new slots at once (their usage is 0).

        A new slot's key points away from where reads go: the negative of the usage-weighted
        mean of the old keys (plain mean before any training). In ``learned`` key mode its U and
        V programs start near zero; in ``content`` mode, where a key is a function of its value,
        they start at the negative usage-weighted mean of the old programs, which puts the key
        there. New singular-value programs start at the mean of the old ones. A little noise
        (``noise`` times the old programs' scale) keeps the new slots from being identical.

        The parameters are replaced: build the optimiser again after growing.
        """
        check_positive_int("ProgramMemory.grow", "num_new", num_new)
        n, P = num_new, self.num_programs
        keys = self.keys()
        usage = self.usage_average.clone()
        usage[usage.sum(-1) <= 0] = 1.0                 # no history yet: plain mean
        usage = usage / usage.sum(-1, keepdim=True)     # (3, P)

        def away(old: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
            """(n, width): minus the weighted mean row of ``old``, plus a little noise."""
            centre = -(weights.to(old.dtype) @ old.reshape(P, -1))
            spread = noise * old.std().clamp_min(1e-6)
            return (centre + spread * torch.randn(n, centre.numel(), device=old.device, dtype=old.dtype)).reshape(
                n, *old.shape[1:])

        def extend(parameter: torch.Tensor, rows: torch.Tensor) -> nn.Parameter:
            return nn.Parameter(torch.cat([parameter.detach(), rows.to(parameter.device, parameter.dtype)]))

        u, v, s = self.u, self.v, self.s
        if self.key_mode == "learned":
            self.u_values = extend(self.u_values, torch.zeros(n, self.in_features) + noise * u.std() *
                                   torch.randn(n, self.in_features, device=u.device, dtype=u.dtype))
            self.v_values = extend(self.v_values, torch.zeros(n, self.out_features) + noise * v.std() *
                                   torch.randn(n, self.out_features, device=v.device, dtype=v.dtype))
            self.u_keys = extend(self.u_keys, away(keys[0], usage[0]))
            self.v_keys = extend(self.v_keys, away(keys[1], usage[1]))
        else:
            self.u_values = extend(self.u_values, away(u, usage[0]))
            self.v_values = extend(self.v_values, away(v, usage[1]))
            if self.orthogonality_over_keys:
                for name in ("u_key_columns", "v_key_columns"):
                    old = getattr(self, name)
                    setattr(self, name, extend(old, noise * old.std() * torch.randn(
                        n, self.key_dim, device=old.device, dtype=old.dtype)))
        self.s_values = extend(self.s_values, s.mean().expand(n))
        self.s_keys = extend(self.s_keys, away(keys[2], usage[2]))
        old_bias = self.slot_bias if self.slot_bias is not None else u.new_zeros(3, P)
        self.slot_bias = nn.Parameter(torch.cat([old_bias.detach(), old_bias.new_full((3, n), attention_offset)], 1))
        for name in ("frozen_u_values", "frozen_v_values", "frozen_s_values",
                     "frozen_u_keys", "frozen_v_keys", "frozen_s_keys"):
            old = getattr(self, name)
            setattr(self, name, torch.cat([old, old.new_zeros(n, *old.shape[1:])]))
        self.frozen = torch.cat([self.frozen, self.frozen.new_zeros(n)])
        self.usage_average = torch.cat([self.usage_average, self.usage_average.new_zeros(3, n)], dim=1)
        self.num_programs = P + n

    # ----------------------------------------------------------------------------- programs as data
    def metadata(self) -> dict:
        """JSON-ready description of this memory's layout."""
        return {
            "format": _FORMAT,
            "format_version": _FORMAT_VERSION,
            "library_version": __version__,
            "num_programs": self.num_programs,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "key_dim": self.key_dim,
            "key_mode": self.key_mode,
            "usage_momentum": self.usage_momentum,
            "orthogonality_over_keys": self.orthogonality_over_keys,
            "dtype": str(self.u_values.dtype).removeprefix("torch."),
            "shapes": {name: list(t.shape) for name, t in self.state_dict().items()},
            "grown": self.slot_bias is not None,
        }

    def save_programs(self, path: str | os.PathLike) -> Path:
        """Write the programs to a safetensors file with JSON metadata in its header.

        The file is written to a temporary name and renamed, so an interrupted save never
        leaves a half-written file behind.
        """
        from safetensors.torch import save_file

        path = Path(path)
        if not path.parent.is_dir():
            raise FileNotFoundError(f"save_programs: the folder {path.parent} does not exist; create it first")
        tensors = {name: t.detach().contiguous().cpu() for name, t in self.state_dict().items()}
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"neurocoder": json.dumps(self.metadata())})
        os.replace(tmp, path)
        return path

    @staticmethod
    def read_programs(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
        """Read a programs file: (metadata, tensors). Raises ValueError on a bad file."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no programs file at {path}")
        try:
            with safe_open(str(path), framework="pt") as handle:
                header = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except Exception as error:  # safetensors raises several types for a damaged file
            raise ValueError(f"{path} is not a readable programs file (damaged or not safetensors): "
                             f"{error}") from error
        if "neurocoder" not in header:
            raise ValueError(f"{path} is a safetensors file but holds no Neurocoder programs "
                             f"(no 'neurocoder' metadata); save one with memory.save_programs()")
        try:
            meta = json.loads(header["neurocoder"])
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: its 'neurocoder' metadata is not valid JSON ({error}); the file was "
                             f"damaged or written by another tool") from error
        if meta.get("format") != _FORMAT or meta.get("format_version", 0) > _FORMAT_VERSION:
            raise ValueError(f"{path}: unsupported programs format {meta.get('format')!r} "
                             f"version {meta.get('format_version')!r}; this library reads "
                             f"{_FORMAT!r} up to version {_FORMAT_VERSION}")
        return meta, tensors

    @torch.no_grad()
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # A state_dict saved after ``grow`` holds more slots (and the per-slot attention offsets
        # grow adds): say how to make this memory fit, instead of a list of size mismatches.
        saved = state_dict.get(prefix + "u_values")
        if saved is not None and saved.shape[0] != self.num_programs:
            slots = saved.shape[0]
            hint = (f"grow it first (memory.grow({slots - self.num_programs})), then load" if slots > self.num_programs
                    else f"build the layer with num_programs={slots}")
            error_msgs.append(f"{prefix}u_values: the state_dict holds {slots} program slots, this memory "
                              f"{self.num_programs}; {hint}")
            return
        if prefix + "slot_bias" in state_dict and self.slot_bias is None:
            self.slot_bias = nn.Parameter(torch.zeros_like(state_dict[prefix + "slot_bias"], device=self.u_values.device,
                                                           dtype=self.u_values.dtype))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def load_programs(self, path: str | os.PathLike) -> None:
        """Load programs saved by :meth:`save_programs` into this memory.

        Raises ValueError naming every field that differs when the file's layout does not
        match this memory (grow or build a matching memory first).
        """
        meta, tensors = self.read_programs(path)
        mine = self.metadata()
        fields = ("num_programs", "in_features", "out_features", "key_dim", "key_mode", "orthogonality_over_keys")
        defaults = {"orthogonality_over_keys": False}      # files written before the option existed
        diffs = [f"{f}: file {meta.get(f, defaults.get(f))!r}, this memory {mine[f]!r}" for f in fields
                 if meta.get(f, defaults.get(f)) != mine[f]]
        if diffs:
            raise ValueError(f"{path} does not fit this memory: " + "; ".join(diffs))
        if "slot_bias" in tensors and self.slot_bias is None:
            self.slot_bias = nn.Parameter(torch.zeros_like(tensors["slot_bias"], device=self.u_values.device,
                                                           dtype=self.u_values.dtype))
        own = self.state_dict()
        for name, tensor in tensors.items():
            if name not in own or tuple(own[name].shape) != tuple(tensor.shape):
                raise ValueError(f"{path}: tensor {name!r} of shape {tuple(tensor.shape)} does not fit "
                                 f"this memory ({tuple(own[name].shape) if name in own else 'absent'})")
        missing = set(own) - set(tensors)
        if missing:
            raise ValueError(f"{path} lacks tensors {sorted(missing)}; the file is incomplete or was saved "
                             f"before this memory grew")
        self.load_state_dict({n: t.to(own[n].device, own[n].dtype) for n, t in tensors.items()})

    @classmethod
    def from_file(cls, path: str | os.PathLike, device=None) -> "ProgramMemory":
        """Build a memory from a programs file."""
        meta, _ = cls.read_programs(path)
        memory = cls(meta["num_programs"], meta["in_features"], meta["out_features"], meta["key_dim"],
                     meta["key_mode"], usage_momentum=meta.get("usage_momentum", 0.99),
                     orthogonality_over_keys=meta.get("orthogonality_over_keys", False), device=device,
                     dtype=getattr(torch, meta.get("dtype", "float32")))
        memory.load_programs(path)
        return memory


def _refresh_frozen_flag(module: ProgramMemory, incompatible_keys) -> None:
    module._has_frozen = bool(module.frozen.any())
