import json

from neurocoder.cli import main

from test_data import isolated, make_idx_folder  # noqa: F401  (fixture)


def test_demo_end_to_end_on_generated_idx(isolated, capsys):  # noqa: F811
    make_idx_folder(isolated / "fashion", n_train=256, n_test=100)
    out = isolated / "run"
    code = main(["demo", "--data-dir", str(isolated / "fashion"), "--epochs", "1", "--seed", "3", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| Neurocoder MLP |" in printed and "What the Neurocoder layers read" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["seed"] == 3 and config["config"]["data"]["train_samples_used"] == 256
    assert "neurocoder" in config["code_version"]
    results = json.loads((out / "results.json").read_text())
    assert set(results["table"]) == {"MLP", "Neurocoder MLP"}
    assert len(results["usage_by_class"]["3"]) == 10 and len(results["usage_by_class"]["3"][0]) == 50
    assert (out / "usage_by_class.png").stat().st_size > 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[1])["model"] == "Neurocoder MLP"
    # The same folder again is refused, not overwritten.
    assert main(["demo", "--data-dir", str(isolated / "fashion"), "--epochs", "1", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_cli_missing_data_is_a_clear_error(isolated, capsys):  # noqa: F811
    assert main(["demo", "--out", str(isolated / "run")]) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err


def test_demo_settings_are_checked_before_any_data_or_folder(isolated, capsys):  # noqa: F811
    for args, message in ((["--epochs", "0"], "epochs=0 (must be >= 1)"),
                          (["--train-limit", "-5"], "train_limit=-5 (must be >= 1, or None for every image)"),
                          (["--preset", "foo"], "preset='foo' (choose ['default', 'released'])")):
        assert main(["demo", "--out", str(isolated / "run")] + args) == 2
        assert message in capsys.readouterr().err
        assert not (isolated / "run").exists()
