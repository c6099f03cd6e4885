"""Latent SDEs from time series: SDE Matching (no solver in training) against the
classical latent SDE trained through a Diffrax solve, on three data sets.

    python examples/latent_sde.py                          # every data set
    python examples/latent_sde.py --datasets lorenz --sm-steps 3000
    python examples/latent_sde.py report                   # the Markdown tables

Data sets: `lorenz` (the stochastic Lorenz system of the SDE Matching notebook:
multiplicative noise, 41 regular times on [0, 1], standardised, observation noise
0.01), `van_der_pol` (a noisy Van der Pol oscillator seen through its position
only, each series at its own 50 irregular times on [0, 10], 10 % of the entries
missing) and `basic_motions` (smartwatch accelerometer and gyroscope recordings,
6 channels x 100 times, from the optional `aeon` package: `pip install
"nfdm_sciml[series]"`).

Both methods share the encoder, prior, diffusion and observation architectures,
the optimiser and the batch. Every `--eval-every` steps the held-out series are
scored: forecast RMSE and CRPS (observation space, standardised units) from the
history up to the data set's forecast time, and the energy distance between
prior samples (generation from t0) and the held-out trajectories. The clock counts
training only, not the evaluation. Rows go to `examples/results/latent_sde.json`,
figures to `examples/figures/latent_sde_*.png`.
"""

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import nfdm_sciml as nf


HERE = Path(__file__).parent
METHODS = ["SDE Matching", "solver latent SDE"]


def lorenz(key):
    data = nf.stochastic_lorenz(1024 + 256, key=key)
    return data[:1024], data[1024:], data[1024:]


def van_der_pol(key):
    k1, k2 = jr.split(key)
    train = nf.stochastic_van_der_pol(512, keep=0.5, missing=0.1, key=k1)
    # Held out: forecasts from the same irregular design; the energy distance needs
    # one common grid, so those trajectories are regular, fully observed draws.
    test = nf.stochastic_van_der_pol(256, keep=0.5, missing=0.1, key=k2)
    regular = nf.stochastic_van_der_pol(256, keep=1.0, key=jr.fold_in(k2, 1))
    return train, test, regular


def basic_motions(key):
    train, _ = nf.load_basic_motions("train")
    test, _ = nf.load_basic_motions("test")
    mean, scale = train.channel_stats()
    train, test = train.standardise(mean, scale), test.standardise(mean, scale)
    return train, test, test


DATASETS = {
    "lorenz": dict(
        load=lorenz,
        t=(0.0, 1.0),
        forecast_from=0.5,
        latent=4,
        hidden=100,
        observation_scale=0.01,
        learn_scale=False,
        batch=256,
        solver_steps=40,
    ),
    "van_der_pol": dict(
        load=van_der_pol,
        t=(0.0, 10.0),
        forecast_from=6.0,
        latent=4,
        hidden=64,
        observation_scale=0.1,
        learn_scale=True,
        batch=128,
        solver_steps=100,
    ),
    "basic_motions": dict(
        load=basic_motions,
        t=(0.0, 1.0),
        forecast_from=0.7,
        latent=8,
        hidden=64,
        observation_scale=0.1,
        learn_scale=True,
        batch=40,
        solver_steps=100,
    ),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("command", nargs="?", default="run", choices=["run", "report"])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--sm-steps", type=int, default=3000)
    parser.add_argument("--solver-steps", type=int, default=1000)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tag", default="", help="appended to the method names of this run's rows"
    )
    parser.add_argument("--no-figures", action="store_true")
    parser.add_argument("--out", default=str(HERE / "results/latent_sde.json"))
    parser.add_argument("--figures", default=str(HERE / "figures"))
    return parser.parse_args(argv)


def build(method, spec, channels, key):
    t0, t1 = spec["t"]
    common = dict(
        t0=t0,
        t1=t1,
        hidden_size=spec["hidden"],
        observation_scale=spec["observation_scale"],
        learn_observation_scale=spec["learn_scale"],
        key=key,
    )
    if method == "SDE Matching":
        return nf.LatentSDE(channels, spec["latent"], **common)
    return nf.SolverLatentSDE(
        channels, spec["latent"], num_steps=spec["solver_steps"], **common
    )


def evaluate(model, spec, test, regular, key):
    fkey, gkey = jr.split(key)
    scores = nf.forecast_error(
        model, test, spec["forecast_from"], key=fkey, num_samples=16, num_steps=200
    )
    grid = regular.times[0]
    sol = model.sample_prior(grid, regular.num_series, key=gkey, num_steps=1000)
    scores["energy"] = float(nf.energy_distance(sol.observations[0], regular.values))
    return scores


def run_method(method, name, spec, args):
    key = jr.key(args.seed)
    dkey, mkey, ekey = jr.split(key, 3)
    train, test, regular = spec["load"](dkey)
    model = build(method, spec, train.num_channels, mkey)
    model.check(train), model.check(test)
    steps = args.sm_steps if method == "SDE Matching" else args.solver_steps
    config = nf.TrainConfig(
        steps=steps,
        batch_size=min(spec["batch"], train.num_series),
        learning_rate=1e-3,
        clip_norm=10.0,
        ema_decay=None,
        steps_per_call=args.eval_every,
        eval_every=args.eval_every,
        seed=args.seed,
    )
    clock = {"train": 0.0, "since": time.perf_counter(), "compile": None}
    curve = []

    def on_eval(m, step):
        now = time.perf_counter()
        chunk = now - clock["since"]
        if clock["compile"] is None:
            clock["compile"] = chunk
        clock["train"] += chunk
        scores = evaluate(m, spec, test, regular, ekey)
        curve.append({"step": step, "seconds": clock["train"], **scores})
        print(
            f"  {name} {method} step {step}: {clock['train']:.0f} s, "
            + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()),
            flush=True,
        )
        clock["since"] = time.perf_counter()
        return scores

    trainer = nf.Trainer(config)
    state = trainer.init(model)
    state, records = trainer.fit(
        state, train.sampler(config.batch_size), evaluate=on_eval
    )
    # The steady per-step cost: chunks after the first (which includes compilation).
    later = [
        b["seconds"] - a["seconds"] for a, b in zip(curve, curve[1:], strict=False)
    ]
    per_step = float(np.median(later)) / args.eval_every if later else float("nan")
    nelbo = float(records[-1]["nelbo"]) if "nelbo" in records[-1] else float("nan")
    return (
        {
            "dataset": name,
            "method": f"{method} ({args.tag})" if args.tag else method,
            "steps": steps,
            "batch": config.batch_size,
            "seed": args.seed,
            "seconds_per_step": per_step,
            "train_seconds": clock["train"],
            "nelbo_per_series": nelbo,
            "final": curve[-1],
            "curve": curve,
        },
        state.model,
        (train, test, regular),
    )


def naive_rows(name, spec, test, seed):
    """Point forecasts without a model, for scale: the last observed value of each
    channel (persistence) and the training mean (zero after standardisation, or
    the mean of the held-out history for unstandardised data)."""
    t_from = spec["forecast_from"]
    times = np.asarray(test.times)
    values, mask = np.asarray(test.values), np.asarray(test.mask)
    history = mask & (times <= t_from)[..., None]
    target = mask & (times > t_from)[..., None]
    # Index of the last observed row at or before t_from, per series and channel.
    steps = np.arange(times.shape[1])[None, :, None]
    last = np.max(np.where(history, steps, -1), axis=1)
    previous = np.take_along_axis(values, np.maximum(last, 0)[:, None, :], axis=1)
    mean = np.sum(np.where(history, values, 0), axis=(0, 1)) / np.sum(history, (0, 1))
    rows = []
    for method, guess in (
        ("last observed value", np.broadcast_to(previous, values.shape)),
        ("history mean", np.broadcast_to(mean, values.shape)),
    ):
        err = np.where(target, guess - values, 0.0)
        count = target.sum()
        rmse = float(np.sqrt(np.sum(err**2) / count))
        mae = float(np.sum(np.abs(err)) / count)
        final = {"rmse": rmse, "mae": mae, "crps": mae, "energy": float("nan")}
        rows.append(
            {
                "dataset": name,
                "method": method,
                "steps": 0,
                "batch": 0,
                "seed": seed,
                "seconds_per_step": float("nan"),
                "train_seconds": 0.0,
                "nelbo_per_series": float("nan"),
                "final": final,
                "curve": [],
            }
        )
    return rows


def save_rows(path, rows):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(path.read_text()) if path.exists() else []
    keys = {(r["dataset"], r["method"], r["seed"]) for r in rows}
    kept = [r for r in old if (r["dataset"], r["method"], r["seed"]) not in keys]
    path.write_text(json.dumps(kept + rows, indent=1))


def figures(name, spec, models, data, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train, test, regular = data
    key = jr.key(11)
    if name == "lorenz":
        fig, axes = plt.subplots(1, len(models) + 1, figsize=(4 * (len(models) + 1), 4))
        axes[0].set_title("held-out series")
        for path in np.asarray(regular.values[:64]):
            axes[0].plot(path[:, 0], path[:, 2], lw=0.5, alpha=0.6)
        for ax, (method, model) in zip(axes[1:], models.items(), strict=True):
            sol = model.sample_prior(
                jnp.linspace(0, 1, 201), 64, key=key, num_steps=1000
            )
            for path in np.asarray(sol.observations[0]):
                ax.plot(path[:, 0], path[:, 2], lw=0.5, alpha=0.6)
            ax.set_title(f"{method}: prior samples")
        for ax in axes:
            ax.set_xlabel("x")
            ax.set_ylabel("z")
    else:
        rows = 3
        channel = 0
        fig, axes = plt.subplots(
            rows, len(models), figsize=(5 * len(models), 2.6 * rows)
        )
        axes = np.atleast_2d(axes).reshape(rows, len(models))
        t_from = spec["forecast_from"]
        for j, (method, model) in enumerate(models.items()):
            sol = model.forecast(
                test[:rows], t_from, key=key, num_samples=64, num_steps=200
            )
            for i in range(rows):
                ax = axes[i, j]
                t = np.asarray(test.times[i])
                m = np.asarray(test.mask[i, :, channel])
                x = np.asarray(test.values[i, :, channel])
                samples = np.asarray(sol.observations[i, :, :, channel])
                after = t > t_from
                lo, mid, hi = np.percentile(samples[:, after], [5, 50, 95], axis=0)
                ax.fill_between(t[after], lo, hi, alpha=0.3, label="5-95 %")
                ax.plot(t[after], mid, label="median forecast")
                ax.scatter(t[m & ~after], x[m & ~after], s=6, c="k", label="history")
                ax.scatter(t[m & after], x[m & after], s=6, c="r", label="held out")
                ax.axvline(t_from, c="grey", lw=0.5)
                if i == 0:
                    ax.set_title(f"{method}: forecasts from t = {t_from}")
        axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"latent_sde_{name}.png", dpi=110)
    plt.close(fig)


def report(path):
    path = Path(path)
    if not path.exists():
        raise SystemExit(
            f"No results at {path}; run `python examples/latent_sde.py` first."
        )
    rows = json.loads(path.read_text())
    print(
        "| data set | method | steps | s / step | train s | forecast RMSE | CRPS | "
        "energy distance | s to reach the common RMSE |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    by_set = {}
    for r in rows:
        by_set.setdefault(r["dataset"], []).append(r)
    for name, group in by_set.items():
        # The accuracy both methods reach in their main runs: the worse of their
        # best forecast RMSEs.
        main = [r for r in group if r["method"] in METHODS]
        target = max(min(p["rmse"] for p in r["curve"]) for r in main) if main else 0
        for r in group:
            hit = next((p["seconds"] for p in r["curve"] if p["rmse"] <= target), None)
            reach = "not reached" if hit is None else f"{hit:.0f}"
            if not r["curve"]:
                reach = "-"
            f = r["final"]
            print(
                f"| {name} | {r['method']} | {r['steps']} | "
                f"{r['seconds_per_step']:.4f} | {r['train_seconds']:.0f} | "
                f"{f['rmse']:.3f} | {f['crps']:.3f} | {f['energy']:.3f} | "
                f"{reach} (RMSE {target:.3f}) |"
            )


def main(argv=None):
    args = parse_args(argv)
    if args.command == "report":
        report(args.out)
        return
    for name in args.datasets:
        if name not in DATASETS:
            raise SystemExit(
                f"Unknown data set {name!r}; choose from {list(DATASETS)}."
            )
        spec = DATASETS[name]
        models, rows, data = {}, [], None
        for method in args.methods:
            print(f"{name}: {method}", flush=True)
            row, model, data = run_method(method, name, spec, args)
            rows.append(row)
            models[method] = model
            save_rows(args.out, [row])
        if data is not None and not args.tag:
            save_rows(args.out, naive_rows(name, spec, data[1], args.seed))
        if data is not None and not args.no_figures:
            figures(name, spec, models, data, args.figures)
    report(args.out)


if __name__ == "__main__":
    jax.config.update("jax_numpy_dtype_promotion", "standard")
    main()
