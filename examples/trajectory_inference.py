"""Trajectory inference on generated time courses: NFDM against OT-CFM and straight
lines in the leave-one-out protocol, with the floor of each data set.

    python examples/trajectory_inference.py             # every data set and method
    python examples/trajectory_inference.py --datasets double_well --seeds 0 1
    python examples/trajectory_inference.py report      # the Markdown table

For each data set (`nf.TIME_COURSES`: a tilted double well in 2D, a noisy Lorenz
population in 3D, an oscillator in 5D; 1000 samples at each of 6 times), every
interior time is held out in turn; each method trains on the other snapshots, carries
the snapshot before it to the held-out time, and the exact W1 to the held-out
population is recorded (data units). The floor is the W1 between the held-out
population and an independent sample of it. Rows go to
`examples/results/trajectory_inference.json`; figures to `examples/figures/`.
"""

import argparse
import json
import time
from pathlib import Path

import jax.numpy as jnp
import jax.random as jr
import numpy as np

import nfdm_sciml as nf


HERE = Path(__file__).parent
METHODS = ["NFDM (SDE)", "NFDM (ODE)", "OT-CFM", "OT straight lines"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("command", nargs="?", default="run", choices=["run", "report"])
    parser.add_argument("--datasets", nargs="+", default=sorted(nf.TIME_COURSES))
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--samples", type=int, default=1000, help="per snapshot")
    parser.add_argument("--eval-size", type=int, default=1000)
    parser.add_argument(
        "--out", default=str(HERE / "results/trajectory_inference.json")
    )
    parser.add_argument("--figures", default=str(HERE / "figures"))
    return parser.parse_args(argv)


def config_for(args):
    def config(seed):
        return nf.TrainConfig(
            steps=args.steps,
            batch_size=256,
            schedule="cosine",
            clip_norm=1.0,
            steps_per_call=500,
            seed=seed,
        )

    return config


def recording(method, store):
    """Wraps a protocol method to keep its seed-0 predictions for the figures."""

    def run(train, source, t_source, t_target, seed):
        predicted = method(train, source, t_source, t_target, seed)
        if seed == 0:
            store[t_target] = np.asarray(predicted)
        return predicted

    return run


def nfdm_methods(args):
    """The NFDM rows: one model per (training snapshots, seed), trained once and
    simulated both as an SDE and as an ODE."""
    cache = {}

    def fitted(train, seed):
        key = (train.times, seed)
        if key not in cache:
            # One held-out time at a time: keep the models of this one only.
            for old in [k for k in cache if k[0] != train.times]:
                del cache[old]
            cache[key] = nf.fit_time_course(
                train, config=config_for(args)(seed), width_size=args.width
            )
        return cache[key]

    def method(stochastic):
        def run(train, source, t_source, t_target, seed):
            model = fitted(train, seed)
            sol = model.simulate(
                jnp.asarray(source, model.standardiser.mean.dtype),
                t_source,
                t_target,
                key=jr.key(10_000 + seed),
                stochastic=stochastic,
            )
            return np.asarray(sol.final)

        return run

    return {"NFDM (SDE)": method(True), "NFDM (ODE)": method(False)}


def run_dataset(name, args, results):
    make = nf.TIME_COURSES[name]
    snapshots, reference = make(args.samples, seed=0), make(args.samples, seed=1000)
    common = {"seeds": args.seeds, "eval_size": args.eval_size}
    floor = nf.held_out_floor(snapshots, reference, **common)
    results[f"{name}|floor"] = {"rows": list(floor.rows)}
    print(f"{name}: floor {floor.mean:.3f} +- {floor.std:.3f}", flush=True)
    methods = {
        **nfdm_methods(args),
        "OT-CFM": nf.model_method(
            "ot-cfm", config=config_for(args), width_size=args.width
        ),
        "OT straight lines": nf.ot_interpolation,
    }
    labels = [m for m in methods if m in args.methods]
    predictions = {label: {} for label in labels}
    stores = {label: recording(methods[label], predictions[label]) for label in labels}
    rows = {label: [] for label in labels}
    seconds = dict.fromkeys(labels, 0.0)
    # Held-out time by held-out time, every method on it (so NFDM trains once for
    # both of its samplers).
    for k in range(1, len(snapshots) - 1):
        for label in labels:
            start = time.perf_counter()
            result = nf.leave_one_out(snapshots, stores[label], left_out=[k], **common)
            seconds[label] += time.perf_counter() - start
            rows[label].extend(result.rows)
    for label in labels:
        key = f"{name}|{label}|steps={args.steps}|width={args.width}"
        results[key] = {"rows": rows[label], "seconds": seconds[label]}
        w1 = np.array([r["w1"] for r in rows[label]])
        print(
            f"{name}: {label} {w1.mean():.3f} +- {w1.std():.3f} "
            f"({seconds[label]:.0f} s)",
            flush=True,
        )
    return snapshots, predictions


def plot_dataset(name, snapshots, predictions, args):
    plot_predictions(name, snapshots, predictions, Path(args.figures))
    if "NFDM (SDE)" in args.methods:
        plot_trajectories(name, snapshots, args, Path(args.figures))


def _projection(snapshots):
    """The first two principal axes of all the snapshots (the identity in 2D)."""
    x = np.concatenate(snapshots.populations)
    mean = x.mean(0)
    if snapshots.dim == 2:
        return lambda y: y
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    return lambda y: (np.asarray(y) - mean) @ vt[:2].T


def plot_predictions(name, snapshots, predictions, folder):
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    project = _projection(snapshots)
    methods = [m for m in predictions if predictions[m]]
    held = sorted(next(iter(predictions.values())).keys()) if methods else []
    if not held:
        return
    fig, axes = plt.subplots(
        len(methods), len(held), figsize=(2.6 * len(held), 2.6 * len(methods)),
        squeeze=False, sharex=True, sharey=True,
    )  # fmt: skip
    for i, method in enumerate(methods):
        for j, t in enumerate(held):
            ax = axes[i, j]
            true = project(snapshots.populations[snapshots.times.index(t)])
            pred = project(predictions[method][t])
            ax.scatter(*true.T, s=2, c="0.6", label="held out")
            ax.scatter(*pred.T, s=2, c="C3", alpha=0.5, label="predicted")
            if i == 0:
                ax.set_title(f"t = {t:g} held out", fontsize=9)
            if j == 0:
                ax.set_ylabel(method, fontsize=9)
    axes[0, 0].legend(fontsize=7, markerscale=4, loc="best")
    fig.suptitle(f"{name}: predicted (red) against held-out (grey) populations")
    fig.tight_layout()
    fig.savefig(folder / f"trajectories_{name}_held_out.png", dpi=110)
    plt.close(fig)


def plot_trajectories(name, snapshots, args, folder):
    """Trains NFDM on every snapshot and draws paths from t_0 over the snapshots."""
    import matplotlib.pyplot as plt

    fitted = nf.fit_time_course(
        snapshots, config=config_for(args)(0), width_size=args.width
    )
    times = np.linspace(snapshots.times[0], snapshots.times[-1], 61)
    x0 = jnp.asarray(snapshots.populations[0][:200])
    sol = fitted.simulate(
        x0, times[0], times[-1], key=jr.key(1), save_times=list(times)
    )
    project = _projection(snapshots)
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    colours = plt.get_cmap("viridis")(np.linspace(0, 1, len(snapshots)))
    for t, x, c in zip(snapshots.times, snapshots.populations, colours, strict=True):
        ax.scatter(*project(x[:300]).T, s=3, color=c, label=f"t = {t:g}")
    for path in np.asarray(sol.trajectories)[:60]:
        ax.plot(*project(path).T, lw=0.6, c="k", alpha=0.4)
    ax.legend(fontsize=7, markerscale=3)
    ax.set_title(f"{name}: NFDM paths from t = {snapshots.times[0]:g} (SDE)")
    fig.tight_layout()
    fig.savefig(folder / f"trajectories_{name}.png", dpi=110)
    plt.close(fig)


def report(path: Path) -> str:
    results = json.loads(path.read_text())
    datasets = sorted({k.split("|")[0] for k in results})
    labels = []
    for key in results:
        parts = key.split("|")
        if parts[1] != "floor" and "|".join(parts[1:]) not in labels:
            labels.append("|".join(parts[1:]))

    def cell(rows):
        w1 = np.array([r["w1"] for r in rows])
        return f"{w1.mean():.3f} ± {w1.std():.3f}"

    head = "| method | " + " | ".join(datasets) + " |"
    lines = [head, "|" + " --- |" * (len(datasets) + 1)]
    for label in ["floor", *labels]:
        cells = []
        for d in datasets:
            entry = results.get(f"{d}|{label}")
            cells.append(cell(entry["rows"]) if entry else "–")
        name = "floor: a second true sample" if label == "floor" else label
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    if args.command == "report":
        if not out.exists():
            raise SystemExit(f"No results at {out}; run the script without `report`.")
        print(report(out))
        return
    unknown = sorted(set(args.datasets) - set(nf.TIME_COURSES))
    if unknown:
        raise SystemExit(
            f"Unknown data set(s) {unknown}; choose from {sorted(nf.TIME_COURSES)}."
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(out.read_text()) if out.exists() else {}
    for name in args.datasets:
        snapshots, predictions = run_dataset(name, args, results)
        # The rows are saved before the figures, so a plotting error loses none.
        out.write_text(json.dumps(results, indent=1))
        plot_dataset(name, snapshots, predictions, args)
    print(report(out))


if __name__ == "__main__":
    main()
