"""Training speed and peak memory of the image NFDM on CIFAR-10-sized data.

The model is `build_image_model` on 3 x 32 x 32 images with 256 levels: a U-Net
forward process (`ImageNFDMGaussian`, 6 output channels), a U-Net predictor, a learned
volatility and the discretised decoder; both U-Nets have `--width` channels at full
resolution, multipliers 1, 2, 2, 2 (32 down to 4 pixels), two residual blocks per
resolution and attention at 16 x 16 (with `--width 128` this is the DDPM layout for
CIFAR-10). Each step is `make_train_step` on the full NELBO with Adam at 2e-4, float32,
on random images (uniform over the levels: the cost of a step does not depend on the
pixel values), drawn on the device.

Every batch size runs in a fresh subprocess, so that the peak memory reported
(`memory_stats()["peak_bytes_in_use"]` of the first device, "n/a" where the backend
does not report it, as on the CPU) is that batch size's own. The first step
(compilation) is timed apart; the step time is the mean over the next `--steps`.

    python benchmarks/gpu_images.py [--steps 200] [--batch-sizes 32 64 128]
        [--width 64] [--out FILE]
    python benchmarks/gpu_images.py --steps 3 --batch-sizes 2 --width 8  # CPU check

Prints a markdown table and writes the raw numbers as JSON.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


HERE = Path(__file__).parent
DATA_SHAPE = (3, 32, 32)


def child(batch_size: int, args: argparse.Namespace) -> dict:
    """One batch size, in this (fresh) process."""
    # Imported here: the parent must not start a backend (on a GPU it would take most
    # of the memory before the children run).
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import jax.random as jr
    import optax

    import nfdm_sciml as nf
    from nfdm_sciml._images import bits_per_dim
    from nfdm_sciml._unet import build_image_model

    device = jax.devices()[0]
    model = build_image_model(
        DATA_SHAPE,
        num_levels=256,
        width_size=args.width,
        channel_multipliers=(1, 2, 2, 2),
        num_res_blocks=args.res_blocks,
        attention_resolutions=(16,),
        num_groups=args.groups,
        key=jr.key(0),
    )
    params = eqx.filter(model, eqx.is_inexact_array)
    num_params = sum(leaf.size for leaf in jax.tree.leaves(params))
    optimiser = optax.adam(2e-4)
    opt_state = optimiser.init(params)
    step = nf.make_train_step(optimiser)

    @jax.jit
    def prepare(key):
        key, dkey, lkey = jr.split(key, 3)
        levels = jr.randint(dkey, (batch_size, *DATA_SHAPE), 0, 256)
        return key, levels.astype(jnp.float32) / 127.5 - 1, lkey

    key, xs, lkey = prepare(jr.key(1))
    t0 = time.perf_counter()
    model, opt_state, terms = step(model, opt_state, xs, lkey)
    jax.block_until_ready(terms)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        key, xs, lkey = prepare(key)
        model, opt_state, terms = step(model, opt_state, xs, lkey)
    jax.block_until_ready(terms)
    seconds = time.perf_counter() - t0

    assert isinstance(terms, nf.LossTerms)
    stats = device.memory_stats()
    peak = None if not stats else stats.get("peak_bytes_in_use")
    return {
        "batch_size": batch_size,
        "device": f"{device.platform}: {device.device_kind}",
        "jax": jax.__version__,
        "num_params": int(num_params),
        "compile_s": compile_s,
        "step_ms": 1000 * seconds / args.steps,
        "images_per_s": batch_size * args.steps / seconds,
        "peak_bytes": peak,
        "last_nelbo_bits_per_dim": float(bits_per_dim(terms.nelbo, 3072)),
    }


def run_child(batch_size: int, args: argparse.Namespace) -> dict:
    command = [
        sys.executable,
        __file__,
        "--child",
        str(batch_size),
        "--steps",
        str(args.steps),
        "--width",
        str(args.width),
        "--res-blocks",
        str(args.res_blocks),
        "--groups",
        str(args.groups),
    ]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        # Most often out of memory at the largest batch: report it and go on.
        lines = out.stderr.strip().splitlines() or ["(no output)"]
        return {"batch_size": batch_size, "error": lines[-1][:300]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Training speed and peak memory of the image NFDM."
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--res-blocks", type=int, default=2)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--out", default=str(HERE / "results" / "gpu_images.json"))
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 1 or min(args.batch_sizes) < 1:
        parser.error("--steps and every batch size must be positive.")
    if args.child is not None:
        print(json.dumps(child(args.child, args)))
        return

    rows = []
    for batch_size in args.batch_sizes:
        row = run_child(batch_size, args)
        rows.append(row)
        if len(rows) == 1 and "device" in row:
            print(f"device: {row['device']} (jax {row['jax']})")
            print(f"parameters: {row['num_params']:,} (two U-Nets and the volatility)")
            print(
                f"{args.steps} steps per batch size, width {args.width}, "
                f"{args.res_blocks} residual blocks per resolution\n"
            )
            print("| batch | step (ms) | images/s | compile (s) | peak memory |")
            print("| ---: | ---: | ---: | ---: | ---: |")
        if "error" in row:
            print(f"| {batch_size} | failed: {row['error']} | | | |")
            continue
        peak = row["peak_bytes"]
        memory = "n/a" if peak is None else f"{peak / 2**30:.2f} GiB"
        print(
            f"| {batch_size} | {row['step_ms']:.1f} | {row['images_per_s']:.0f} | "
            f"{row['compile_s']:.1f} | {memory} |",
            flush=True,
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps({"steps": args.steps, "width": args.width, "runs": rows}, indent=2)
    )


if __name__ == "__main__":
    main()
