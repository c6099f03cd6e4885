import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nfdm_sciml._cli import main


# A run small enough to train, evaluate, sample and plot in a few seconds.
TINY = [
    f"--set={item}"
    for item in (
        "train.steps=20",
        "train.steps_per_call=10",
        "train.batch_size=64",
        "model.width_size=8",
        "model.depth=1",
        "eval.ode_size=8",
        "eval.sample_size=64",
        "data.eval_size=64",
        "eval.num_times=4",
    )
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "toy"
    assert main(["train", "--out", str(out), *TINY]) == 0
    return out


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith("nfdm: error: ")
    return err


def test_train_writes_the_run_folder(run_dir):
    for name in ("config.toml", "metrics.jsonl", "summary.json", "loss.png"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "samples.png").is_file()
    assert (run_dir / "trajectories.png").is_file()
    assert list((run_dir / "checkpoints").glob("ckpt_*.eqx"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 20
    assert np.isfinite(summary["nelbo_nats"]) and np.isfinite(summary["ode_nll_nats"])
    assert "train.steps" not in (run_dir / "config.toml").read_text()
    assert "steps = 20" in (run_dir / "config.toml").read_text()


def test_sample_evaluate_plot(run_dir, tmp_path, capsys):
    out = tmp_path / "s.npy"
    assert main(["sample", str(run_dir), "--num", "16", "--steps", "10"]) == 0
    assert main(["sample", str(run_dir), "--num", "8", "--ode", "--out", str(out)]) == 0
    assert np.load(out).shape == (8, 2)
    assert np.load(run_dir / "samples.npy").shape == (16, 2)
    capsys.readouterr()
    assert main(["evaluate", str(run_dir)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((run_dir / "evaluation.json").read_text())
    assert {"nelbo_nats", "ode_nll_bits_per_dim"} <= set(printed)
    (run_dir / "loss.png").unlink()
    assert main(["plot", str(run_dir)]) == 0
    assert (run_dir / "loss.png").is_file()


def test_resume_continues(run_dir, tmp_path, capsys):
    out = tmp_path / "resumed"
    args = ["train", "--out", str(out), *TINY]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2  # checkpoints exist but no --resume
    _error_line(capsys)
    assert main([*args, "--resume", "--steps", "30"]) == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines]
    assert steps == [10, 20, 30]
    assert json.loads((out / "summary.json").read_text())["steps_this_call"] == 10


def test_csv_file(tmp_path):
    rng = np.random.default_rng(0)
    table = rng.normal(size=(200, 3))
    path = tmp_path / "data.csv"
    lines = ["a,b,c"] + [",".join(f"{v:.5f}" for v in row) for row in table]
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "csv"
    args = ["train", "--out", str(out), *TINY, "--set", 'data.name="file"']
    args += ["--set", f"data.path={str(path)!r}", "--set", 'data.columns=["a", "c"]']
    assert main([*args, "--set", "data.standardise=true"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["dim"] == 2 and summary["data"]["train_size"] == 136
    assert (out / "samples.png").is_file()


@pytest.mark.parametrize(
    "extra",
    [
        ["--set", "train.stepz=3"],
        ["--set", "bogus.steps=3"],
        ["--set", "train.steps=many"],
        ["--set", "data.standardise=3"],
        ["--data", "nowhere"],
        ["--model", "gan"],
        ["--steps", "-5"],
        ["--set", "train.learning_rate=-1"],
        ["--set", 'data.name="file"', "--set", 'data.path="missing.csv"'],
        ["--no-such-option"],
        ["--set", "penalties.curvature=-1"],
        ["--set", "penalties.obstacle=1.0", "--set", "penalties.obstacle_centre=[1]"],
        ["--set", "penalties.obstacle_centre=['a', 'b']"],
        [
            "--set",
            "penalties.obstacle=1.0",
            "--set",
            "penalties.obstacle_centre=[0, 0]",
            "--set",
            "penalties.obstacle_radius=-2.0",
        ],
    ],
)
def test_bad_input_exits_2(extra, tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "r"), *TINY, *extra]) == 2
    _error_line(capsys)
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_corrupt_checkpoint_exits_1(run_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.toml").write_text((run_dir / "config.toml").read_text())
    (broken / "checkpoints").mkdir()
    (broken / "checkpoints" / "ckpt_00000020.eqx").write_bytes(b"not a checkpoint")
    assert main(["sample", str(broken)]) == 1
    assert "ckpt_00000020.eqx" in _error_line(capsys)
    assert main(["evaluate", str(tmp_path / "absent")]) == 1
    _error_line(capsys)


def test_help():
    done = subprocess.run(
        [str(Path(sys.executable).parent / "nfdm"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0
    for command in ("train", "sample", "evaluate", "plot", "demo"):
        assert command in done.stdout


@pytest.mark.parametrize(
    "extra",
    [
        ["--num-processes", "2", "--process-id", "2", "--coordinator", "h:1"],
        ["--num-processes", "2", "--process-id", "0"],
    ],
)
def test_bad_distributed_options_exit_2(extra, tmp_path, capsys):
    # Rejected before any process tries to join a run.
    code = main(["train", "--out", str(tmp_path / "run"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("nfdm: error:")


def test_periodic_evaluation_logs_likelihood_and_sample_metric(tmp_path):
    out = tmp_path / "evaluated"
    assert (
        main(["train", "--out", str(out), *TINY, "--set", "train.eval_every=10"]) == 0
    )
    lines = (out / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert all("eval/nelbo_nats" in r and "eval/sample_mmd" in r for r in records)
    assert (out / "likelihood.png").exists()


def test_penalties_from_the_config(tmp_path):
    # NFDM-OT with an obstacle: the penalties are trained and logged by name.
    out = tmp_path / "ot"
    extra = [
        "--set=penalties.curvature=0.5",
        "--set=penalties.obstacle=10.0",
        "--set=penalties.obstacle_centre=[1.0, 1.0]",
        "--set=penalties.obstacle_radius=0.5",
        "--set=model.pin_prior=false",
    ]
    assert main(["train", "--out", str(out), *TINY, *extra]) == 0
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("penalty/curvature" in r and "penalty/obstacle" in r for r in records)
    assert all(np.isfinite(r["prior"]) and r["prior"] > 0 for r in records)
    assert "obstacle_centre = [1.0, 1.0]" in (out / "config.toml").read_text()
