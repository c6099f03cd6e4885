"""Train an NFDM on the 8-Gaussians mixture with the authors' 2D recipe.

MLPs of 4 hidden layers of width 64 with SELU, batch 1024 drawn fresh every step,
Adam at 1e-3, a learned volatility; then held-out likelihoods, samples and figures.
Everything lands in one run folder: `config.json`, `metrics.jsonl` (one line per
chunk of steps, then the evaluation), `summary.json`, and PNG figures.

    python examples/eight_gaussians.py                       # a short demo run
    python examples/eight_gaussians.py --steps 30000 --model nfdm --out runs/nfdm
"""

import argparse
import json
import math
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax

import nfdm_sciml as nf
from nfdm_sciml import plotting


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="nfdm", choices=nf.MODEL_KINDS)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--clip",
        type=float,
        default=None,
        help="clip gradients to this global norm (off in the authors' recipe)",
    )
    parser.add_argument("--chunk", type=int, default=500, help="steps per jitted scan")
    parser.add_argument("--eval-size", type=int, default=2000)
    parser.add_argument("--eval-times", type=int, default=128)
    parser.add_argument("--ode-size", type=int, default=500)
    parser.add_argument("--out", default=None, help="run folder (default runs/<model>)")
    args = parser.parse_args(argv)
    for name in ("steps", "batch", "chunk", "eval_size", "eval_times", "ode_size"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer")
    if args.lr <= 0 or (args.clip is not None and args.clip <= 0):
        parser.error("--lr and --clip must be positive")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out or f"runs/{args.model}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(vars(args), indent=2))
    metrics = (out / "metrics.jsonl").open("w")

    mkey, tkey, ekey, skey = jr.split(jr.key(args.seed), 4)
    model = nf.build_model(args.model, 2, key=mkey)
    optimiser = optax.adam(args.lr)
    if args.clip is not None:
        optimiser = optax.chain(optax.clip_by_global_norm(args.clip), optimiser)
    opt_state = optimiser.init(eqx.filter(model, eqx.is_inexact_array))
    step = nf.make_train_step(optimiser)

    def sample_batch(key):
        return nf.eight_gaussians(key, args.batch)

    # Training, in jitted chunks of `--chunk` steps with the data drawn on the device.
    diffusion, done, start, compile_seconds = [], 0, time.perf_counter(), None
    for ckey in jr.split(tkey, math.ceil(args.steps / args.chunk)):
        n = min(args.chunk, args.steps - done)
        t0 = time.perf_counter()
        model, opt_state, terms = nf.run_steps(
            step, model, opt_state, sample_batch, n, key=ckey
        )
        chunk_losses = np.asarray(terms.diffusion)
        elapsed = time.perf_counter() - t0
        if compile_seconds is None:
            compile_seconds = elapsed
        diffusion.extend(chunk_losses.tolist())
        done += n
        record = {
            "step": done,
            "diffusion": float(chunk_losses.mean()),
            "nelbo": float(np.mean(terms.nelbo)),
            "seconds": time.perf_counter() - start,
            "steps_per_second": n / elapsed,
        }
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()
        print(
            f"step {done:6d}  L_diff {record['diffusion']:8.3f}  "
            f"{record['steps_per_second']:6.1f} it/s"
        )
    train_seconds = time.perf_counter() - start

    # Held-out likelihoods: the NELBO (stratified times) and the ODE NLL (exact trace).
    held_out = nf.eight_gaussians(ekey, args.eval_size)
    nelbo = nf.nelbo_estimate(model, held_out, key=ekey, num_times=args.eval_times)
    ode = nf.ode_log_likelihood(model, held_out[: args.ode_size])
    true_nll = -float(nf.eight_gaussians_log_prob(held_out).mean())

    # Samples and trajectories.
    k1, k2, k3 = jr.split(skey, 3)
    sde = nf.sample_sde(model, 4096, key=k1, num_steps=300, num_saves=61)
    ode_samples = nf.sample_ode(
        model, 4096, key=k2, solver="euler", num_steps=300, num_saves=61
    )
    data = nf.eight_gaussians(k3, 4096)
    paths = 16
    ts = jnp.linspace(0.0, 1.0, 61)
    xs, eps = data[:paths], jr.normal(k3, (paths, 2))
    forward_paths = jax.vmap(
        lambda x, e: jax.vmap(lambda t: model.forward(e, t, x))(ts)
    )(xs, eps)
    figures = {
        "samples": plotting.plot_samples_2d(
            data,
            {
                "SDE (300 EM steps)": sde.samples,
                "ODE (300 Euler steps)": ode_samples.samples,
            },
            out / "samples.png",
            title=f"{args.model}: samples at t = 0",
        ),
        "trajectories": plotting.plot_trajectories_2d(
            {
                "forward ODE paths x -> eps": np.asarray(forward_paths),
                "reverse SDE z1 -> x": np.asarray(sde.trajectories)[:paths],
                "reverse ODE z1 -> x": np.asarray(ode_samples.trajectories)[:paths],
            },
            out / "trajectories.png",
            title=f"{args.model}: trajectories",
        ),
        "loss": plotting.plot_curves(
            {"L_diff": (np.arange(1, len(diffusion) + 1), diffusion)},
            out / "loss.png",
            smooth=min(200, len(diffusion)),
            title=f"{args.model}: training loss (running mean)",
        ),
    }

    last = np.asarray(diffusion[-1000:])
    summary = {
        "model": args.model,
        "steps": args.steps,
        "train_seconds": train_seconds,
        "compile_and_first_chunk_seconds": compile_seconds,
        "steps_per_second": args.steps / train_seconds,
        "diffusion_last_1000_mean": float(last.mean()),
        "nelbo_nats": float(nelbo.nats),
        "nelbo_nats_stderr": float(nelbo.nats_stderr),
        "nelbo_terms": {
            k: float(getattr(nelbo.terms, k))
            for k in ("diffusion", "prior", "reconstruction")
        },
        "ode_nll_nats": float(ode.nats),
        "ode_nll_nats_stderr": float(ode.nats_stderr),
        "true_nll_nats": true_nll,
        "sde_samples_mean_log_density": float(
            nf.eight_gaussians_log_prob(sde.samples).mean()
        ),
        "ode_samples_mean_log_density": float(
            nf.eight_gaussians_log_prob(ode_samples.samples).mean()
        ),
        "figures": {k: str(v) for k, v in figures.items()},
    }
    metrics.write(json.dumps({"evaluation": summary}) + "\n")
    metrics.close()
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    s = summary
    print(
        f"\n{args.model}: mean L_diff over the last {last.size} steps {last.mean():.3f}"
        f" nats\nheld-out NELBO {s['nelbo_nats']:.3f} ± {s['nelbo_nats_stderr']:.3f}"
        f" nats, ODE NLL {s['ode_nll_nats']:.3f} ± {s['ode_nll_nats_stderr']:.3f} "
        f"nats (true NLL {true_nll:.3f})\n"
        f"{args.steps} steps in {train_seconds:.1f} s "
        f"({summary['steps_per_second']:.1f} it/s)\nfigures: "
        + ", ".join(summary["figures"].values())
    )
    return summary


if __name__ == "__main__":
    main()
