"""Generation around obstacles: NFDM on the 8 Gaussians, trained with an obstacle
penalty on its forward samples (no simulation), against the same model without it.

Two obstacles are used, one per constrained model: a disk between the origin and the
upper-right mode, and a wall in front of the lower-right mode given only by a
signed-distance function written here by hand. Each constrained model is trained with
three terms besides its bound: the obstacle cost (faded out over the last 15 % of
time, where the prior N(0, I) itself covers part of the obstacle and no path can
avoid it), and a disk of radius 3.5 that the paths must stay inside. Without that
region the cheapest way to empty the obstacle is to spread every path far out, which
dilutes the density inside it instead of going around. For each model the script
reports the fraction of SDE and ODE trajectory points inside each obstacle (overall and
at t = 1, 0.9, ..., 0) and the W2 distance of the samples to held-out data.

    python examples/obstacles.py                 # about 3 minutes on 2 CPU cores
    python examples/obstacles.py --steps 2000    # a quick look

Writes `runs/obstacles/results.json` and `examples/figures/obstacles_*.png`.
"""

import argparse
import json
import time
from pathlib import Path

import jax.numpy as jnp
import jax.random as jr
import numpy as np

import nfdm_sciml as nf
from nfdm_sciml import plotting


def wall(z):
    """The signed distance to a thick segment (a capsule) from (0.9, -1.9) to
    (1.9, -0.9), 0.2 wide on each side: what a user writes for a shape of their own."""
    a, b = jnp.array([0.9, -1.9], z.dtype), jnp.array([1.9, -0.9], z.dtype)
    s = jnp.clip(jnp.dot(z - a, b - a) / jnp.dot(b - a, b - a), 0, 1)
    offset = z - (a + s * (b - a))
    return jnp.sqrt(jnp.sum(offset**2) + 1e-12) - 0.2


SHAPES = {
    "disk": nf.Disk([1.2, 1.2], 0.4),
    "wall": nf.SignedDistance(wall),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--weight", type=float, default=300.0)
    parser.add_argument("--margin", type=float, default=0.1)
    parser.add_argument(
        "--kinetic", type=float, default=0.0, help="weight of a kinetic-energy term"
    )
    parser.add_argument(
        "--region",
        type=float,
        default=3.5,
        help="radius of a disk around the origin the paths must stay inside (0: off)",
    )
    parser.add_argument(
        "--fade",
        type=float,
        default=0.15,
        help="the obstacle cost fades out linearly over the last FADE of time (0: off)",
    )
    parser.add_argument("--eval-size", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/obstacles")
    parser.add_argument("--figures", default="examples/figures")
    return parser.parse_args(argv)


def train(penalties, args):
    config = nf.TrainConfig(
        steps=args.steps,
        batch_size=args.batch,
        steps_per_call=500,
        ema_decay=0.999,
        seed=args.seed,
    )
    trainer = nf.Trainer(config, penalties=penalties)
    model = nf.build_model("nfdm", 2, key=jr.key(args.seed))
    start = time.perf_counter()
    state, _ = trainer.fit(
        trainer.init(model), lambda key: nf.eight_gaussians(key, args.batch)
    )
    return state.ema, time.perf_counter() - start


def evaluate(model, held_out, args) -> tuple[dict, dict]:
    skey, okey = jr.split(jr.key(args.seed + 1))
    n = args.eval_size
    sde = nf.sample_sde(model, n, key=skey, num_steps=200, num_saves=101)
    ode = nf.sample_ode(
        model, n, key=okey, solver="euler", num_steps=200, num_saves=101
    )
    row = {}
    for kind, solution in (("sde", sde), ("ode", ode)):
        row[f"w2_{kind}"] = float(nf.wasserstein(solution.samples, held_out))
        for name, shape in SHAPES.items():
            fraction = nf.violation_fraction(solution.trajectories, shape)
            row[f"inside_{name}_{kind}"] = float(fraction)
            # Where along the way: the fraction inside at t = 1, 0.9, ..., 0.
            inside = np.asarray(shape.contains(solution.trajectories)).mean(0)
            row[f"inside_{name}_{kind}_by_time"] = inside[::10].round(4).tolist()
    return row, {"sde": sde, "ode": ode}


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    held_out = nf.eight_gaussians(jr.key(10_000 + args.seed), args.eval_size)
    floor = float(
        nf.wasserstein(nf.eight_gaussians(jr.key(20_000), args.eval_size), held_out)
    )
    results = {"args": vars(args), "w2_floor": floor, "models": {}}
    runs = {"none": None}
    for name, shape in SHAPES.items():
        obstacle = nf.Obstacle(shape, margin=args.margin)
        if args.fade > 0:
            # The prior covers part of each obstacle; near t = 1 the penalty could
            # only be met by spreading every path out, so it fades out there.
            obstacle = nf.TimeWeighted(
                obstacle, lambda t, w=args.fade: jnp.clip((1 - t) / w, 0, 1)
            )
        terms = {"obstacle": (args.weight, obstacle)}
        if args.region > 0:
            # Without it the cheapest way to empty the obstacle is to spread all paths
            # far out (the density inside falls); a region to stay in rules that out.
            region = nf.StayInside(nf.Disk([0.0, 0.0], args.region))
            terms["region"] = (args.weight, region)
        if args.kinetic > 0:
            terms["kinetic"] = (args.kinetic, nf.KineticEnergy())
        runs[name] = nf.Penalties(**terms)
    solutions = {}
    for name, penalties in runs.items():
        model, seconds = train(penalties, args)
        row, solutions[name] = evaluate(model, held_out, args)
        row["train_seconds"] = seconds
        results["models"][name] = row
        print(f"penalty {name}: {json.dumps(row)}", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))

    figures = Path(args.figures)
    for name, shape in SHAPES.items():
        plotting.plot_trajectories_2d(
            {
                f"{label}, {kind.upper()}": np.asarray(
                    solutions[key][kind].trajectories
                )[: 16 if kind == "sde" else 48]
                for key, label in (("none", "no penalty"), (name, "with penalty"))
                for kind in ("sde", "ode")
            },
            figures / f"obstacles_{name}.png",
            title=f"8 Gaussians around the {name}",
            shapes=[shape],
        )
    print(table(results))
    return results


def table(results) -> str:
    lines = [
        "| penalty | inside disk, SDE | inside disk, ODE | inside wall, SDE | "
        "inside wall, ODE | W2 SDE | W2 ODE | train (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in results["models"].items():
        lines.append(
            f"| {name} | {100 * row['inside_disk_sde']:.2f} % | "
            f"{100 * row['inside_disk_ode']:.2f} % | "
            f"{100 * row['inside_wall_sde']:.2f} % | "
            f"{100 * row['inside_wall_ode']:.2f} % | {row['w2_sde']:.3f} | "
            f"{row['w2_ode']:.3f} | {row['train_seconds']:.0f} |"
        )
    lines.append(f"\nW2 floor (two samples of the data): {results['w2_floor']:.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
