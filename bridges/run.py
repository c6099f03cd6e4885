"""Bridge tasks: a neural flow bridge model (NFBM) against minibatch-OT flow matching
(OT-CFM) from one data set to another, with the same networks, steps and coupling.

    python bridges/run.py moons        # 8 Gaussians -> moons: W2 to the target
    python bridges/run.py gaussian     # Gaussian -> Gaussian in d = 2, 5, 20 against
                                       # the closed-form optimal transport map
    python bridges/run.py obstacle     # three source blobs -> one target around a
                                       # disk: violation rate, with and without penalty
    python bridges/run.py digits       # unpaired translation of one digit class into
                                       # another: classifier accuracy and pixel W2
    python bridges/run.py report       # the Markdown tables of bridges/README.md

Options choose the seed (`--seed`), the coupling of every minibatch (`--coupling`),
the bridge process (`--forward gaussian|spline`) and which methods run (`--methods`).
Each run stores its rows in `bridges/results.json` under a key naming the task,
coupling, bridge process and seed; `report` averages the rows over seeds.
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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("task", choices=[*TASKS, "report"])
    parser.add_argument("--steps", type=int, default=10000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--eval-size", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bridges/results.json")
    parser.add_argument(
        "--coupling", choices=sorted(COUPLINGS), default="sinkhorn", help="of pairs"
    )
    parser.add_argument(
        "--forward", choices=["gaussian", "spline"], default="gaussian", help="bridge"
    )
    parser.add_argument(
        "--methods", nargs="+", choices=["NFBM", "OT-CFM"], default=["NFBM", "OT-CFM"]
    )
    parser.add_argument(
        "--width", type=int, help="width of every network (default: per task)"
    )
    parser.add_argument("--source-digit", type=int, default=0)
    parser.add_argument("--target-digit", type=int, default=6)
    return parser.parse_args(argv)


COUPLINGS = {
    "sinkhorn": lambda: nf.SinkhornCoupling(epsilon=0.01),
    "exact": nf.ExactOTCoupling,
    "unbalanced": lambda: nf.UnbalancedCoupling(epsilon=0.01, tau_a=0.9, tau_b=0.9),
    "independent": nf.IndependentCoupling,
}


def train(model, sample_pairs, args, penalties=None):
    config = nf.TrainConfig(
        steps=args.steps,
        batch_size=args.batch,
        clip_norm=1.0,
        schedule="cosine",
        steps_per_call=500,
        seed=args.seed,
    )
    trainer = nf.Trainer(config, penalties=penalties)
    start = time.perf_counter()
    state, _ = trainer.fit(trainer.init(model), sample_pairs)
    return state.ema, time.perf_counter() - start


def transport(model, sources, key) -> dict[str, np.ndarray]:
    """The target-side samples of each way of running a model from `sources`."""
    if isinstance(model, nf.NeuralFlowBridge):
        return {
            "SDE": np.asarray(model.sample(sources, key=key).samples),
            "ODE": np.asarray(
                model.sample(sources, key=key, deterministic=True).samples
            ),
        }
    solution = nf.sample_ode(model, key=key, solver="euler", num_steps=200, z1=sources)
    return {"ODE": np.asarray(solution.samples)}


def models(dim, key, args, width=None):
    """The methods of `args.methods`, named as in the tables."""
    coupling = COUPLINGS[args.coupling]()
    if args.width is not None:
        width = args.width
    width = (64 if dim <= 5 else 128) if width is None else width
    bridge_name = "NFBM" if args.forward == "gaussian" else f"NFBM-{args.forward}"
    built = {
        bridge_name: nf.NeuralFlowBridge(
            dim,
            key=key,
            coupling=coupling,
            width_size=width,
            forward=args.forward,
        ),
        "OT-CFM": nf.FlowMatching(
            (dim,), key=key, coupling=coupling, from_data=True, width_size=width
        ),
    }
    # A width other than the task's default is part of the method's name.
    suffix = "" if args.width is None else f", width {width}"
    return {
        name + suffix: model
        for name, model in built.items()
        if name.split("-")[0] in args.methods or name in args.methods
    }


def task_moons(args) -> list[dict]:
    source, target = nf.toy_dataset("eight_gaussians"), nf.toy_dataset("moons")

    def pairs(key):
        tkey, skey = jr.split(key)
        return jnp.stack([target(tkey, args.batch), source(skey, args.batch)], 1)

    ekey, skey, mkey, tkey = jr.split(jr.key(args.seed + 100), 4)
    held_target = target(ekey, args.eval_size)
    sources = source(skey, args.eval_size)
    floor = float(
        nf.wasserstein(target(jr.fold_in(ekey, 1), args.eval_size), held_target)
    )
    rows = []
    for name, model in models(2, mkey, args).items():
        trained, seconds = train(model, pairs, args)
        for how, samples in transport(trained, sources, tkey).items():
            w2 = float(nf.wasserstein(jnp.asarray(samples), held_target))
            rows.append(
                {
                    "task": "8 Gaussians -> moons",
                    "method": f"{name} ({how})",
                    "w2": w2,
                    "w2_floor": floor,
                    "train_seconds": seconds,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _sqrtm(a: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(a)
    return (vectors * np.sqrt(np.maximum(values, 0))) @ vectors.T


def gaussian_ot_map(m1, s1, m0, s0):
    """The optimal transport map from N(m1, s1) to N(m0, s0): x -> m0 + A (x - m1)."""
    root = _sqrtm(s1)
    inverse_root = np.linalg.inv(root)
    a = inverse_root @ _sqrtm(root @ s0 @ root) @ inverse_root
    return lambda x: m0 + (x - m1) @ a.T


def draw(key, n, mean, chol):
    """`n` samples of N(mean, chol chol^T)."""
    dtype = jnp.result_type(float)
    noise = jr.normal(key, (n, mean.shape[0]), dtype)
    return jnp.asarray(mean, dtype) + noise @ jnp.asarray(chol.T, dtype)


def task_gaussian(args) -> list[dict]:
    rows = []
    for dim in (2, 5, 20):
        rng = np.random.default_rng(args.seed + dim)
        m1, m0 = rng.normal(size=dim), rng.normal(size=dim) + 2.0
        b1, b0 = rng.normal(size=(dim, dim)), rng.normal(size=(dim, dim))
        s1 = b1 @ b1.T / dim + 0.3 * np.eye(dim)
        s0 = b0 @ b0.T / dim + 0.3 * np.eye(dim)
        c1, c0 = np.linalg.cholesky(s1), np.linalg.cholesky(s0)

        def pairs(key, m1=m1, m0=m0, c1=c1, c0=c0):
            tkey, skey = jr.split(key)
            return jnp.stack(
                [draw(tkey, args.batch, m0, c0), draw(skey, args.batch, m1, c1)], 1
            )

        skey, mkey, tkey = jr.split(jr.key(args.seed + 200 + dim), 3)
        sources = draw(skey, args.eval_size, m1, c1)
        exact = gaussian_ot_map(m1, s1, m0, s0)(np.asarray(sources))
        # The floor: the errors of exact samples of the target (the OT map applied to
        # the same sources), which finite samples alone give.
        rows.append(
            {
                "task": f"Gaussian -> Gaussian, d = {dim}",
                "method": "reference: OT map applied to the sources (floor)",
                "mean_error": float(np.linalg.norm(exact.mean(0) - m0)),
                "relative_cov_error": float(
                    np.linalg.norm(np.cov(exact.T) - s0) / np.linalg.norm(s0)
                ),
                "rms_distance_to_ot_map": 0.0,
            }
        )
        for name, model in models(dim, mkey, args).items():
            trained, seconds = train(model, pairs, args)
            for how, samples in transport(trained, sources, tkey).items():
                mean_error = float(np.linalg.norm(samples.mean(0) - m0))
                cov_error = float(
                    np.linalg.norm(np.cov(samples.T) - s0) / np.linalg.norm(s0)
                )
                map_error = float(np.sqrt(np.mean(np.sum((samples - exact) ** 2, -1))))
                rows.append(
                    {
                        "task": f"Gaussian -> Gaussian, d = {dim}",
                        "method": f"{name} ({how})",
                        "mean_error": mean_error,
                        "relative_cov_error": cov_error,
                        "rms_distance_to_ot_map": map_error,
                        "train_seconds": seconds,
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    return rows


OBSTACLE = nf.Disk([0.0, 0.0], 1.0)


def task_obstacle(args) -> list[dict]:
    """Three source blobs on the left, one target blob on the right, a disk between."""
    centres = jnp.array([[-3.0, -2.0], [-3.0, 0.0], [-3.0, 2.0]])

    def source(key, n):
        ckey, nkey = jr.split(key)
        which = jr.randint(ckey, (n,), 0, 3)
        return centres[which] + 0.3 * jr.normal(nkey, (n, 2))

    def target(key, n):
        return jnp.array([[3.0, 0.0]]) + 0.3 * jr.normal(key, (n, 2))

    def pairs(key):
        tkey, skey = jr.split(key)
        return jnp.stack([target(tkey, args.batch), source(skey, args.batch)], 1)

    ekey, skey, mkey, tkey = jr.split(jr.key(args.seed + 300), 4)
    held_target, sources = target(ekey, args.eval_size), source(skey, args.eval_size)
    penalties = nf.Penalties(
        obstacle=(100.0, nf.Obstacle(OBSTACLE, margin=0.1)),
        region=(100.0, nf.StayInside(nf.Disk([0.0, 0.0], 5.0))),
    )
    runs = {}
    for name, model in models(2, mkey, args).items():
        if isinstance(model, nf.NeuralFlowBridge):
            runs[f"{name} + obstacle penalty"] = (model, penalties)
        runs[name] = (model, None)
    rows, paths = [], {}
    for name, (model, penalty) in runs.items():
        trained, seconds = train(model, pairs, args, penalty)
        for how in (
            ("SDE", "ODE") if isinstance(model, nf.NeuralFlowBridge) else ("ODE",)
        ):
            if isinstance(trained, nf.NeuralFlowBridge):
                solution = trained.sample(
                    sources, key=tkey, deterministic=how == "ODE", num_saves=101
                )
            else:
                solution = nf.sample_ode(
                    trained,
                    key=tkey,
                    solver="euler",
                    num_steps=200,
                    num_saves=101,
                    z1=sources,
                )
            trajectories = solution.trajectories
            assert trajectories is not None
            paths[f"{name} ({how})"] = np.asarray(trajectories)[:40]
            rows.append(
                {
                    "task": "3 blobs -> 1 blob around a disk",
                    "method": f"{name} ({how})",
                    "inside_obstacle": float(
                        nf.violation_fraction(trajectories, OBSTACLE)
                    ),
                    "w2": float(nf.wasserstein(solution.samples, held_target)),
                    "train_seconds": seconds,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    nf.plotting.plot_trajectories_2d(
        paths,
        Path(f"bridges/figures/obstacle_bridge_seed{args.seed}.png"),
        title="three sources to one target around a disk",
        shapes=[OBSTACLE],
    )
    return rows


def task_digits(args) -> list[dict]:
    """Unpaired translation of one digit class into another (8 x 8 pixels in [-1, 1]).

    A fixed 70/30 split of all 1797 digits (the same for every seed): the bridge sees
    only training images of the two classes, unpaired; a logistic-regression
    classifier fitted on all ten classes of the training split scores the translated
    held-out sources (the fraction it reads as the target digit), and W2 in pixel
    space compares them with the held-out targets.
    """
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    images = nf.load_digits(dtype=np.float64)
    labels = load_digits().target
    order = np.random.default_rng(1797).permutation(len(labels))
    held = np.zeros(len(labels), bool)
    held[order[: int(0.3 * len(labels))]] = True
    classifier = LogisticRegression(max_iter=5000, C=0.1)
    classifier.fit(images[~held], labels[~held])
    classifier_accuracy = float(classifier.score(images[held], labels[held]))

    src, tgt = args.source_digit, args.target_digit
    train_source = jnp.asarray(images[~held & (labels == src)], jnp.float32)
    train_target = jnp.asarray(images[~held & (labels == tgt)], jnp.float32)
    held_source = jnp.asarray(images[held & (labels == src)], jnp.float32)
    held_target = jnp.asarray(images[held & (labels == tgt)], jnp.float32)
    n = min(len(held_source), len(held_target))

    def pairs(key):
        tkey, skey = jr.split(key)
        t = jr.randint(tkey, (args.batch,), 0, train_target.shape[0])
        s = jr.randint(skey, (args.batch,), 0, train_source.shape[0])
        return jnp.stack([train_target[t], train_source[s]], 1)

    def moved(samples) -> float:
        # How far each image travels (RMS pixel distance to its source): a
        # translation that keeps what it can of the source moves it least.
        change = np.asarray(samples) - np.asarray(held_source)
        return float(np.sqrt(np.mean(np.sum(change**2, -1))))

    def target_rate(samples) -> float:
        return float(np.mean(classifier.predict(np.asarray(samples)) == tgt))

    task = f"digits {src} -> {tgt}"
    references = {
        "source images, untranslated": held_source,
        "training target images (real images of the class)": train_target[
            : len(held_source)
        ],
    }
    rows = []
    for name, samples in references.items():
        rows.append(
            {
                "task": task,
                "method": f"reference: {name}",
                "target_rate": target_rate(samples),
                "w2_pixels": float(nf.wasserstein(samples[:n], held_target[:n])),
                "classifier_accuracy": classifier_accuracy,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    mkey, tkey = jr.split(jr.key(args.seed + 400))
    for name, model in models(64, mkey, args, width=256).items():
        trained, seconds = train(model, pairs, args)
        for how, samples in transport(trained, held_source, tkey).items():
            rows.append(
                {
                    "task": task,
                    "method": f"{name} ({how})",
                    "target_rate": target_rate(samples),
                    "w2_pixels": float(
                        nf.wasserstein(jnp.asarray(samples[:n]), held_target[:n])
                    ),
                    "moved_pixels": moved(samples),
                    "classifier_accuracy": classifier_accuracy,
                    "train_seconds": seconds,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
            grid = np.concatenate([np.asarray(held_source[:12]), samples[:12]])
            plot_digit_pairs(grid, Path(f"bridges/figures/digits_{name}_{how}.png"))
    return rows


def plot_digit_pairs(grid: np.ndarray, path: Path) -> None:
    """Sources on the top row, their translations below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = len(grid) // 2
    fig, axes = plt.subplots(2, cols, figsize=(cols * 0.9, 2.0))
    for ax, image in zip(axes.ravel(), grid, strict=True):
        ax.imshow(np.clip(image.reshape(8, 8), -1, 1), cmap="gray_r", vmin=-1, vmax=1)
        ax.set_axis_off()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


TASKS = {
    "moons": task_moons,
    "gaussian": task_gaussian,
    "obstacle": task_obstacle,
    "digits": task_digits,
}

METRICS = {
    "w2": "W2",
    "w2_floor": "W2 floor",
    "mean_error": "mean error",
    "relative_cov_error": "relative cov. error",
    "rms_distance_to_ot_map": "RMS distance to OT map",
    "inside_obstacle": "inside obstacle",
    "target_rate": "read as target",
    "w2_pixels": "W2 (pixels)",
    "moved_pixels": "RMS move (pixels)",
    "train_seconds": "train s",
}


def _format(values: list[float], key: str) -> str:
    scale, digits = (100, 2) if key in ("inside_obstacle", "target_rate") else (1, 3)
    if key == "train_seconds":
        digits = 0
    mean = scale * float(np.mean(values))
    text = f"{mean:.{digits}f}"
    if len(values) > 1:
        text += f" ± {scale * float(np.std(values, ddof=1)):.{digits}f}"
    return text + (" %" if scale == 100 else "")


def report(path: Path) -> str:
    """Markdown tables of every stored run, mean ± std over seeds."""
    saved = json.loads(path.read_text())
    groups: dict[tuple[str, str, str], list[dict]] = {}
    seeds: dict[tuple[str, str, str], set[int]] = {}
    for run in saved.values():
        coupling = run["args"].get("coupling", "sinkhorn")
        for row in run["rows"]:
            key = (row["task"], row["method"], coupling)
            groups.setdefault(key, []).append(row)
            seeds.setdefault(key, set()).add(run["args"]["seed"])
    out = []
    for task in dict.fromkeys(key[0] for key in groups):
        keys = [key for key in groups if key[0] == task]
        metrics = [m for m in METRICS if any(m in r for k in keys for r in groups[k])]
        header = ["method", "coupling", "seeds", *(METRICS[m] for m in metrics)]
        out += [f"### {task}", "", "| " + " | ".join(header) + " |"]
        out.append("|" + "---|" * len(header))
        for key in keys:
            rows = groups[key]
            cells = [key[1], key[2], str(len(seeds[key]))]
            for m in metrics:
                values = [r[m] for r in rows if m in r]
                cells.append(_format(values, m) if values else "")
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> None:
    args = parse_args(argv)
    path = Path(args.out)
    if args.task == "report":
        print(report(path))
        return
    print(f"JAX devices: {jax.devices()}", flush=True)
    rows = TASKS[args.task](args)
    saved = json.loads(path.read_text()) if path.exists() else {}
    name = f"{args.task}|{args.coupling}|{args.forward}|{'+'.join(args.methods)}"
    if args.width is not None:
        name += f"|width={args.width}"
    saved[f"{name}|seed={args.seed}"] = {"args": vars(args), "rows": rows}
    path.write_text(json.dumps(saved, indent=2))


if __name__ == "__main__":
    main()
