"""The C++ kernels of the fused layer on a CPU (``csrc/fused_layer.cpp``).

The fused layer (:mod:`neurocoder.fused`) runs ~70 small ATen operations per training step; on a
CPU their dispatch, the Python that sequences them and the temporaries they allocate cost as
much as the arithmetic. The kernels do the same maths as a few loops between the GEMMs: the
whole training step of a feed-forward layer reading its own input (``fused_layer_forward`` /
``_backward``), its no-grad eval-mode call (``fused_layer_inference``), and the read alone for
the other composers (``fused_read_forward`` / ``_backward``: the recurrent composer's steps, a
separate context, frozen slots, the working program's gate), least-used reading's sequential
mixing (``least_used_read_forward`` / ``_backward``, :func:`neurocoder.reading.read_with_least_used`),
and NeurocoderConv2d's read up to each sample's mixing matrix (``conv_read_forward`` /
``_backward``, :func:`neurocoder.fused.conv_read_mixing`; with the feed-forward composer's map and
the keys, ``conv_layer_read_forward`` / ``_backward``, :func:`neurocoder.fused.conv_layer_read_mixing`),
its whole no-grad call with a table of the contexts met (``conv_layer_inference``), its pooled
context (``pixel_means``) and the distinct contexts of a batch (``unique_rows``).
They are compiled on first use with
PyTorch's ``torch.utils.cpp_extension`` (needs a C++ compiler, and ninja, a dependency; about
30 s on two cores, cached under ``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``) and used for CPU tensors in float32 and float64. Everything else
(CUDA, torch.compile, autocast, the attention of a least-used read, traces) keeps the Python path, and so does
every call when the build is unavailable: the maths is the same, only slower. ``make setup`` builds them ahead of time, as does
``python -c "import neurocoder.native as n; n.main()"``, which also says whether they are in use.

Set ``NEUROCODER_NATIVE=0`` to never build or use them, or call :func:`set_enabled`.
"""

from __future__ import annotations

import hashlib
import os
import sys
import warnings
from pathlib import Path

import torch

__all__ = ["available", "ops", "set_enabled", "build", "describe", "main"]

_SOURCE = Path(__file__).resolve().parent / "csrc" / "fused_layer.cpp"
_NAME = "neurocoder_cpu_ops"
# ops: torch.ops.neurocoder_cpu once built or loaded (None before); enabled: the switch;
# error: what a failed build raised (then no further attempt is made).
_state: dict = {"ops": None, "enabled": os.environ.get("NEUROCODER_NATIVE", "1") != "0", "error": None}


def set_enabled(enabled: bool) -> None:
    """Use the C++ kernels where they apply (True, the default) or never (False: the Python path)."""
    if not isinstance(enabled, bool):
        raise TypeError(f"neurocoder.native.set_enabled: expected True or False, got {enabled!r}")
    _state["enabled"] = enabled


def _compile_flags() -> list[str]:
    """-O3; OpenMP, so that at::parallel_for splits the loops over PyTorch's threads (the soname
    resolves to the libgomp PyTorch already loaded); -fno-trapping-math, so that the clamp in the
    softmax's exp vectorises; AVX2 and FMA where PyTorch found them on this CPU."""
    flags = ["-O3", "-fopenmp", "-fno-trapping-math"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    return flags


def _build_name(flags: list[str]) -> str:
    """The build's name (its folder under TORCH_EXTENSIONS_DIR): the source, the flags and the
    PyTorch install it compiles against, hashed. So two environments (a venv and a CI clone's)
    keep a build each instead of rebuilding in turn, and a changed source never overwrites a
    library another process has loaded."""
    digest = hashlib.sha256(_SOURCE.read_bytes())
    digest.update(" ".join(flags + [torch.__version__, str(Path(torch.__file__).resolve())]).encode())
    return f"{_NAME}_{digest.hexdigest()[:12]}"


def _announce_if_building(name: str) -> None:
    """Say so on stderr when the kernels are about to be compiled (a pause of tens of seconds in
    the first call of a layer); a cached build loads silently."""
    try:
        from torch.utils.cpp_extension import _get_build_directory   # private: best effort only
        library = Path(_get_build_directory(name, False)) / f"{name}.so"
    except Exception:  # noqa: BLE001
        return
    if not library.exists():
        print(f"neurocoder: compiling the C++ CPU kernels, once (~30 s on two cores; kept in {library.parent})",
              file=sys.stderr, flush=True)


def build(verbose: bool = False):
    """Compile (or load the cached build of) the kernels; returns ``torch.ops.neurocoder_cpu``.
    Raises what the build raised (a missing compiler, a compile error)."""
    if _state["ops"] is None:
        from torch.utils import cpp_extension
        if not hasattr(torch.ops.neurocoder_cpu, "fused_layer_forward"):
            # The build runs ninja from PATH; the one pip installed beside this interpreter (a
            # dependency) counts too, also when the environment is not activated.
            scripts = str(Path(sys.executable).parent)
            path = os.environ.get("PATH")
            if scripts not in (path or "").split(os.pathsep):
                os.environ["PATH"] = scripts + (os.pathsep + path if path else "")
            try:
                flags = _compile_flags()
                name = _build_name(flags)
                _announce_if_building(name)
                cpp_extension.load(name=name, sources=[str(_SOURCE)], extra_cflags=flags,
                                   extra_ldflags=["-fopenmp"], is_python_module=False, verbose=verbose)
            finally:
                if path is None:
                    os.environ.pop("PATH", None)
                else:
                    os.environ["PATH"] = path
        _state["ops"] = torch.ops.neurocoder_cpu
    return _state["ops"]


def ops():
    """``torch.ops.neurocoder_cpu`` when the kernels are enabled and built, else None.

    The first call builds them (tens of seconds without a cached build). A failed build warns
    once, naming the error, and the library carries on with the Python path.
    """
    if not _state["enabled"] or _state["error"] is not None:
        return None
    if _state["ops"] is None:
        try:
            build()
        except Exception as error:  # noqa: BLE001 - any build failure means: use the Python path
            _state["error"] = error
            warnings.warn(f"neurocoder: the C++ CPU kernels could not be built ({type(error).__name__}: "
                          f"{str(error).strip().splitlines()[-1] if str(error).strip() else ''}); "
                          "using the Python path (same results, slower on a CPU). Install a C++ compiler "
                          "(e.g. Debian's g++) to build them, or set NEUROCODER_NATIVE=0 to silence this.",
                          RuntimeWarning, stacklevel=3)
            return None
    return _state["ops"]


def available() -> bool:
    """Whether CPU training steps of the fused layer run the C++ kernels (building them if needed)."""
    return ops() is not None


def describe() -> str:
    """One line on the kernels' state, building nothing: in use, disabled, not built yet (and
    how to build them), or the error a build raised in this process."""
    if not _state["enabled"]:
        return "disabled (NEUROCODER_NATIVE=0 or neurocoder.native.set_enabled(False)): the Python path runs"
    if _state["error"] is not None:
        error = _state["error"]
        last_line = (str(error).strip().splitlines() or [""])[-1]
        return f"the build failed ({type(error).__name__}: {last_line}); the Python path runs"
    if _state["ops"] is not None:
        return f"built from {_SOURCE.name} and in use"
    try:
        from torch.utils.cpp_extension import _get_build_directory   # private: best effort only
        name = _build_name(_compile_flags())
        library = Path(_get_build_directory(name, False)) / f"{name}.so"
    except Exception:  # noqa: BLE001
        return "state unknown (PyTorch's extension helpers changed); `neurocoder info --build` builds or loads them"
    if library.exists():
        return f"built ({library}); loaded at the first CPU training step"
    return ("not built yet: the first CPU training step compiles them (~30 s); `neurocoder info --build` "
            "does it now (needs a C++ compiler)")


def main(argv: list[str] | None = None) -> int:
    """Build the kernels (``-v``: show the compiler's output) and say whether they are in use."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        build(verbose="-v" in argv)
    except Exception as error:  # noqa: BLE001
        print(f"neurocoder.native: build failed: {type(error).__name__}: {error}")
        return 1
    print(f"neurocoder.native: C++ CPU kernels built from {_SOURCE.name}"
          + (" and in use" if _state["enabled"] else ", but disabled by NEUROCODER_NATIVE=0"))
    return 0
