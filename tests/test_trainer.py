import io
import json
import os
import subprocess
import sys
import textwrap

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import nfdm_sciml as nf


def _model(seed=0):
    return nf.build_model("nfdm", 2, key=jr.key(seed), width_size=16, depth=2)


def _sample(key):
    return nf.eight_gaussians(key, 64, dtype=jnp.float64)


def _config(**kwargs):
    defaults = dict(steps=20, batch_size=64, steps_per_call=5, learning_rate=3e-3)
    return nf.TrainConfig(**{**defaults, **kwargs})


def test_fit_is_deterministic_and_learns():
    trainer = nf.Trainer(_config(steps=200, steps_per_call=50, ema_decay=0.9))
    state, records = trainer.fit(trainer.init(_model()), _sample)
    again, records2 = trainer.fit(trainer.init(_model()), _sample)
    assert [r["nelbo"] for r in records] == [r["nelbo"] for r in records2]
    assert records[-1]["diffusion"] < 0.8 * records[0]["diffusion"]
    assert int(state.step) == 200
    # The average trails the parameters.
    a = jax.tree.leaves(eqx.filter(state.model, eqx.is_inexact_array))[0]
    e = jax.tree.leaves(eqx.filter(state.ema, eqx.is_inexact_array))[0]
    assert not np.allclose(a, e)


def test_a_diverged_run_logs_nan():
    # NaN parameters (a run that has diverged) make every term NaN: the records must
    # show it, not drop the keys. (NaN data would be refused by the batch check.)
    trainer = nf.Trainer(_config(steps=5, steps_per_call=5, ema_decay=None))
    broken = jax.tree.map(
        lambda a: jnp.full_like(a, jnp.nan) if eqx.is_inexact_array(a) else a, _model()
    )
    _, records = trainer.fit(trainer.init(broken), _sample)
    assert all(np.isnan(records[-1][k]) for k in ("diffusion", "nelbo"))
    assert "prior" in records[-1] and "reconstruction" in records[-1]
    diffusion_only = nf.Trainer(
        _config(steps=5, steps_per_call=5, objective="diffusion")
    )
    _, records = diffusion_only.fit(diffusion_only.init(_model()), _sample)
    assert "nelbo" not in records[-1] and np.isfinite(records[-1]["diffusion"])


def test_chunking_does_not_change_the_run():
    # Keys come from the step number, so 4 calls of 5 steps equal 2 calls of 10.
    states = []
    for per_call in (5, 10):
        trainer = nf.Trainer(_config(steps_per_call=per_call))
        states.append(trainer.fit(trainer.init(_model()), _sample)[0])
    for a, b in zip(
        jax.tree.leaves(eqx.filter(states[0], eqx.is_inexact_array)),
        jax.tree.leaves(eqx.filter(states[1], eqx.is_inexact_array)),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_warmup_and_cosine_schedule():
    config = _config(
        steps=100, warmup_steps=10, schedule="cosine", min_learning_rate=1e-5
    )
    schedule = config.learning_rate_schedule()
    assert float(schedule(0)) == 0.0
    assert float(schedule(10)) == pytest.approx(3e-3)
    assert float(schedule(100)) == pytest.approx(1e-5)
    trainer = nf.Trainer(config)
    _, records = trainer.fit(trainer.init(_model()), _sample)
    rates = [r["learning_rate"] for r in records]
    assert rates[0] < rates[1] and rates[-1] < rates[2]


def test_resume_gives_identical_losses(tmp_path):
    config = _config(steps=20, checkpoint_every=10, keep_checkpoints=5)
    full = nf.Trainer(config, run_dir=tmp_path / "full")
    _, records = full.fit(full.init(_model()), _sample)
    checkpoint = tmp_path / "full" / "checkpoints" / "ckpt_00000010.eqx"
    assert checkpoint.exists()

    resumed = nf.Trainer(config, run_dir=tmp_path / "resumed")
    like = resumed.init(_model(seed=99))  # a template: its values are replaced
    state = resumed.restore(like, checkpoint)
    assert int(state.step) == 10
    _, tail = resumed.fit(state, _sample)
    assert [r["step"] for r in tail] == [15, 20]
    for r, expected in zip(tail, records[2:], strict=True):
        assert r["nelbo"] == expected["nelbo"]
        assert r["diffusion"] == expected["diffusion"]
    lines = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [5, 10, 15, 20]
    assert json.loads((tmp_path / "full" / "config.json").read_text())["steps"] == 20


def test_evaluation_and_progress(tmp_path):
    stream = io.StringIO()
    trainer = nf.Trainer(
        _config(eval_every=10), run_dir=tmp_path, progress=nf.TextProgress(stream)
    )
    held_out = nf.eight_gaussians(jr.key(5), 32, dtype=jnp.float64)

    def evaluate(model, step):
        estimate = nf.nelbo_estimate(model, held_out, key=jr.key(step), num_times=4)
        return {"nelbo": float(estimate.nats)}

    _, records = trainer.fit(trainer.init(_model()), _sample, evaluate=evaluate)
    assert "eval/nelbo" in records[1] and "eval/nelbo" not in records[0]
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4 and lines[-1].startswith("step 20/20")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("steps", 0),
        ("batch_size", -1),
        ("learning_rate", 0.0),
        ("schedule", "step"),
        ("clip_norm", 0.0),
        ("ema_decay", 1.0),
        ("eval_every", 7),
        ("objective", "elbo"),
    ],
)
def test_bad_config(field, value, no_typecheck):
    with pytest.raises(ValueError, match=field):
        _config(**{field: value})


def test_batch_not_divisible_by_devices(no_typecheck):
    devices = [jax.devices()[0]] * 3
    with pytest.raises(ValueError, match="divisible by the number of devices"):
        nf.Trainer(_config(batch_size=64), devices=devices)


def test_sharded_training_equals_single_device():
    # A separate process: the host platform must be split into 4 devices before JAX
    # starts.
    script = textwrap.dedent(
        """
        import jax
        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp, jax.random as jr, numpy as np, equinox as eqx
        import nfdm_sciml as nf
        assert len(jax.devices()) == 4
        def run(devices):
            config = nf.TrainConfig(steps=6, batch_size=64, steps_per_call=3)
            trainer = nf.Trainer(config, devices=devices)
            model = nf.build_model("nfdm", 2, key=jr.key(0), width_size=16, depth=2)
            sample = lambda k: nf.eight_gaussians(k, 64, dtype=jnp.float64)
            state, records = trainer.fit(trainer.init(model), sample)
            return state, records
        sharded, rs = run(jax.devices())
        single, r1 = run(jax.devices()[:1])
        for a, b in zip(rs, r1):
            np.testing.assert_allclose(a["nelbo"], b["nelbo"], rtol=1e-10)
        for a, b in zip(jax.tree.leaves(eqx.filter(sharded, eqx.is_inexact_array)),
                        jax.tree.leaves(eqx.filter(single, eqx.is_inexact_array))):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
        print("ok")
        """
    )
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
    }
    out = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


def test_ema_follows_its_warm_up():
    # After one step the decay is min(0.5, 1/10) = 0.1; after two, min(0.5, 2/11).
    trainer = nf.Trainer(_config(steps=2, steps_per_call=1, ema_decay=0.5))
    start = trainer.init(_model())
    one, _ = trainer.fit(start, _sample, until=1)
    two, _ = trainer.fit(one, _sample)

    def leaf(module):
        return jax.tree.leaves(eqx.filter(module, eqx.is_inexact_array))[0]

    expected_one = 0.1 * leaf(start.model) + 0.9 * leaf(one.model)
    # The decay itself is computed in float32.
    np.testing.assert_allclose(leaf(one.ema), expected_one, rtol=1e-6)
    d = 2 / 11
    expected_two = d * expected_one + (1 - d) * leaf(two.model)
    np.testing.assert_allclose(leaf(two.ema), expected_two, rtol=1e-6)


_MULTI = textwrap.dedent(
    """
    import json, sys
    import jax
    import nfdm_sciml as nf
    process_id, port, run_dir, out = int(sys.argv[1]), *sys.argv[2:5]
    if process_id >= 0:
        nf.initialise_distributed(f"127.0.0.1:{port}", 2, process_id)
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp, jax.random as jr
    config = nf.TrainConfig(
        steps=6, batch_size=64, steps_per_call=3, checkpoint_every=3
    )
    trainer = nf.Trainer(config, run_dir=run_dir)
    model = nf.build_model("nfdm", 2, key=jr.key(0), width_size=16, depth=2)
    sample = lambda k: nf.eight_gaussians(k, 64, dtype=jnp.float64)
    state, records = trainer.fit(trainer.init(model), sample)
    if process_id <= 0:
        json.dump({"records": records, "devices": len(jax.devices())}, open(out, "w"))
    """
)


def test_two_processes_train_like_one(tmp_path):
    # Two processes (one CPU device each) joined by jax.distributed against one process
    # with two devices: the same sharded program, so the same losses.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    script = tmp_path / "multi.py"
    script.write_text(_MULTI)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(script),
                str(i),
                port,
                str(tmp_path / "multi"),
                str(tmp_path / "multi.json"),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    single_env = {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    out = subprocess.run(
        [
            sys.executable,
            str(script),
            "-1",
            port,
            str(tmp_path / "single"),
            str(tmp_path / "single.json"),
        ],
        env=single_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    multi = json.loads((tmp_path / "multi.json").read_text())
    single = json.loads((tmp_path / "single.json").read_text())
    assert multi["devices"] == single["devices"] == 2
    for a, b in zip(multi["records"], single["records"], strict=True):
        np.testing.assert_allclose(a["nelbo"], b["nelbo"], rtol=1e-10)
    # Only the first process wrote, and what it wrote loads.
    files = sorted(p.name for p in (tmp_path / "multi" / "checkpoints").iterdir())
    assert files == ["ckpt_00000003.eqx", "ckpt_00000006.eqx"]
    lines = (tmp_path / "multi" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
