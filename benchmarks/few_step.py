"""Few-step generation: W2 to held-out data against the number of Euler steps of the
generative ODE, for NFDM-OT (NFDM with a learned end point q(z_1 | x), trained with the
generative-curvature penalty), NFDM (the paper's recipe),
and two flow-matching baselines with the same networks and training budget:
independent-coupling conditional flow matching (I-CFM) and minibatch-OT flow matching
(OT-CFM, couplings from ott-jax).

    python benchmarks/few_step.py                       # all three data sets
    python benchmarks/few_step.py --datasets moons --steps 2000   # a quick look

Writes `benchmarks/results/few_step.json`, a Markdown table on stdout, and the figures
`examples/figures/nfdm_ot_trajectories.png` and `benchmarks/results/few_step_*.png`.
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
from nfdm_sciml import plotting


METHODS = ("NFDM-OT", "NFDM", "I-CFM", "OT-CFM")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--datasets", nargs="+", default=["eight_gaussians", "moons", "checkerboard"]
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--clip", type=float, default=1.0, help="gradient clip norm")
    parser.add_argument("--curvature", type=float, default=0.3, help="NFDM-OT weight")
    parser.add_argument(
        "--pin-prior",
        action="store_true",
        help="NFDM-OT with z_1 = eps exactly (default: learned end point)",
    )
    parser.add_argument(
        "--ot",
        default="sinkhorn",
        choices=["exact", "sinkhorn"],
        help="OT-CFM coupling: exact assignment or Sinkhorn at epsilon 0.01 (relative)",
    )
    parser.add_argument("--nfe", type=int, nargs="+", default=[1, 2, 4, 8, 32])
    parser.add_argument("--eval-size", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/few_step.json")
    parser.add_argument("--report", help="print the tables of a saved JSON and stop")
    return parser.parse_args(argv)


def build(method: str, key, args):
    """The model and the penalties of one method; every network is a 4x64 SELU MLP."""
    if method == "NFDM":
        return nf.build_model("nfdm", 2, key=key), None
    if method == "NFDM-OT":
        model = nf.build_model("nfdm", 2, key=key, pin_prior=args.pin_prior)
        return model, nf.Penalties(curvature=(args.curvature, nf.GenerativeCurvature()))
    if method == "I-CFM":
        coupling = nf.IndependentCoupling()
    elif args.ot == "exact":
        coupling = nf.ExactOTCoupling()
    else:
        coupling = nf.SinkhornCoupling(epsilon=0.01)
    return nf.FlowMatching((2,), key=key, coupling=coupling), None


def run_dataset(name: str, args) -> dict:
    sampler = nf.toy_dataset(name)
    mkey, dkey, fkey, skey, nkey = jr.split(jr.fold_in(jr.key(args.seed), 1), 5)
    held_out = sampler(dkey, args.eval_size)
    # The W2 of two independent samples of the data: the floor of the estimate.
    floor = float(nf.wasserstein(sampler(fkey, args.eval_size), held_out))
    out = {"floor": floor, "methods": {}}
    models = {}
    for method in args.methods:
        model, penalties = build(method, mkey, args)
        config = nf.TrainConfig(
            steps=args.steps,
            batch_size=args.batch,
            learning_rate=args.lr,
            clip_norm=args.clip,
            steps_per_call=500,
            ema_decay=0.999,
            seed=args.seed,
        )
        trainer = nf.Trainer(config, penalties=penalties)
        start = time.perf_counter()
        state, records = trainer.fit(
            trainer.init(model), lambda key: sampler(key, args.batch)
        )
        seconds = time.perf_counter() - start
        models[method] = state.ema
        row = {"train_seconds": seconds}
        # The average of the parameters (EMA, decay 0.999) is the reported model; the
        # last parameters are evaluated too, because averaging the weights of a
        # learned forward process and its predictor separately can break their fit.
        for which, model in (("ema", state.ema), ("online", state.model)):
            row[which] = evaluate(model, held_out, skey, nkey, args)
        if method == "NFDM-OT":
            row["penalty_curvature"] = records[-1]["penalty/curvature"]
        out["methods"][method] = row
        print(f"  {name} {method}: {json.dumps(row)}", flush=True)
    out["figure"] = str(draw(name, models, held_out, args))
    return out


def evaluate(model, held_out, skey, nkey, args) -> dict:
    row = {"w2": {}}
    for nfe in args.nfe:
        solution = nf.sample_ode(
            model, args.eval_size, key=skey, solver="euler", num_steps=nfe
        )
        row["w2"][nfe] = float(nf.wasserstein(solution.samples, held_out))
    fine = nf.sample_ode(
        model, 500, key=skey, solver="euler", num_steps=32, num_saves=33
    )
    row["straightness"] = float(
        nf.path_straightness(fine.trajectories, fine.ts)  # pyright: ignore
    )
    if isinstance(model, nf.NFDM):
        estimate = nf.nelbo_estimate(model, held_out, key=nkey, num_times=64)
        row["nelbo"] = float(estimate.nats)
        row["nelbo_se"] = float(estimate.nats_stderr)
    return row


def draw(name, models, held_out, args) -> Path:
    panels = {}
    for method, model in models.items():
        solution = nf.sample_ode(
            model, 1000, key=jr.key(7), solver="euler", num_steps=2
        )
        panels[f"{method}, 2 Euler steps"] = solution.samples
    path = Path(args.out).with_name(f"few_step_{name}.png")
    plotting.plot_samples_2d(held_out, panels, path, title=f"{name}: samples at NFE 2")
    if {"NFDM", "NFDM-OT"} <= models.keys():
        trajectories = {
            f"{method}: ODE paths (32 Euler steps)": np.asarray(
                nf.sample_ode(
                    models[method],
                    24,
                    key=jr.key(3),
                    solver="euler",
                    num_steps=32,
                    num_saves=33,
                ).trajectories
            )
            for method in ("NFDM", "NFDM-OT")
        }
        figure = Path("examples/figures") / f"nfdm_ot_trajectories_{name}.png"
        plotting.plot_trajectories_2d(
            trajectories, figure, title=f"{name}: curved NFDM, straight NFDM-OT"
        )
    return path


def table(results: dict, nfes, which: str = "ema") -> str:
    lines = [
        f"{'EMA' if which == 'ema' else 'Last-parameter'} models; NELBO of the EMA "
        "model, and of the last parameters in brackets.",
        "",
        "| data | method | "
        + " | ".join(f"W2 NFE={n}" for n in nfes)
        + " | NFE 2 / NFE 32 | straightness | NELBO (nats) | train (s) |",
        "| --- | --- | "
        + " | ".join("---:" for _ in nfes)
        + " | ---: | ---: | ---: | ---: |",
    ]
    for name, result in results.items():
        for method, full in result["methods"].items():
            row = {**full[which], "train_seconds": full["train_seconds"]}
            w2 = row["w2"]
            ratio = w2[2] / w2[32] if 2 in w2 and 32 in w2 else float("nan")
            nelbo = ""
            if "nelbo" in row:
                ema, last = full["ema"], full["online"]
                nelbo = (
                    f"{ema['nelbo']:.3f} ± {ema['nelbo_se']:.3f} "
                    f"(last: {last['nelbo']:.3f} ± {last['nelbo_se']:.3f})"
                )
            lines.append(
                f"| {name} | {method} | "
                + " | ".join(f"{w2[n]:.3f}" for n in nfes)
                + f" | {ratio:.2f} | {row['straightness']:.3f} | {nelbo} | "
                f"{row['train_seconds']:.0f} |"
            )
        lines.append(
            f"| {name} | floor (two data samples) | "
            + " | ".join(f"{result['floor']:.3f}" for _ in nfes)
            + " | | | | |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.report:
        # Tables from a finished run's JSON (its keys are strings).
        saved = json.loads(Path(args.report).read_text())
        for result in saved["results"].values():
            for full in result["methods"].values():
                for which in ("ema", "online"):
                    full[which]["w2"] = {
                        int(k): v for k, v in full[which]["w2"].items()
                    }
        nfes = saved["args"]["nfe"]
        print(
            table(saved["results"], nfes)
            + "\n\n"
            + table(saved["results"], nfes, "online")
        )
        return
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"Unknown methods {sorted(unknown)}; choose from {METHODS}.")
    print(f"JAX devices: {jax.devices()}")
    results = {}
    for name in args.datasets:
        results[name] = run_dataset(name, args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps({"args": vars(args), "results": results}, indent=2)
    )
    print(table(results, args.nfe))


if __name__ == "__main__":
    jnp.zeros(())  # initialise the backend before timing anything
    main()
