import json

import numpy as np
import pytest

from nfdm_sciml._cli import main

from .test_images import write_cifar


# A U-Net run on the digits small enough to train, evaluate, sample and plot in
# seconds: two steps, 8 channels, one resolution, a few held-out images. (Most of the
# time is compilation, which grows with the number of layers.)
TINY = [
    f"--set={item}"
    for item in (
        'model.network="unet"',
        'data.name="digits"',
        "model.width_size=8",
        "model.channel_multipliers=[1]",
        "model.num_res_blocks=1",
        "model.num_groups=4",
        "model.delta=0.001",
        "train.steps=2",
        "train.steps_per_call=2",
        "train.batch_size=8",
        "data.eval_size=8",
        "eval.num_times=2",
        "eval.sde_steps=4",
    )
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "digits"
    assert main(["train", "--out", str(out), *TINY]) == 0
    return out


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith("nfdm: error: ")
    return err


def test_train_on_digit_images(run_dir):
    for name in ("config.toml", "metrics.jsonl", "summary.json", "samples.png"):
        assert (run_dir / name).is_file(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["model"] == "nfdm"
    bits = summary["nelbo_bits_per_dim"]
    assert np.isfinite(bits) and np.isfinite(summary["nelbo_bits_per_dim_stderr"])
    assert bits == pytest.approx(summary["nelbo_nats"] / (64 * np.log(2)))
    terms = [
        summary[f"nelbo_{t}_nats"] for t in ("diffusion", "prior", "reconstruction")
    ]
    assert sum(terms) == pytest.approx(summary["nelbo_nats"], rel=1e-5)
    assert "ode_nll_nats" not in summary  # no ODE likelihood for images
    data = summary["data"]
    assert data["kind"] == "images" and data["shape"] == [1, 8, 8]
    # A fixed 20 % of the 1797 digits is held out (359); eval_size takes 8 of them.
    assert data["train_size"] == 1438 and data["eval_size"] == 8
    assert "20%" in data["held_out"] and "no official split" in data["held_out"]
    config = (run_dir / "config.toml").read_text()
    assert 'network = "unet"' in config and "channel_multipliers = [1]" in config


def test_sample_and_evaluate_image_run(run_dir, tmp_path, capsys):
    out = tmp_path / "s.npy"
    assert (
        main(["sample", str(run_dir), "--num", "64", "--steps", "4", "--out", str(out)])
        == 0
    )
    samples = np.load(out)
    # Decoded onto the 17 levels of the digits.
    assert samples.shape == (64, 1, 8, 8)
    np.testing.assert_allclose(
        (samples + 1) * 8, np.round((samples + 1) * 8), atol=1e-5
    )
    capsys.readouterr()
    assert main(["evaluate", str(run_dir)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert np.isfinite(printed["nelbo_bits_per_dim"]) and printed["step"] == 2


def test_vdm_trains(tmp_path):
    # (FM-OT trains in the CIFAR-10 test below; each run compiles for a while.)
    out = tmp_path / "vdm"
    assert main(["train", "--out", str(out), *TINY, "--model", "vdm"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "vdm" and np.isfinite(summary["nelbo_bits_per_dim"])
    assert 0 < summary["nelbo_prior_nats"] < 0.1  # VP ends only close to N(0, I)


def test_cifar10_trains_on_train_and_scores_test(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder)
    out = tmp_path / "cifar"
    extra = [
        "--set",
        'data.name="cifar10"',
        "--set",
        f"data.path={str(folder)!r}",
        "--model",
        "fmot",
    ]
    assert main(["train", "--out", str(out), *TINY, *extra]) == 0
    data = json.loads((out / "summary.json").read_text())["data"]
    assert data["shape"] == [3, 32, 32] and data["num_levels"] == 256
    assert data["train_size"] == 15 and data["eval_size"] == 3
    assert "test split" in data["held_out"]


@pytest.mark.parametrize(
    "extra",
    [
        ["--model", "flow"],
        ["--set", 'model.network="cnn"'],
        ["--set", 'data.name="moons"'],
        ["--set", "model.channel_multipliers=['a']"],
        ["--set", "model.channel_multipliers=[1, 2, 2, 2, 2]"],
        ["--set", "model.attention_resolutions=[3]"],
        ["--set", "model.attention_resolutions=[true]"],
        ["--set", "model.num_groups=3"],
        ["--set", "model.num_res_blocks=0"],
        ["--set", "model.delta=0.1"],
        ["--set", "model.delta=0.0"],
        ["--set", "data.standardise=true"],
        ["--set", 'data.path="somewhere"'],
        ["--model", "vdm", "--set", "model.pin_prior=false"],
        ["--set", "penalties.obstacle=1.0", "--set", "penalties.obstacle_centre=[0]"],
        ["--set", 'data.name="folder"'],
        ["--set", 'data.name="folder"', "--set", 'data.path="/no/such/folder"'],
        ["--set", 'data.name="cifar10"', "--set", 'data.path="/no/such/folder"'],
    ],
)
def test_bad_image_config_exits_2(extra, tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "r"), *TINY, *extra]) == 2
    _error_line(capsys)
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_image_sets_need_a_unet(tmp_path, capsys):
    # Without model.network = "unet" the digits stay flat vectors (unchanged), and
    # the other image sets are refused with the fix.
    args = ["train", "--out", str(tmp_path / "r"), "--set", 'data.name="cifar10"']
    assert main(args) == 2
    assert 'model.network = "unet"' in _error_line(capsys)
