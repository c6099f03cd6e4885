"""Cost of one training step of a latent SDE: SDE Matching against the classical
latent SDE trained through a Diffrax solve, in the same run.

    python benchmarks/latent_sde_cost.py
    python benchmarks/latent_sde_cost.py --times 11 41 161 --batch 256 --repeats 20

Two sweeps on stochastic-Lorenz series over [0, 1] (3 channels, latent 4, width
100, batch 256, the settings of examples/latent_sde.py):

1. the number of observation times (11, 41, 161), the solver taking one
   Euler–Maruyama step per observation interval (the fewest that reach every
   observation) and four;
2. 41 observation times, the solver at 40, 160 and 640 steps.

SDE Matching is timed twice: reconstructing every observation at every step (the
exact bound, as examples/latent_sde.py trains) and one observation per series
(`reconstruction_points=1`, the notebook's unbiased estimate). No solver runs in
either, so neither depends on the solver's step count; what grows with the number
of observations is the encoder (a GRU over the rows) and, in the first, the
reconstruction of every row.

Each entry is the median wall time of `--repeats` jitted steps (value, gradient and
Adam update) after a warm-up call; the ratio to SDE Matching at the same data is the
figure to read, since the machines are shared.
"""

import argparse
import time

import equinox as eqx
import jax
import jax.random as jr
import numpy as np
import optax

import nfdm_sciml as nf


def step_time(model, series, repeats):
    optimiser = optax.adam(1e-3)
    step = nf.make_train_step(optimiser)
    state = optimiser.init(eqx.filter(model, eqx.is_inexact_array))
    key = jr.key(0)
    model, state, terms = step(model, state, series, key)  # compile
    jax.block_until_ready(terms)
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        model, state, terms = step(model, state, series, jr.fold_in(key, i))
        jax.block_until_ready(terms)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main(argv=None):
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--times", nargs="+", type=int, default=[11, 41, 161])
    parser.add_argument("--solver-steps", nargs="+", type=int, default=[40, 160, 640])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--width", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)

    kw = dict(hidden_size=args.width, observation_scale=0.01, key=jr.key(1))

    def matching(series):
        every = step_time(nf.LatentSDE(3, 4, **kw), series, args.repeats)
        one = nf.LatentSDE(3, 4, reconstruction_points=1, **kw)
        return every, step_time(one, series, args.repeats)

    def solver(series, num_steps):
        model = nf.SolverLatentSDE(3, 4, num_steps=num_steps, **kw)
        return step_time(model, series, args.repeats)

    def row(num_times, num_steps, sm, sm1, sv):
        print(
            f"| {num_times} | {num_steps} | {sm:.4f} | {sm1:.4f} | {sv:.4f} | "
            f"{sv / sm:.1f}x | {sv / sm1:.1f}x |",
            flush=True,
        )

    print(f"device: {jax.devices()[0].device_kind}, batch {args.batch}")
    print(
        "| observation times | solver steps | SDE Matching s/step | SDE Matching, "
        "1 point s/step | solver s/step | solver / SDE Matching | solver / SDE "
        "Matching, 1 point |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for num_times in args.times:
        series = nf.stochastic_lorenz(
            args.batch,
            num_times=num_times,
            inner_steps=max(1, 4000 // (num_times - 1)),
            key=jr.key(2),
        )
        sm, sm1 = matching(series)
        for factor in (1, 4):
            num_steps = factor * (num_times - 1)
            row(num_times, num_steps, sm, sm1, solver(series, num_steps))
    series = nf.stochastic_lorenz(args.batch, num_times=41, key=jr.key(2))
    sm, sm1 = matching(series)
    for num_steps in args.solver_steps:
        row(41, num_steps, sm, sm1, solver(series, num_steps))


if __name__ == "__main__":
    jax.config.update("jax_numpy_dtype_promotion", "standard")
    main()
