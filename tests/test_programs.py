"""Synthetic program tasks: generators, models of equal size, NMI, recovery, trainer, report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from neurocoder.data.programs import modular_task, remember_task, reuse_task, shift_stream
from neurocoder.experiments.program_models import PROGRAM_MODELS, build_program_model
from neurocoder.report import load_runs, write_report
from neurocoder.report_programs import program_tables
from neurocoder.train import programs as program_trainer
from neurocoder.train.programs import ProgramConfig, normalised_mutual_information, run_programs


def test_modular_task_is_seeded_and_the_regime_is_inferable():
    task, again = modular_task(3), modular_task(3)
    assert torch.equal(task["train"].x, again["train"].x) and not torch.equal(task["train"].x, modular_task(4)["train"].x)
    test = task["test"]
    nearest = torch.cdist(test.x, task["centres"]).argmin(1)
    assert (nearest == test.program).float().mean() > 0.95                # the input tells the regime
    expected = torch.einsum("nij,nj->ni", task["programs"][test.program], test.x)
    assert torch.allclose(test.y, expected)
    assert all(torch.linalg.matrix_rank(p) == 2 for p in task["programs"])


def test_reuse_task_holds_out_combinations_but_no_piece():
    task = reuse_task(0)
    combos = task["combinations"]
    assert len(combos) == 15 and len(task["unseen"]) == 5
    assert set(task["train"].program.tolist()) == set(task["seen"])
    assert set(task["test_unseen"].program.tolist()) <= set(task["unseen"])
    assert {p for i in task["seen"] for p in combos[i]} == set(range(6))
    assert torch.equal(task["train"].context.sum(1), torch.full((len(task["train"]),), 2.0))
    expected = torch.einsum("nij,nj->ni", task["programs"][task["test_unseen"].program], task["test_unseen"].x)
    assert torch.allclose(task["test_unseen"].y, expected)


def test_shift_stream_switches_and_follows_its_programs():
    stream = shift_stream(0, segment=50, cycles=2)
    assert stream.switches == [50, 100, 150, 200, 250]
    assert stream.order == [0, 1, 2, 0, 1, 2]
    for t in (10, 60, 260):
        context, target = stream.window(t)
        current = context[:, -4:]
        predicted = current @ stream.programs[stream.program[t]].T
        predicted = 2.0 * predicted / predicted.norm(dim=1, keepdim=True)
        assert (target - predicted).norm(dim=1).mean() < 0.15               # noise 0.05 per coordinate
        wrong = current @ stream.programs[(stream.program[t] + 1) % 3].T
        assert (target - wrong).norm(dim=1).mean() > 0.5


def test_shift_stream_with_centres_keeps_each_program_around_its_own():
    """centre_spread > 0: under program k the state is c_k plus a deviation of norm sqrt(d) that
    A_k rotates, so the nearest centre names the running program; 0 is the stream as before."""
    plain = shift_stream(0, segment=50, cycles=2)
    assert torch.equal(shift_stream(0, segment=50, cycles=2, centre_spread=0.0).states, plain.states)
    stream = shift_stream(0, segment=50, cycles=2, centre_spread=2.0)
    centres = stream.centres
    assert torch.equal(plain.centres, torch.zeros(3, 4))
    torch.testing.assert_close(centres.norm(dim=1), torch.full((3,), 4.0))     # 2 x sqrt(d)
    torch.testing.assert_close(centres @ centres.T, 16.0 * torch.eye(3), atol=1e-5, rtol=0)   # orthogonal
    for t in (10, 60, 140, 260):               # a few steps after a switch and later
        context, target = stream.window(t)
        k = stream.program[t]
        torch.testing.assert_close((target - centres[k]).norm(dim=1), torch.full((16,), 2.0))
        # The most recent state given to the model already names the program (t is 10+ steps
        # past a switch): nearest centre.
        nearest = torch.cdist(context[:, -4:], centres).argmin(dim=1)
        assert (nearest == k).float().mean() > 0.9
    with pytest.raises(ValueError, match="shift_centre_spread=-1"):
        ProgramConfig(shift_centre_spread=-1).check()


def test_remember_task_separates_the_two_programs():
    task = remember_task(0)
    assert set(task["A"]["train"].program.tolist()) == {0} and set(task["B"]["test"].program.tolist()) == {1}


def test_normalised_mutual_information():
    a = torch.tensor([0, 0, 1, 1, 2, 2] * 50)
    assert normalised_mutual_information(a, a) == pytest.approx(1.0)
    assert normalised_mutual_information(a, (a + 1) % 3 + 10) == pytest.approx(1.0)  # names do not matter
    independent = torch.randint(0, 3, (30000,), generator=torch.Generator().manual_seed(0))
    other = torch.randint(0, 3, (30000,), generator=torch.Generator().manual_seed(1))
    assert normalised_mutual_information(independent, other) < 0.01
    merged = torch.where(a == 2, 1, a)                                       # two regimes on one slot
    assert 0.4 < normalised_mutual_information(a, merged) < 0.9


@pytest.mark.parametrize("context", [None, 6])
def test_program_models_have_about_the_same_size(context):
    size = lambda m: sum(p.numel() for p in m.parameters())
    reference = size(build_program_model("nc-ff", 8, 8, context))
    x = torch.randn(3, 8)
    ctx = None if context is None else torch.randn(3, context)
    for kind in PROGRAM_MODELS:
        model = build_program_model(kind, 8, 8, context)
        assert model(x, ctx).shape == (3, 8)
        if kind != "nc-rnn":
            assert abs(size(model) - reference) / reference < 0.1, kind
        reads = model.reads(x, ctx)
        if kind == "mlp":
            assert reads is None
        else:
            assert torch.allclose(reads.sum(-1), torch.ones(3), atol=1e-5)


def test_recovery_time():
    errors = [1.0] * 20 + [0.05] * 80
    assert program_trainer._recovery(errors, 0, 100) == 21                  # first step of the good stretch
    assert program_trainer._recovery([1.0] * 100, 0, 100) == 100            # never: the whole segment


@pytest.mark.parametrize("task", ["modular", "reuse", "shift", "remember"])
def test_trainer_runs_every_task(tmp_path, task, monkeypatch):
    if task == "shift":   # a short stream keeps the test quick
        original = program_trainer.shift_stream
        monkeypatch.setattr(program_trainer, "shift_stream", lambda seed, **options: original(seed, segment=60, cycles=2, **options))
    short = {} if task == "shift" else {"epochs": 3}       # the stream has no epochs
    cfg = ProgramConfig(task=task, model="nc-ff", seeds=2, **short)
    results = run_programs(cfg, tmp_path / task, quiet=True)
    assert results["seeds"] == 2
    for key in program_trainer.SUMMARY_KEYS[task]:
        assert key in results["summary"], key
    seeds = [json.loads(p.read_text()) for p in sorted((tmp_path / task / "seeds").glob("*.json"))]
    assert seeds[0]["seed"] != seeds[1]["seed"]
    if task == "modular":
        assert 0.0 <= results["summary"]["nmi"]["mean"] <= 1.0
        assert len(seeds[0]["usage_by_program"]) == 4
    if task == "shift":
        assert len(seeds[0]["errors"]) == 60 * 6
    again = run_programs(cfg, tmp_path / task, resume=True, quiet=True)      # finished seeds are kept
    assert again["summary"] == results["summary"]
    with pytest.raises(ValueError, match="differs"):
        run_programs(ProgramConfig(task=task, model="mlp", seeds=2, **short), tmp_path / task, resume=True, quiet=True)


def test_report_reads_program_runs(tmp_path, monkeypatch):
    original = program_trainer.shift_stream
    monkeypatch.setattr(program_trainer, "shift_stream", lambda seed, **options: original(seed, segment=40, cycles=2, **options))
    for model in ("mlp", "nc-ff"):
        run_programs(ProgramConfig(task="shift", model=model, seeds=2), tmp_path / f"shift-{model}", quiet=True)
        run_programs(ProgramConfig(task="modular", model=model, seeds=1, epochs=2), tmp_path / f"mod-{model}",
                     quiet=True)
    runs = load_runs([tmp_path])
    table = program_tables(runs)
    assert "3. Pattern shift" in table and "MLP (same size)" in table and "NMI" in table
    write_report(runs, tmp_path / "report")
    assert (tmp_path / "report" / "programs_shift_errors.png").is_file()
    assert (tmp_path / "report" / "programs_modular_usage.png").is_file()


def test_report_finds_runs_at_any_depth_and_names_what_it_leaves_out(tmp_path, capsys):
    cfg = ProgramConfig(task="modular", model="mlp", seeds=1, epochs=1)
    run_programs(cfg, tmp_path / "results" / "group" / "run", quiet=True)
    demo = tmp_path / "results" / "demo"
    demo.mkdir()
    (demo / "config.json").write_text(json.dumps({"config": {"dataset": "fashion-mnist", "epochs": 1}}))
    (demo / "results.json").write_text(json.dumps({"table": {}}))
    unfinished = tmp_path / "results" / "group" / "started"
    (unfinished / "seeds").mkdir(parents=True)
    (unfinished / "config.json").write_text("{}")
    runs = load_runs([tmp_path / "results"])
    assert [run["path"] for run in runs] == [tmp_path / "results" / "group" / "run"]
    err = capsys.readouterr().err
    assert "left out 1 `neurocoder demo` folder" in err and "left out 1 unfinished run(s)" in err
    assert str(unfinished) in err
    with pytest.raises(ValueError, match="holds no run config"):       # named on its own, it is no run
        load_runs([demo])
    with pytest.raises(FileNotFoundError, match="only demo folders"):
        load_runs([_only_demo(tmp_path)])
    (tmp_path / "results" / "group" / "run" / "results.json").write_text("{damaged")
    with pytest.raises(ValueError, match="may be damaged"):
        load_runs([tmp_path / "results"])


def _only_demo(tmp_path):
    folder = tmp_path / "demos"
    (folder / "one").mkdir(parents=True)
    (folder / "one" / "config.json").write_text(json.dumps({"config": {"dataset": "fashion-mnist"}}))
    (folder / "one" / "results.json").write_text(json.dumps({"table": {}}))
    return folder


def test_bad_program_config():
    with pytest.raises(ValueError, match="model='transformer'"):
        ProgramConfig(model="transformer").check()
    with pytest.raises(ValueError, match="online_optimizer='rmsprop'"):
        ProgramConfig(online_optimizer="rmsprop").check()


def test_settings_a_task_ignores_are_refused():
    """The online stream's settings on the offline tasks, and the offline training's on the
    stream, are refused by name instead of being recorded as if they had applied."""
    ProgramConfig(task="shift", online_lr=3e-3, online_optimizer="sgd", shift_centre_spread=2.0).check()
    ProgramConfig(task="reuse", lr=1e-3, epochs=150, batch_size=32).check()
    for task in ("modular", "reuse", "remember"):
        with pytest.raises(ValueError, match=f"online_lr=0.003 set for task='{task}'.*task 'shift' only"):
            ProgramConfig(task=task, online_lr=3e-3).check()
    with pytest.raises(ValueError, match="shift_centre_spread=2.0 set for task='reuse'"):
        ProgramConfig(task="reuse", shift_centre_spread=2.0).check()
    with pytest.raises(ValueError, match="epochs=150, lr=0.001 set for task='shift'.*online_lr"):
        ProgramConfig(task="shift", epochs=150, lr=1e-3).check()


def test_shift_runs_with_plain_sgd(monkeypatch):
    original = program_trainer.shift_stream
    monkeypatch.setattr(program_trainer, "shift_stream", lambda seed, **options: original(seed, segment=30, cycles=2, **options))
    cfg = ProgramConfig(task="shift", model="nc-ff", seeds=1, online_optimizer="sgd", online_lr=0.1)
    result = program_trainer._shift(cfg, 100, torch.Generator().manual_seed(0))
    errors = torch.tensor(result["errors"])
    assert len(errors) == 30 * 6 and torch.isfinite(errors).all()
    assert errors[-10:].mean() < errors[:10].mean()          # it learns


def test_report_keeps_a_row_for_each_run_of_the_same_task_and_model(tmp_path):
    """Two folders of one task and model (say two learning rates) are two labelled rows, and a
    folder archived without its per-seed files does not stop the figures."""
    from neurocoder.report_programs import program_figures, program_tables

    runs = []
    for name, value in (("lr-a", 11.0), ("lr-b", 22.0)):
        (tmp_path / name).mkdir()
        runs.append({"path": str(tmp_path / name), "config": {"kind": "programs", "task": "shift", "model": "nc-ff"},
                     "parameters": 7, "seeds": 1,
                     "summary": {"recovery_recurring": {"mean": value, "std": 0.0}}})
    table = program_tables(runs)
    assert "| Neurocoder, feed-forward (lr-a) | 7 | - | 11.0 +- 0.0 |" in table
    assert "| Neurocoder, feed-forward (lr-b) | 7 | - | 22.0 +- 0.0 |" in table
    program_figures(runs, tmp_path)              # no seeds/ folders: nothing to draw, no error


def test_report_names_the_settings_that_set_a_row_apart_from_the_defaults(tmp_path):
    """In one table, a lone row whose settings vary from the other rows' names those where it is
    not at the trainer's default (so an NSM run at another learning rate never reads as the
    default NSM), and a row at the defaults stays bare."""
    from neurocoder.report_programs import program_tables

    runs = []
    for name, model, extra in (("mlp", "mlp", {}), ("nsm", "nsm", {"routing_lr_scale": 0.3, "online_lr": 0.003}),
                               ("nc", "nc-ff", {"routing_lr_scale": 0.3, "nc_options": {"rank": 6}})):
        (tmp_path / name).mkdir()
        runs.append({"path": str(tmp_path / name),
                     "config": {"kind": "programs", "task": "shift", "model": model, "online_lr": 0.01,
                                "routing_lr_scale": 1.0, **extra},
                     "parameters": 7, "seeds": 1, "summary": {"recovery_recurring": {"mean": 5.0, "std": 0.0}}})
    table = program_tables(runs)
    assert "| MLP (same size) | 7 |" in table
    assert "| NSM (online_lr=0.003, routing_lr_scale=0.3) | 7 |" in table
    assert "| Neurocoder, feed-forward (nc_options.rank=6, routing_lr_scale=0.3) | 7 |" in table


def test_figure_legend_names_only_the_settings_the_plotted_runs_differ_in(tmp_path):
    """The shift figure's legend: each model and the settings in which the plotted runs differ,
    not the settings they share (those stay in the table's labels); runs that would read alike
    keep their full labels."""
    from neurocoder.report_programs import _figure_labels, _model_label, _program_runs, program_tables

    shared = {"shift_centre_spread": 2.0, "shift_input_constant": True, "nc_options": {"num_programs": 64}}
    runs = []
    for name, model, extra in (("nc", "nc-ff", {"online_lr": 0.007, "shift_context": "cue"}),
                               ("mlp-cue", "mlp", {"online_lr": 0.01, "shift_context": "cue"}),
                               ("mlp-states", "mlp", {"online_lr": 0.01, "shift_context": "states"})):
        (tmp_path / name).mkdir()
        runs.append({"path": str(tmp_path / name),
                     "config": {"kind": "programs", "task": "shift", "model": model, **shared, **extra},
                     "parameters": 7, "seeds": 1, "summary": {"recovery_recurring": {"mean": 5.0, "std": 0.0}}})
    members = _program_runs(runs)["shift"]
    legend = sorted(_figure_labels(members).values())
    assert legend == ['MLP (same size) (online_lr=0.01, shift_context="cue")',
                      'MLP (same size) (online_lr=0.01, shift_context="states")',
                      'Neurocoder, feed-forward (online_lr=0.007, shift_context="cue")']
    assert "shift_input_constant=true" in program_tables(runs)         # the table still names them
    twins = {label: members[label] for label in list(members)[1:]}
    for run in twins.values():
        run["config"]["shift_context"] = "cue"
    assert sorted(_figure_labels(twins).values()) == sorted(_model_label(label) for label in twins)


def test_labels_do_not_name_an_option_group_left_unset(tmp_path):
    """A run that left ``nc_options`` unset (None: the model's own options) beside runs that set
    some: labels name the options that differ (``nc_options.rank=6``), never ``nc_options=null``."""
    from neurocoder.report_programs import _figure_labels, _program_runs, program_tables

    runs = []
    for name, model, extra in (("mlp", "mlp", {"nc_options": None}), ("nc", "nc-ff", {"nc_options": None}),
                               ("nc-rank", "nc-ff", {"nc_options": {"rank": 6}})):
        (tmp_path / name).mkdir()
        runs.append({"path": str(tmp_path / name),
                     "config": {"kind": "programs", "task": "shift", "model": model, "online_lr": 0.01, **extra},
                     "parameters": 7, "seeds": 1, "summary": {"recovery_recurring": {"mean": 5.0, "std": 0.0}}})
    members = _program_runs(runs)["shift"]
    legend = sorted(_figure_labels(members).values())
    assert legend == ["MLP (same size)", "Neurocoder, feed-forward",
                      "Neurocoder, feed-forward (nc_options.rank=6)"]
    assert "null" not in program_tables(runs) + " ".join(members)


def test_report_names_what_a_run_started_from_python_changed_over_the_defaults(tmp_path):
    """A run folder made through the Python API names no preset: its row is labelled by the
    settings in which it differs from ProgramConfig's defaults (bookkeeping such as threads and
    the seeds left out), as a command-line run's is by what --set changed over its preset."""
    from dataclasses import asdict

    from neurocoder.report_programs import program_tables

    config = {**asdict(ProgramConfig(task="reuse", model="nc-ff", seeds=2, routing_l1=0.001, threads=1,
                                     nc_options={"rank": 6})), "kind": "programs", "preset": None}
    (tmp_path / "api").mkdir()
    runs = [{"path": str(tmp_path / "api"), "config": config, "parameters": 7, "seeds": 2,
             "summary": {"unseen_error": {"mean": 0.2, "std": 0.0}}}]
    table = program_tables(runs)
    assert "| Neurocoder, feed-forward (nc_options.rank=6, routing_l1=0.001) | 7 |" in table, table


@pytest.mark.parametrize("kind", sorted(PROGRAM_MODELS))
def test_routing_parameters_and_their_learning_rate(kind):
    """Every model splits into routing parameters (what chooses the read: composer and keys, NSM's
    query and keys, MoE's gate; the MLP's hidden layer as the control) and the rest; with
    routing_lr_scale 0 an optimiser step leaves the routing untouched and moves the rest; at 1 the
    optimiser is the plain one (one group), so earlier runs are reproduced exactly."""
    from neurocoder.experiments.program_models import parameter_groups, routing_parameters

    torch.manual_seed(0)
    model = build_program_model(kind, 4, 4, 12)
    names = dict(model.named_parameters())
    routing = routing_parameters(model)
    assert routing and set(routing) < set(names)
    if kind.startswith("nc"):
        assert any(n.startswith("layer.composer.") for n in routing)
        assert not any(n.endswith("_values") for n in routing)        # the programs themselves learn at lr
    assert len(parameter_groups(model, 0.1)) == 1
    groups = parameter_groups(model, 0.1, 0.0)
    assert [g["lr"] for g in groups] == [0.1, 0.0]
    assert sum(len(g["params"]) for g in groups) == len(names)
    optimizer = torch.optim.SGD(groups, lr=0.1)
    before = {n: p.detach().clone() for n, p in names.items()}
    x, context = torch.randn(8, 4), torch.randn(8, 12)
    model(x, context).square().sum().backward()
    optimizer.step()
    for n, p in names.items():
        if n in routing:
            assert torch.equal(p, before[n]), n
    assert any(not torch.equal(p, before[n]) for n, p in names.items() if n not in routing)


def test_routing_lr_scale_is_checked_and_one_reproduces_the_default(tmp_path, monkeypatch):
    original = program_trainer.shift_stream
    monkeypatch.setattr(program_trainer, "shift_stream", lambda seed, **options: original(seed, segment=40, cycles=2, **options))
    with pytest.raises(ValueError, match="routing_lr_scale=-0.5 \\(must be >= 0\\)"):
        ProgramConfig(routing_lr_scale=-0.5).check()
    default = run_programs(ProgramConfig(task="shift", model="nc-ff", seeds=1), tmp_path / "a", quiet=True)
    same = run_programs(ProgramConfig(task="shift", model="nc-ff", seeds=1, routing_lr_scale=1.0), tmp_path / "b", quiet=True)
    slower = run_programs(ProgramConfig(task="shift", model="nc-ff", seeds=1, routing_lr_scale=0.3), tmp_path / "c", quiet=True)
    assert same["summary"] == default["summary"]
    assert slower["summary"] != default["summary"]


@pytest.mark.parametrize("kind", ["nc-ff", "mlp"])
def test_routing_optimizer_gives_the_routing_its_own_optimiser(kind):
    """routing_optimizer='adam' with online_optimizer='sgd': Adam over exactly the routing
    parameters at online_lr x routing_lr_scale, SGD over the rest at online_lr; 'same' (or the
    online optimiser's own name) keeps the single optimiser of every earlier run."""
    from neurocoder.experiments.program_models import routing_parameters

    torch.manual_seed(0)
    model = build_program_model(kind, 4, 4, 12)
    names = dict(model.named_parameters())
    routing = {id(names[n]) for n in routing_parameters(model)}
    cfg = ProgramConfig(task="shift", model=kind, online_optimizer="sgd", routing_optimizer="adam",
                        online_lr=0.02, routing_lr_scale=0.5)
    cfg.check()
    both = program_trainer._online_optimizer(model, cfg)
    sgd, adam = both.optimizers
    assert type(sgd) is torch.optim.SGD and type(adam) is torch.optim.Adam
    assert {id(p) for g in adam.param_groups for p in g["params"]} == routing
    assert {id(p) for g in sgd.param_groups for p in g["params"]} == {id(p) for p in names.values()} - routing
    assert [g["lr"] for g in adam.param_groups] == [0.01] and [g["lr"] for g in sgd.param_groups] == [0.02]
    # One step: Adam moves a routing parameter by about its learning rate even where the gradient
    # is tiny, SGD moves the rest by lr x gradient.
    before = {n: p.detach().clone() for n, p in names.items()}
    both.zero_grad()
    (1e-6 * model(torch.randn(8, 4), torch.randn(8, 12)).square().sum()).backward()
    both.step()
    moved = {n: (p - before[n]).abs().max().item() for n, p in names.items()}
    assert max(moved[n] for n in routing_parameters(model)) > 1e-3
    assert max(v for n, v in moved.items() if n not in routing_parameters(model)) < 1e-5
    single = program_trainer._online_optimizer(model, ProgramConfig(task="shift", online_optimizer="sgd",
                                                                     routing_optimizer="sgd"))
    assert type(single) is torch.optim.SGD
    with pytest.raises(ValueError, match="routing_optimizer='lbfgs'"):
        ProgramConfig(task="shift", routing_optimizer="lbfgs").check()
    with pytest.raises(ValueError, match="routing_optimizer='adam' set for task='reuse'"):
        ProgramConfig(task="reuse", routing_optimizer="adam").check()


@pytest.mark.parametrize("kind", sorted(PROGRAM_MODELS))
def test_routing_l1_penalises_exactly_the_maps_that_choose_the_read(kind):
    """routing_l1 adds weight x sum |w| over the routing weight matrices (composer, NSM query map,
    MoE gate, the MLP's hidden layer) and nothing else: keys, biases and the programs are left
    out; 0 adds nothing; a negative weight is refused by name."""
    from neurocoder.experiments.program_models import routing_maps, routing_parameters

    torch.manual_seed(0)
    model = build_program_model(kind, 4, 4, 12)
    maps = routing_maps(model)
    routing = dict(model.named_parameters())
    routing = {routing[name] for name in routing_parameters(model)}
    assert maps and all(w.dim() == 2 and any(w is r for r in routing) for w in maps)
    names = {id(p): n for n, p in model.named_parameters()}
    assert not any("key" in names[id(w)] or names[id(w)].endswith("bias") for w in maps)
    base = program_trainer._penalties(model, ProgramConfig(model=kind))
    assert torch.equal(program_trainer._penalties(model, ProgramConfig(model=kind, routing_l1=0.0)), base)
    penalised = program_trainer._penalties(model, ProgramConfig(model=kind, routing_l1=0.5))
    expected = base + 0.5 * sum(w.abs().sum() for w in maps)
    assert torch.allclose(penalised, expected)
    penalised.backward()
    for n, p in model.named_parameters():           # the L1 term reaches the maps only
        if kind in ("mlp", "nsm") and p.grad is not None and not any(p is w for w in maps):
            assert not p.grad.abs().sum() > 0, n
    with pytest.raises(ValueError, match="routing_l1=-1.0 \\(must be >= 0\\)"):
        ProgramConfig(routing_l1=-1.0).check()


def test_the_seed_setting_chooses_the_tasks(tmp_path):
    """--set seed=S gives other tasks, not only other initial weights; seed 0 keeps tasks 100, 101,
    ... (the README's tables); every model run with one S sees the same tasks."""
    assert [program_trainer.task_seed(0, i) for i in range(3)] == [100, 101, 102]
    assert program_trainer.task_seed(7, 2) == 7102
    seen = {}
    for seed in (0, 7):
        for model in ("mlp", "nc-ff"):
            cfg = ProgramConfig(task="reuse", model=model, seeds=2, seed=seed, epochs=1)
            results = run_programs(cfg, tmp_path / f"{model}-{seed}", quiet=True)
            assert results["task_seeds"] == [program_trainer.task_seed(seed, 0), program_trainer.task_seed(seed, 1)]
            records = [json.loads(p.read_text()) for p in sorted((tmp_path / f"{model}-{seed}" / "seeds").glob("*.json"))]
            assert [r["task_seed"] for r in records] == results["task_seeds"]
            seen[seed, model] = results["task_seeds"]
    assert seen[0, "mlp"] == seen[0, "nc-ff"] and seen[7, "mlp"] == seen[7, "nc-ff"]
    assert not set(seen[0, "mlp"]) & set(seen[7, "mlp"])
    # The task itself follows: another seed draws other held-out combinations or pieces.
    first, other = reuse_task(100), reuse_task(7100)
    assert not torch.equal(first["pieces"][0], other["pieces"][0])


def test_resuming_a_folder_whose_tasks_predate_the_seed_setting_is_refused(tmp_path):
    """A folder written when the task was 100 + index whatever the seed: resuming it with a seed
    other than 0 would mix two sets of tasks, so it is refused with what to do; with seed 0 the
    tasks are the same and it resumes."""
    for seed in (0, 3):
        cfg = ProgramConfig(task="reuse", model="mlp", seeds=2, seed=seed, epochs=1)
        folder = tmp_path / f"legacy-{seed}"
        run_programs(cfg, folder, quiet=True)
        (folder / "seeds" / "seed-01.json").unlink()             # an interrupted run
        record_path = folder / "seeds" / "seed-00.json"
        record = json.loads(record_path.read_text())
        del record["task_seed"]                                   # as written before the change
        record_path.write_text(json.dumps(record))
        if seed:
            with pytest.raises(ValueError, match="predates task seeds.*start a new run folder"):
                run_programs(cfg, folder, resume=True, quiet=True)
        else:
            resumed = run_programs(cfg, folder, resume=True, quiet=True)
            assert resumed["seeds"] == 2 and resumed["task_seeds"] == [100, 101]


def test_paired_seeds_matches_seeds_by_their_recorded_value(tmp_path, capsys):
    """scripts/paired_seeds.py (README, pattern shift): the paired difference over the seeds both
    folders have, matched by the recorded seed (not by file name), its standard error, the counts
    of each side lower; a missing figure or no shared seed is named."""
    import importlib.util
    import math
    import statistics

    spec = importlib.util.spec_from_file_location(
        "paired_seeds", Path(__file__).resolve().parents[1] / "scripts" / "paired_seeds.py")
    paired = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(paired)

    def folder(name, records):
        (tmp_path / name / "seeds").mkdir(parents=True)
        for i, (seed, value) in enumerate(records):
            record = {"seed": seed, "recovery_recurring": value, "errors": [1.0]}
            (tmp_path / name / "seeds" / f"seed-{i:02d}.json").write_text(json.dumps(record))
        return tmp_path / name

    a = folder("a", [(7, 10.0), (8, 12.0), (9, 9.0), (11, 1.0)])
    b = folder("b", [(9, 13.0), (8, 12.5), (7, 11.0)])          # other file order; no seed 11
    row = paired.main([str(a), str(b)])
    differences = [-1.0, -0.5, -4.0]
    assert row["seeds"] == 3 and row["only_one"] == 1
    assert row["difference"] == pytest.approx(statistics.mean(differences))
    assert row["standard_error"] == pytest.approx(statistics.stdev(differences) / math.sqrt(3))
    assert (row["a_lower"], row["b_lower"]) == (3, 0)
    assert "A lower on 3, B lower on 0" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="has no 'final_error'.*recovery_recurring"):
        paired.main([str(a), str(b), "--key", "final_error"])
    with pytest.raises(SystemExit, match="share no seed"):
        paired.main([str(a), str(folder("c", [(1, 3.0)]))])
    with pytest.raises(SystemExit, match="no seeds/seed"):
        paired.main([str(a), str(tmp_path)])
    # Several folders per side: their seeds pooled, a seed twice on one side refused.
    pooled = paired.main([f"{a},{folder('a2', [(20, 5.0)])}", f"{b},{folder('b2', [(20, 4.0)])}"])
    assert pooled["seeds"] == 4 and pooled["difference"] == pytest.approx(statistics.mean(differences + [1.0]))
    assert (pooled["a_lower"], pooled["b_lower"]) == (3, 1)
    with pytest.raises(SystemExit, match=r"seed\(s\) \[7\] appear in two folders of one side"):
        paired.main([f"{a},{folder('a3', [(7, 1.0)])}", str(b)])
    # Program runs record their task: the same seed on two different tasks is not a pair.
    def tasked(name, records):
        path = folder(name, [(seed, value) for seed, value, _ in records])
        for i, (_, _, task) in enumerate(records):
            record_path = path / "seeds" / f"seed-{i:02d}.json"
            record_path.write_text(json.dumps({**json.loads(record_path.read_text()), "task_seed": task}))
        return path
    same = paired.main([str(tasked("t1", [(7, 1.0, 107), (8, 2.0, 108)])), str(tasked("t2", [(7, 2.0, 107), (8, 2.5, 108)]))])
    assert same["seeds"] == 2
    with pytest.raises(SystemExit, match=r"seed\(s\) \[8\] ran on different tasks"):
        paired.main([str(tasked("t3", [(7, 1.0, 107), (8, 2.0, 108)])), str(tasked("t4", [(7, 2.0, 107), (8, 2.5, 8108)]))])


def test_reuse_probe_hand_built_layer_composes_every_program_exactly():
    """scripts/probe_reuse_solution.py (README, reuse): the hand-built layer (one component per
    piece, an empty slot for the pieces a cue leaves out) gives W_S x for seen and unseen
    combinations alike, so the sum of cued pieces is within a Neurocoder layer's reach; and with
    the orthogonality loss off, training from that start keeps it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "probe_reuse_solution", Path(__file__).resolve().parents[1] / "scripts" / "probe_reuse_solution.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    task = reuse_task(100)
    a, b = task["pieces"]
    assert torch.allclose(task["programs"][0], torch.outer(a[0], b[0]) + torch.outer(a[1], b[1]))
    model = probe.hand_built(task)
    for split in ("test_seen", "test_unseen"):
        data = task[split]
        with torch.no_grad():
            prediction = model(data.x, data.context)
        assert (prediction - data.y).abs().max() < 1e-4 * data.y.abs().max()
    # A different cue (one piece swapped) gives a different program: the reads follow the cue.
    cue = task["cues"][task["unseen"][0]].clone()
    on = cue.nonzero().flatten().tolist()
    off = next(j for j in range(6) if j not in on)
    swapped = cue.clone()
    swapped[on[0]], swapped[off] = 0.0, 1.0
    x = torch.randn(4, 8)
    with torch.no_grad():
        assert not torch.allclose(model(x, cue.expand(4, -1)), model(x, swapped.expand(4, -1)), atol=1e-3)
    seen, unseen = probe.trained_errors(model, task, 0, orthogonality_weight=0.0, epochs=3)
    assert seen < 1e-3 and unseen < 1e-3


def test_transition_context_reads_the_program_off_successive_states():
    """shift_context='transitions': sum over successive pairs of x_{t+1} x_t^T. Exactly that
    algebra, and on the default stream (states alone do not name the program) its average over
    the parallel sequences is close to the running rotation: it names the program."""
    history = torch.randn(5, 3 * 4)
    states = history.view(5, 3, 4)
    expected = sum(torch.einsum("bi,bj->bij", states[:, t + 1], states[:, t]) for t in range(2)).flatten(1)
    torch.testing.assert_close(program_trainer.shift_context(history, 4), expected)
    stream = shift_stream(3, segment=50, cycles=2, parallel=256)
    for t in (20, 70, 120):
        context, _ = stream.window(t)
        estimate = program_trainer.shift_context(context, 4).mean(0).view(4, 4) / 2      # two pairs
        distances = [(estimate - program).norm().item() for program in stream.programs]
        assert min(range(3), key=distances.__getitem__) == int(stream.program[t])
        assert min(distances) < 0.5 * sorted(distances)[1]
    with pytest.raises(ValueError, match="shift_context='pairs'"):
        ProgramConfig(task="shift", shift_context="pairs").check()
    with pytest.raises(ValueError, match="shift_context='transitions' set for task='modular'"):
        ProgramConfig(task="modular", shift_context="transitions").check()


def test_fit_context_is_the_running_program_once_the_window_is_inside_a_segment():
    """shift_context='fit': the least-squares map from each state to the next over the window.
    On the default stream (states alone do not name the program) and a window of 6 states it is
    the running rotation to within 10% for the median sequence (a few windows whose states lie
    near a plane are further off), while the window of 3 the table uses is not enough (2 pairs
    cannot fix a 4 x 4 map). Exact on noise-free pairs without the ridge."""
    rotation, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    states = [torch.randn(2, 4, dtype=torch.float64)]
    for _ in range(5):
        states.append(states[-1] @ rotation.T)
    history = torch.stack(states, dim=1).flatten(1)                           # (2, 6 x 4)
    fitted = program_trainer.shift_fit(history, 4, ridge=0.0).view(2, 4, 4)
    torch.testing.assert_close(fitted, rotation.expand(2, 4, 4))
    for history_length, within in ((6, True), (3, False)):
        stream = shift_stream(3, segment=50, cycles=2, history=history_length)
        for t in (20, 70, 120):
            window, _ = stream.window(t)
            fitted = program_trainer.shift_fit(window, 4).view(-1, 4, 4)
            program = stream.programs[int(stream.program[t])]
            relative = (fitted - program).norm(dim=(1, 2)) / program.norm()
            assert (relative.median().item() < 0.1) is within
            assert within or relative.median().item() > 0.3
    with pytest.raises(ValueError, match="shift_history=1"):
        ProgramConfig(task="shift", shift_history=1).check()
    with pytest.raises(ValueError, match="shift_history"):
        ProgramConfig(task="modular", shift_history=6).check()


def test_pooled_fit_names_the_new_program_one_step_after_a_switch():
    """shift_context='fit-pooled': one map fitted to the pairs of every sequence of the batch (the
    parallel sequences share their program). With a window of 2 states a sequence's own fit has
    one pair and cannot fix the 4 x 4 map; the batch's 16 pairs do, from the first step whose pair
    the new program made (t = switch + 1; at t = switch the pair is still the old program's)."""
    stream = shift_stream(3, segment=50, cycles=2, history=2)
    for t in (20, 50, 51, 120):
        window, _ = stream.window(t)
        pooled = program_trainer.shift_fit(window, 4, pooled=True).view(-1, 4, 4)
        own = program_trainer.shift_fit(window, 4).view(-1, 4, 4)
        assert pooled.shape == own.shape == (16, 4, 4)
        assert torch.equal(pooled, pooled[:1].expand_as(pooled))           # one map for the batch
        made_by = stream.programs[int(stream.program[t - 1])]               # the window's pair
        assert ((pooled[0] - made_by).norm() / made_by.norm()).item() < 0.05
        assert ((own - made_by).norm(dim=(1, 2)) / made_by.norm()).median().item() > 0.3
    # At the switch the window's pair is the old program's, so the pooled fit is too.
    window, _ = stream.window(50)
    assert int(stream.program[50]) != int(stream.program[49])
    cfg = ProgramConfig(task="shift", shift_context="fit-pooled", shift_history=2)
    _, context = program_trainer.shift_inputs(window, int(stream.program[50]), 4, 3, cfg)
    torch.testing.assert_close(context, program_trainer.shift_fit(window, 4, pooled=True))


def test_affine_pooled_fit_recovers_a_centred_programs_map_and_offset():
    """shift_context='fit-pooled-affine': with centres each program is affine,
    x_{t+1} = A_k x_t + (I - A_k) c_k (the deviation's rescaling is 1 on its sphere); the pooled
    affine fit returns [A_k b_k] row by row, and the linear fit of 'fit-pooled' cannot carry b_k."""
    stream = shift_stream(41100, segment=100, cycles=1, history=3, centre_spread=2.0)
    t = 60                                                                  # well inside program 0
    window, target = stream.window(t)
    program = int(stream.program[t - 1])
    fitted = program_trainer.shift_fit(window, 4, pooled=True, affine=True).view(-1, 4, 5)
    assert fitted.shape == (16, 4, 5) and torch.equal(fitted, fitted[:1].expand_as(fitted))
    affine_map, offset = fitted[0, :, :4], fitted[0, :, 4]
    true_map = stream.programs[program]
    true_offset = stream.centres[program] - true_map @ stream.centres[program]
    state = window[:, -4:]
    prediction = state @ affine_map.T + offset
    assert ((prediction - target).pow(2).mean() / target.pow(2).mean()).item() < 0.02
    assert ((state @ true_map.T + true_offset - target).pow(2).mean() / target.pow(2).mean()).item() < 0.02
    linear = program_trainer.shift_fit(window, 4, pooled=True).view(-1, 4, 4)[0]
    assert ((state @ linear.T - target).pow(2).mean() / target.pow(2).mean()).item() > 0.1
    cfg = ProgramConfig(task="shift", shift_context="fit-pooled-affine", shift_history=3)
    _, context = program_trainer.shift_inputs(window, program, 4, 3, cfg)
    assert context.shape == (16, 20)


def test_fit_reference_applies_the_pooled_fit_and_scores_it_like_a_run():
    """scripts/shift_fit_reference.py (README, pattern shift (a'')): the pooled fit applied
    directly names the new program one step after a switch, so it is back under the threshold in
    about two steps; one sequence's own fit from a window of 2 states (one pair, a 4 x 4 map)
    never is. Its scoring is the run's: the same recovery rule on the same per-step errors."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "shift_fit_reference", Path(__file__).resolve().parents[1] / "scripts" / "shift_fit_reference.py")
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    assert reference.parse_streams(["39100-39102", "5"]) == [39100, 39101, 39102, 5]
    with pytest.raises(SystemExit, match="not a seed or a range"):
        reference.parse_streams(["39100-x"])
    pooled = reference.reference(39100, history=2, pooled=True)
    assert 1 <= pooled["recovery_recurring"] <= 3 and pooled["final_error"] < 0.01
    own = reference.reference(39100, history=2, pooled=False)
    assert own["recovery_recurring"] == own["recovery_first"] == 300 and own["final_error"] > 0.3


def test_shift_runs_with_the_transition_context(monkeypatch):
    original = program_trainer.shift_stream
    monkeypatch.setattr(program_trainer, "shift_stream", lambda seed, **options: original(seed, segment=30, cycles=2, **options))
    built, contexts = [], []
    build = program_trainer.build_program_model

    def spy_build(kind, in_features, out_features, context_features, nc_options):
        built.append(context_features)
        model = build(kind, in_features, out_features, context_features, nc_options)
        forward = model.forward
        model.forward = lambda x, context=None: contexts.append(context.shape) or forward(x, context)
        return model

    monkeypatch.setattr(program_trainer, "build_program_model", spy_build)
    for model in ("nc-ff", "mlp"):
        for context, history in (("transitions", 3), ("fit", 6), ("fit-pooled", 2), ("fit-pooled-affine", 3)):
            cfg = ProgramConfig(task="shift", model=model, seeds=1, shift_context=context, shift_history=history)
            result = program_trainer._shift(cfg, 100, torch.Generator().manual_seed(0))
            assert len(result["errors"]) == 6 * 30
            assert torch.isfinite(torch.tensor(result["errors"])).all()
    # Both models were built for, and given, the 4 x 4 map (not the 3 x 4 or 6 x 4 states), or
    # with the affine fit the 4 x 5 map and offset.
    assert built == [16, 16, 16, 20] * 2
    assert set(contexts) == {torch.Size([16, 16]), torch.Size([16, 20])}


def test_shift_inputs_give_the_layer_its_input_and_the_composer_its_context():
    """shift_input / shift_input_constant / shift_context='cue' | 'states+cue': exact contents."""
    history = torch.randn(5, 3 * 4)
    cfg = ProgramConfig(task="shift")
    layer_input, context = program_trainer.shift_inputs(history, 2, 4, 3, cfg)
    torch.testing.assert_close(layer_input, history[:, -4:])
    torch.testing.assert_close(context, history)
    cfg = ProgramConfig(task="shift", shift_input="history", shift_input_constant=True, shift_context="cue")
    layer_input, context = program_trainer.shift_inputs(history, 2, 4, 3, cfg)
    torch.testing.assert_close(layer_input, torch.cat([history, torch.ones(5, 1)], 1))
    torch.testing.assert_close(context, torch.tensor([[0.0, 0.0, 1.0]]).expand(5, 3))
    cfg = ProgramConfig(task="shift", shift_input_constant=True, shift_context="states+cue")
    layer_input, context = program_trainer.shift_inputs(history, 0, 4, 3, cfg)
    torch.testing.assert_close(layer_input, torch.cat([history[:, -4:], torch.ones(5, 1)], 1))
    torch.testing.assert_close(context, torch.cat([history, torch.tensor([[1.0, 0.0, 0.0]]).expand(5, 3)], 1))
    with pytest.raises(ValueError, match="shift_input='all'"):
        ProgramConfig(task="shift", shift_input="all").check()
    with pytest.raises(ValueError, match="shift_input_constant=True set for task='reuse'"):
        ProgramConfig(task="reuse", shift_input_constant=True).check()


def test_shift_cue_names_the_program_that_makes_each_target(monkeypatch):
    """The cue at step t is the program of the target the model predicts at t (so it changes
    at the switch itself), and both models are built for the input and context they get."""
    original = program_trainer.shift_stream
    monkeypatch.setattr(program_trainer, "shift_stream", lambda seed, **options: original(seed, segment=30, cycles=2, **options))
    built, cues = [], []
    build = program_trainer.build_program_model

    def spy_build(kind, in_features, out_features, context_features, nc_options):
        built.append((in_features, context_features))
        model = build(kind, in_features, out_features, context_features, nc_options)
        forward = model.forward
        model.forward = lambda x, context=None: cues.append(context[0].argmax().item()) or forward(x, context)
        return model

    monkeypatch.setattr(program_trainer, "build_program_model", spy_build)
    for model in ("nc-ff", "mlp"):
        cues.clear()
        cfg = ProgramConfig(task="shift", model=model, seeds=1, shift_context="cue", shift_input="history",
                            shift_input_constant=True)
        result = program_trainer._shift(cfg, 100, torch.Generator().manual_seed(0))
        assert torch.isfinite(torch.tensor(result["errors"])).all()
        stream = original(100, segment=30, cycles=2)
        assert cues == stream.program.tolist()
    assert built == [(13, 3), (13, 3)]


def test_shift_error_curve_averages_the_steps_after_each_switch(tmp_path, capsys):
    """scripts/shift_error_curve.py (programs notes): the mean error at each offset after the
    switches to a recurring program (or, --first, to a new one), over switches and seeds."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "shift_error_curve", Path(__file__).resolve().parents[1] / "scripts" / "shift_error_curve.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    # Programs 0, 1, 0, 1 in segments of 3 steps: switches at 3, 6, 9; 6 and 9 recur.
    seeds = tmp_path / "run" / "seeds"
    seeds.mkdir(parents=True)
    first = {"errors": [9, 8, 7, 6, 5, 4, 1, 2, 3, 3, 4, 5], "switches": [3, 6, 9], "order": [0, 1, 0, 1]}
    second = {**first, "errors": [0, 0, 0, 0, 0, 0, 3, 2, 1, 1, 0, 1]}
    for i, record in enumerate((first, second)):
        (seeds / f"seed-{i:02d}.json").write_text(json.dumps(record))
    values, count = script.curve(tmp_path / "run", steps=2)
    assert count == 4 and values == [(1 + 3 + 3 + 1) / 4, (2 + 4 + 2 + 0) / 4]
    values, count = script.curve(tmp_path / "run", steps=3, recurring=False)
    assert count == 4 and values == [(9 + 6 + 0 + 0) / 4, (8 + 5) / 4, (7 + 4) / 4]
    script.main([str(tmp_path / "run"), "--steps", "2"])
    assert "2.00 2.00  (sum 4.00; 4 switches)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no seeds/seed"):
        script.curve(tmp_path, steps=2)


@pytest.mark.parametrize("context", ["cue", "states"])
def test_shift_reads_probe_runs_the_trainers_loop(monkeypatch, context):
    """scripts/probe_shift_reads.py (programs notes, session 32): its loop is the trainer's, so
    every step's error equals run_programs' for the same seed and stream; with the cue every
    sample of a batch has the same context and so reads exactly the batch mean; the cosines are
    taken once per recurring switch at each offset inside a segment."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "probe_shift_reads", Path(__file__).resolve().parents[1] / "scripts" / "probe_shift_reads.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    short = lambda seed, **options: shift_stream(seed, segment=30, cycles=2, **options)  # noqa: E731
    monkeypatch.setattr(script, "shift_stream", short)
    monkeypatch.setattr(program_trainer, "shift_stream", short)
    cfg = ProgramConfig(task="shift", model="nc-ff", seeds=1, seed=3, shift_centre_spread=2.0,
                        shift_input_constant=True, orthogonality_weight=0.0, shift_context=context,
                        online_optimizer="adam", online_lr=0.007, routing_lr_scale=0.1,
                        nc_options=dict(num_programs=8, sharpness=10, key_mode="learned", bias=False))
    cosines, errors_at, within, errors = script.probe_stream(cfg, seed=3, index=0)
    torch.manual_seed(3000)
    trainer = program_trainer._shift(cfg, program_trainer.task_seed(3, 0), torch.Generator().manual_seed(0))
    assert errors == trainer["errors"]
    stream = short(program_trainer.task_seed(3, 0), centre_spread=2.0)
    recurring = len(stream.switches) + 1 - len(stream.programs)
    assert sorted(cosines) == [0, 1, 2, 3, 4, 8, 16]
    assert all(len(values) == recurring for values in cosines.values())
    assert errors_at[8] == [errors[start + 8] for start in stream.switches[len(stream.programs) - 1:]]
    assert all(-1 - 1e-6 <= c <= 1 + 1e-6 for values in cosines.values() for c in values)
    if context == "cue":
        assert min(within) > 1 - 1e-5
    else:
        assert min(within) < 1 - 1e-4
