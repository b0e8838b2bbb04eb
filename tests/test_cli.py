"""The command-line tool end to end on tiny configurations, and each bad-input path."""
import json
import os

import matplotlib.image as mpimg
import pytest

from tp_eigendamage.cli import main

TINY = ["--model", "resnet10t", "--image-size", "16", "--epochs", "1", "--max-train-batches", "2",
        "--batch-size", "16", "--stat-batches", "1", "--no-progress"]


def _png_ok(path):
    image = mpimg.imread(path)
    return image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50


def test_default_job_writes_table_report_and_plots(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(TINY + ["--method", "kron_obd", "--target-params", "0.6", "--finetune-epochs", "1",
                        "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    for stage in ("trained", "pruned", "fine-tuned"):
        assert stage in printed
    assert "test acc" in printed and "params" in printed
    assert "measured change" in printed and "predicted by the damages" in printed   # kron_obd: loss units
    assert "keep 60% of the parameters" in printed and "eigen-directions between" in printed

    report = json.loads((out / "report.json").read_text())
    assert set(report["stages"]) == {"trained", "pruned", "fine-tuned"}
    before, after = report["stages"]["trained"], report["stages"]["pruned"]
    assert after["params"] == pytest.approx(0.6 * before["params"], rel=0.02)
    assert 0.0 <= report["stages"]["fine-tuned"]["accuracy"] <= 1.0
    assert report["versions"]["torch"]
    assert report["pruning"]["layers"], "per-layer table missing"
    assert set(report["timings"]) >= {"train", "prune", "finetune"}
    for png in ("layer_widths.png", "eigen_spectra.png"):
        assert _png_ok(out / png)

    from tp_eigendamage import load
    model = load(str(out / "pruned_model.pt"))
    assert sum(p.numel() for p in model.parameters()) == after["params"]

    again = tmp_path / "again"
    code = main(TINY + ["--checkpoint", str(out / "pruned_model.pt"), "--method", "kron_obd",
                        "--target-params", "0.8", "--finetune-epochs", "0", "--out", str(again)])
    assert code == 0
    resumed = json.loads((again / "report.json").read_text())["stages"]
    assert set(resumed) == {"loaded", "pruned", "fine-tuned"}
    assert resumed["loaded"]["params"] == after["params"], "--checkpoint must start from the saved model"
    assert resumed["loaded"]["accuracy"] == report["stages"]["fine-tuned"]["accuracy"]


def test_side_and_first_order_reach_the_criterion(tmp_path, capsys):
    """``--side`` / ``--first-order`` change kron_obd's damages (same seed, same trained model)."""
    pruned = {}
    for name, flags in (("default", []), ("consumer", ["--side", "consumer"]), ("off", ["--first-order", "off"])):
        out = tmp_path / name
        assert main(TINY + ["--method", "kron_obd", "--target-params", "0.6", "--finetune-epochs", "0",
                            "--out", str(out)] + flags) == 0
        report = json.loads((out / "report.json").read_text())["pruning"]
        pruned[name] = (report["predicted_damage"], report["layers"])
    assert pruned["consumer"] != pruned["default"] and pruned["off"] != pruned["default"]
    assert pruned["off"][0] < pruned["default"][0]   # the positive first-order part is left out


def test_no_recalibrate_bn_reaches_prune(tmp_path, capsys):
    """Without ``--no-recalibrate-bn`` the pruned model's BatchNorm statistics are re-estimated,
    so its test loss before fine-tuning differs (same seed, same trained model, same channels)."""
    stages = {}
    for name, flags in (("default", []), ("kept", ["--no-recalibrate-bn"])):
        out = tmp_path / name
        assert main(TINY + ["--method", "magnitude", "--target-params", "0.6", "--finetune-epochs", "0",
                            "--out", str(out)] + flags) == 0
        report = json.loads((out / "report.json").read_text())
        stages[name] = report["stages"]
        assert report["pruning"]["layers"] == json.loads(
            ((tmp_path / "default") / "report.json").read_text())["pruning"]["layers"]
    assert stages["kept"]["trained"] == stages["default"]["trained"]
    assert stages["kept"]["pruned"]["loss"] != stages["default"]["pruned"]["loss"]


def _compare(tmp_path, name, seeds):
    out = tmp_path / name
    code = main(["compare"] + TINY + ["--methods", "kron_obd,magnitude", "--targets", "0.7,0.5",
                                      "--finetune-epochs", "0,1", "--seeds", seeds, "--out", str(out)])
    assert code == 0
    return json.loads((out / "compare.json").read_text()), out


def test_compare_covers_every_method_target_and_seed_reproducibly(tmp_path, capsys):
    import statistics

    first, out = _compare(tmp_path, "a", "0,1")
    printed = capsys.readouterr().out
    cells = {(r["seed"], r["method"], r["target_params"], r["finetune_epochs"]) for r in first["results"]}
    assert cells == {(s, m, t, f) for s in (0, 1) for m in ("kron_obd", "magnitude") for t in (0.7, 0.5)
                     for f in (0, 1)}
    for r in first["results"]:
        assert r["params_fraction"] == pytest.approx(r["target_params"], rel=0.02)
        assert r["method"] in printed
    for cell in first["summary"]:                      # mean ± std over the two seeds
        accuracies = [r["accuracy"] for r in first["results"] if all(
            r[k] == cell[k] for k in ("method", "target_params", "finetune_epochs"))]
        assert cell["accuracy"]["mean"] == pytest.approx(statistics.fmean(accuracies))
        assert cell["accuracy"]["std"] == pytest.approx(statistics.stdev(accuracies))
    assert "±" in printed and _png_ok(out / "compare.png") and "latency kept" in printed
    for cell in first["summary"]:                      # the plot's second panel: measured latency
        assert 0 < cell["latency_fraction"]["mean"] < 2

    second, _ = _compare(tmp_path, "b", "1")            # seed 1 alone gives the same numbers
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("seconds", "latency_fraction")}  # noqa: E731
                        for r in rs if r["seed"] == 1]   # timings differ between runs
    assert strip(first["results"]) == strip(second["results"])


@pytest.mark.parametrize("args, message", [
    (["--model", "no_such_model"], "unknown timm model"),
    (["--method", "l7_norm"], "unknown method"),
    (["--target-params", "1.5"], "between 0 and 1"),
    (["--target-flops", "0"], "between 0 and 1"),
    (["--target-latency", "2"], "between 0 and 1"),
    (["--target-latency", "0.5", "--target-flops", "0.5"], "not allowed with argument"),
    (["--data", "/nonexistent/folder"], "neither 'digits' nor an existing folder"),
    (["--method", "eigendamge"], "did you mean 'eigendamage'"),
    (["--model", "resnet81"], "did you mean 'resnet18'"),
    (["--target-parms", "0.5"], "did you mean '--target-params'"),
    (["--epochs", "-1"], "--epochs must be >= 0"),
    (["--ranking", "damage_per_flop"], "invalid choice: 'damage_per_flop'"),
    (["--side", "consumr"], "invalid choice: 'consumr'"),
])
def test_bad_input_is_one_line_and_nonzero(args, message, tmp_path, capsys):
    code = main(TINY + args + ["--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1 and message in err


def test_latency_target_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "latency"
    code = main(["--model", "resnet18", "--image-size", "48", "--epochs", "0", "--stat-batches", "1",
                 "--batch-size", "16", "--no-progress", "--method", "kron_obd", "--target-latency", "0.6",
                 "--finetune-epochs", "0", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and "keep 60% of the measured latency" in printed
    pruning = json.loads((out / "report.json").read_text())["pruning"]
    assert pruning["target"] == {"target_latency": 0.6}
    assert abs(pruning["rounds"][0]["searched_fraction"] / 0.6 - 1) <= 0.05   # the search's tolerance
    assert pruning["latency"]["before_s"] > 0 and pruning["latency"]["fraction"] is not None


def test_data_folder_that_is_not_an_image_folder(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code = main(TINY + ["--data", str(empty), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and "image folder" in err


def test_out_not_writable(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code = main(TINY + ["--out", str(blocker / "sub")])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and "not writable" in err


def test_compare_bad_method_list(tmp_path, capsys):
    code = main(["compare"] + TINY + ["--methods", "kron_obd,bogus", "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "unknown method 'bogus'" in err


def test_command_typo_suggests_the_command(capsys):
    code = main(["compar", "--methods", "kron_obd"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "did you mean 'compare'" in err


def test_module_entry_point_help():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "tp_eigendamage", "--help"], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0
    for flag in ("--model", "--data", "--image-size", "--method", "--target-params", "--target-flops",
                 "--target-latency", "--pruning-ratio", "--iterative-steps", "--epochs", "--finetune-epochs",
                 "--stat-batches", "--fisher-type", "--ranking", "--side", "--first-order", "--no-recalibrate-bn", "--seed", "--device", "--out", "--checkpoint"):
        assert flag in done.stdout
    assert "compare" in done.stdout and "KEEP" in done.stdout and "REMOVE" in done.stdout
