"""Training speed of the 2D recipe: nfdm_sciml against a plain PyTorch reference.

Both train the same model (NFDM-Gaussian, predictor and learned volatility, 4x64 SELU
MLPs, batch 1024 drawn fresh each step, Adam 1e-3, the diffusion term as objective),
on the CPU with two threads, in the same run. The PyTorch reference runs in a
subprocess so that its thread settings do not touch JAX. Rounds alternate between
the frameworks and the median is reported, because this machine is shared and noisy.

    python benchmarks/train_speed.py [--steps 1000] [--rounds 3] [--out FILE]

Prints a markdown table and writes the raw numbers as JSON.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.random as jr
import optax

import nfdm_sciml as nf


HERE = Path(__file__).parent


def torch_round(steps: int) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            str(HERE / "torch_reference.py"),
            "--steps",
            str(steps),
            "--warmup",
            "20",
            "--threads",
            "2",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def jax_setup(objective: str):
    model = nf.build_model("nfdm", 2, key=jr.key(0))
    optimiser = optax.adam(1e-3)
    opt_state = optimiser.init(eqx.filter(model, eqx.is_inexact_array))
    return model, opt_state, nf.make_train_step(optimiser, objective=objective)


def sample_batch(key):
    return nf.eight_gaussians(key, 1024)


def jax_step_round(steps: int, objective: str) -> dict:
    """The bare jitted step called from a Python loop, one batch per call."""
    model, opt_state, step = jax_setup(objective)

    @eqx.filter_jit
    def prepare(key):
        # One dispatch per step for the host loop's bookkeeping: eager `jr.split`
        # alone costs more than a millisecond here.
        key, dkey, lkey = jr.split(key, 3)
        return key, sample_batch(dkey), lkey

    key, xs, lkey = prepare(jr.key(1))
    t0 = time.perf_counter()
    model, opt_state, terms = step(model, opt_state, xs, lkey)
    jax.block_until_ready(terms)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        key, xs, lkey = prepare(key)
        model, opt_state, terms = step(model, opt_state, xs, lkey)
    jax.block_until_ready(terms)
    seconds = time.perf_counter() - t0
    return {"it_per_s": steps / seconds, "compile_s": compile_s}


def jax_scan_round(steps: int, objective: str, chunk: int = 500) -> dict:
    """`run_steps`: `chunk` steps per jitted `lax.scan`, data drawn on the device."""
    model, opt_state, step = jax_setup(objective)
    t0 = time.perf_counter()
    model, opt_state, terms = nf.run_steps(
        step, model, opt_state, sample_batch, chunk, key=jr.key(1)
    )
    jax.block_until_ready(terms)
    compile_s = time.perf_counter() - t0
    done, t0 = 0, time.perf_counter()
    while done < steps:
        model, opt_state, terms = nf.run_steps(
            step, model, opt_state, sample_batch, chunk, key=jr.key(10 + done)
        )
        done += chunk
    jax.block_until_ready(terms)
    seconds = time.perf_counter() - t0
    return {"it_per_s": done / seconds, "compile_s": compile_s}


def trainer_round(steps: int, objective: str, chunk: int = 500) -> dict:
    """`Trainer.fit`: the same scan plus EMA, metrics and progress bookkeeping."""
    config = nf.TrainConfig(
        steps=steps + chunk, batch_size=1024, steps_per_call=chunk, objective=objective
    )
    trainer = nf.Trainer(config)
    state = trainer.init(nf.build_model("nfdm", 2, key=jr.key(0)))
    t0 = time.perf_counter()
    state, _ = trainer.fit(state, sample_batch, until=chunk)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    state, records = trainer.fit(state, sample_batch)
    jax.block_until_ready(state.step)
    return {"it_per_s": steps / (time.perf_counter() - t0), "compile_s": compile_s}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(HERE / "results" / "train_speed.json"))
    args = parser.parse_args()

    runs = {
        "torch": [],
        "jax_step_diffusion": [],
        "jax_scan_diffusion": [],
        "jax_scan_nelbo": [],
        "trainer_diffusion": [],
    }
    for _ in range(args.rounds):
        runs["torch"].append(torch_round(args.steps))
        runs["jax_step_diffusion"].append(jax_step_round(args.steps, "diffusion"))
        runs["jax_scan_diffusion"].append(jax_scan_round(args.steps, "diffusion"))
        runs["jax_scan_nelbo"].append(jax_scan_round(args.steps, "nelbo"))
        runs["trainer_diffusion"].append(trainer_round(args.steps, "diffusion"))

    def median(name, field="it_per_s"):
        return statistics.median(r[field] for r in runs[name])

    torch_rate = median("torch")
    rows = [("PyTorch reference (eager, 2 threads)", torch_rate, None)]
    labels = {
        "jax_step_diffusion": "nfdm_sciml bare jitted step, Python loop",
        "jax_scan_diffusion": "nfdm_sciml `run_steps` (lax.scan, 500 steps/call)",
        "jax_scan_nelbo": "nfdm_sciml `run_steps`, full NELBO objective",
        "trainer_diffusion": "nfdm_sciml `Trainer.fit` (EMA, metrics, 500 steps/call)",
    }
    for name, label in labels.items():
        rows.append((label, median(name), median(name, "compile_s")))
    print(f"\nmedian of {args.rounds} alternating rounds of {args.steps} steps\n")
    print("| implementation | it/s | ratio to PyTorch | compile (s) |")
    print("| --- | ---: | ---: | ---: |")
    for label, rate, compile_s in rows:
        c = "" if compile_s is None else f"{compile_s:.1f}"
        print(f"| {label} | {rate:.1f} | {rate / torch_rate:.2f} | {c} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "steps": args.steps,
                "rounds": args.rounds,
                "runs": runs,
                "jax": jax.__version__,
                "devices": [str(d) for d in jax.devices()],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
