"""NFDM, VDM and FM-OT on the 8 x 8 digits as images: held-out bits per dimension with
the same U-Net predictor and the same number of steps.

The three models differ only in their forward process and volatility
(`build_image_model(kind=...)`): NFDM learns both (its forward process is a second
U-Net of the same size, so it has about twice the parameters), VDM is the fixed
variance-preserving SDE, FM-OT the fixed linear interpolant with a learned volatility.
Each is trained on the NELBO with the discretised decoder of the digits' 17 levels, so
the bound is one on the discrete likelihood: a uniform model has log2(17) = 4.09
bits/dim. The digits have no official split: a fixed random 20 % (359 images, numpy
seed 0, the same for every --seed) is held out and never trained on. For each model
the script reports the held-out NELBO in bits/dim (mean and standard error over the
359 images, 128 stratified times each), the training time, and 64 samples of the
reverse SDE (300 Euler-Maruyama steps), decoded to the levels.

    python examples/digits_bpd.py                      # the comparison (see below)
    python examples/digits_bpd.py --kinds nfdm         # one model; rows accumulate
    python examples/digits_bpd.py --steps 4 --width 8 \\
        --results /tmp/digits_bpd.json --figure /tmp/digits_bpd.png   # a smoke test

At the defaults (U-Net width 16, batch 32, 6000 steps, noise floor 0.035), on two CPU
cores with nothing else running, a step took 0.36 s for NFDM and 0.06 s for VDM and
FM-OT, so about 36 and 6 minutes of training each, plus compilation and 0.5 to 3
minutes of scoring per model. (On a busier machine batch 64 was five times slower per
step than batch 32, not two: on such a CPU keep the batch small and raise the steps.)
The table at the end also gives the paired difference of each baseline to NFDM, image
by image: every kind is scored on the same images with the same times and noise, so
the paired standard error is much smaller than the standard errors of the means.

Rows go to examples/results/digits_bpd.json (a row of the same kind, steps, width,
batch, seed, learning rate and noise floor is replaced, others are kept, so the kinds
can be run one at a time); the figure, examples/figures/digits_bpd_samples.png, shows
the held-out digits and the samples of every row of the current settings.

The same runs through the command line, one run folder each (with checkpoints, which
this script does not write; at the default settings they train exactly the same
models, and the same held-out bits/dim lands in each run's summary.json):

    nfdm train --config examples/configs/digits_nfdm.toml
    nfdm train --config examples/configs/digits_vdm.toml
    nfdm train --config examples/configs/digits_fmot.toml

(append `--steps N --set model.width_size=W --set train.batch_size=B --seed S` for
other settings; the warm-up is then 100 steps, while this script shortens it for runs
under 1000 steps.)
"""

import argparse
import json
import math
import time
from pathlib import Path
from typing import cast

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import nfdm_sciml as nf
from nfdm_sciml import plotting


HERE = Path(__file__).parent
KINDS = ("nfdm", "vdm", "fmot")
NAMES = {"nfdm": "NFDM", "vdm": "VDM", "fmot": "FM-OT"}
# The U-Net of every model (as in examples/configs/digits_*.toml), at --width channels:
# resolutions 8 and 4, one residual block each, no attention.
MULTIPLIERS, RES_BLOCKS, GROUPS = (1, 2), 1, 8
# The noise floor at t = 0 and the decoder's scale, the same for every kind. A floor
# well below the levels' half spacing (1/16) spends the bound on noise levels where the
# network would have to resolve each pixel's bin, which it does not learn at these
# budgets; a floor near the half spacing makes the reconstruction term large. 0.035
# (z_0 leaves the bin of x for 4 to 7 % of the pixels) was chosen from a short sweep
# with VDM and NFDM; see the README's image results.
DELTA = 0.035
CHUNK = 100  # steps per jitted scan (as train.steps_per_call)
EVAL_TIMES, SDE_STEPS, NUM_SAMPLES = 128, 300, 64
IMAGE_SHAPE = (1, 8, 8)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--width", type=int, default=16, help="U-Net channels")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--lr", type=float, default=5e-4, help="peak learning rate")
    parser.add_argument(
        "--delta",
        type=float,
        default=DELTA,
        help=f"noise floor at t = 0 and decoder scale (default {DELTA})",
    )
    parser.add_argument(
        "--eval-times",
        type=int,
        default=EVAL_TIMES,
        help=f"stratified times per held-out image in the bound (default {EVAL_TIMES})",
    )
    parser.add_argument("--results", default=str(HERE / "results" / "digits_bpd.json"))
    parser.add_argument(
        "--figure", default=str(HERE / "figures" / "digits_bpd_samples.png")
    )
    args = parser.parse_args(argv)
    for name in ("steps", "width", "batch", "eval_times"):
        if getattr(args, name) <= 0:
            flag = name.replace("_", "-")
            parser.error(f"--{flag} must be a positive integer")
    if args.width % GROUPS:
        parser.error(f"--width must be a multiple of {GROUPS} (the norm groups)")
    if not 0 < args.delta < 1 / 16:
        parser.error(
            "--delta must lie in (0, 1/16), below half the digits' level spacing"
        )
    if args.seed < 0 or args.lr <= 0:
        parser.error("--seed must be >= 0 and --lr positive")
    return args


def train_config(args) -> nf.TrainConfig:
    # The [train] section of examples/configs/digits_*.toml.
    return nf.TrainConfig(
        steps=args.steps,
        batch_size=args.batch,
        learning_rate=args.lr,
        warmup_steps=min(100, args.steps // 10),
        schedule="cosine",
        clip_norm=1.0,
        ema_decay=0.999,
        steps_per_call=min(CHUNK, args.steps),
        seed=args.seed,
    )


def run(kind: str, train, held_out, args) -> dict:
    """Trains one kind and scores it, drawing every key as `nfdm train` does, so that
    its summary.json for the same settings holds the same numbers."""
    model = nf.build_image_model(
        train.data_shape,
        kind=kind,
        num_levels=train.num_levels,
        width_size=args.width,
        channel_multipliers=MULTIPLIERS,
        num_res_blocks=RES_BLOCKS,
        num_groups=GROUPS,
        delta=args.delta,
        key=jr.key(args.seed),
    )
    num_params = sum(
        leaf.size for leaf in jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))
    )
    images = jnp.asarray(train.images)

    def sample_batch(key):
        return images[jr.randint(key, (args.batch,), 0, images.shape[0])]

    config = train_config(args)
    trainer = nf.Trainer(config, progress=nf.default_progress())
    t0 = time.perf_counter()
    state, records = trainer.fit(trainer.init(model), sample_batch)
    train_seconds = time.perf_counter() - t0
    model = cast(nf.NFDM, state.ema if state.ema is not None else state.model)

    eval_key, sample_key, _ = jr.split(jr.fold_in(jr.key(args.seed), 2), 3)
    nelbo_key, _ = jr.split(eval_key)
    t0 = time.perf_counter()
    nelbo = nf.nelbo_estimate(
        model, jnp.asarray(held_out.images), key=nelbo_key, num_times=args.eval_times
    )
    eval_seconds = time.perf_counter() - t0
    solution = nf.sample_sde(model, NUM_SAMPLES, key=sample_key, num_steps=SDE_STEPS)
    samples = np.asarray(jax.vmap(model.decoder.sample)(solution.samples))
    # Stored as the integer levels 0..16, compact in the JSON rows; a sample that
    # diverged (an undertrained model can send some to infinity) as -1 throughout.
    levels = np.rint((samples + 1) * (train.num_levels - 1) / 2)
    finite = np.isfinite(np.asarray(solution.samples)).reshape(NUM_SAMPLES, -1)
    finite = finite.all(axis=1)
    levels[~finite] = -1
    # The first chunk includes compilation; the later ones time the steps alone.
    later = [r["steps_per_second"] for r in records[1:]]
    terms = nelbo.terms
    assert terms is not None  # the NELBO always reports its terms
    return {
        "kind": kind,
        "steps": args.steps,
        "width": args.width,
        "batch": args.batch,
        "seed": args.seed,
        "learning_rate": args.lr,
        "delta": args.delta,
        "eval_times": args.eval_times,
        "unet": {
            "channel_multipliers": list(MULTIPLIERS),
            "num_res_blocks": RES_BLOCKS,
            "num_groups": GROUPS,
        },
        "num_params": int(num_params),
        "held_out_images": int(held_out.images.shape[0]),
        "bits_per_dim": float(nelbo.bits_per_dim),
        "bits_per_dim_stderr": float(nelbo.bits_per_dim_stderr),
        "nats": float(nelbo.nats),
        "nats_stderr": float(nelbo.nats_stderr),
        # Per held-out image, for paired comparisons: every kind is scored on the
        # same images with the same times and noise (the key depends on the seed only).
        "nats_per_image": np.round(np.asarray(nelbo.per_example), 4).tolist(),
        "terms_nats": {
            name: float(getattr(terms, name))
            for name in ("diffusion", "prior", "reconstruction")
        },
        "final_train_nelbo": records[-1].get("nelbo"),
        "train_seconds": train_seconds,
        "seconds_per_step": 1 / float(np.mean(later)) if later else None,
        "eval_seconds": eval_seconds,
        "non_finite_samples": int(np.sum(~finite)),
        "sample_levels": levels.astype(int).reshape(NUM_SAMPLES, -1).tolist(),
    }


def same_settings(row: dict, args) -> bool:
    """Whether a stored row trained the model these arguments would train."""
    keys = ("steps", "width", "batch", "seed", "delta")
    same = all(row.get(k) == getattr(args, k) for k in keys)
    return same and row.get("learning_rate") == args.lr


def paired_difference(row: dict, reference: dict) -> tuple[float, float]:
    """The mean and standard error of `row` minus `reference`, image by image, in
    bits/dim (NaN for rows written before the per-image values were stored)."""
    a, b = row.get("nats_per_image"), reference.get("nats_per_image")
    if a is None or b is None or len(a) != len(b):
        return math.nan, math.nan
    diff = (np.asarray(a) - np.asarray(b)) / (np.prod(IMAGE_SHAPE) * math.log(2))
    return float(diff.mean()), float(diff.std(ddof=1) / math.sqrt(diff.size))


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    digits = nf.load_digits_images()
    # The split of `nfdm train` for the digits: a fixed 20 %, whatever the seed.
    train, held_out = digits.split(0.2, seed=0)

    results = Path(args.results)
    rows = json.loads(results.read_text())["rows"] if results.is_file() else []
    for kind in args.kinds:
        row = run(kind, train, held_out, args)
        rows = [
            r for r in rows if not (r["kind"] == kind and same_settings(r, args))
        ] + [row]
        # Saved after every model, so that a long comparison keeps what it finished.
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text(json.dumps({"rows": rows}, indent=1))
        print(
            f"{NAMES[kind]:6s} {row['bits_per_dim']:.4f} ± "
            f"{row['bits_per_dim_stderr']:.4f} bits/dim  "
            f"({row['num_params']} parameters, {row['train_seconds']:.0f} s training)"
        )

    current = {r["kind"]: r for r in rows if same_settings(r, args)}
    count = held_out.images.shape[0]
    panels = {f"held-out digits (64 of {count})": held_out.images[:64]}
    for kind in KINDS:
        if kind in current:
            r = current[kind]
            levels = np.asarray(r["sample_levels"], float).reshape(-1, *IMAGE_SHAPE)
            levels[levels < 0] = np.nan  # diverged samples are left blank
            label = f"{NAMES[kind]}: {r['bits_per_dim']:.3f} bits/dim"
            if r.get("non_finite_samples"):
                label += f"\n({r['non_finite_samples']} non-finite, blank)"
            panels[label] = levels * 2 / (digits.num_levels - 1) - 1
    figure = plotting.plot_images(
        panels,
        args.figure,
        title=f"Digits, {args.steps} steps of batch {args.batch}, U-Net width "
        f"{args.width}: SDE samples ({SDE_STEPS} Euler-Maruyama steps)",
        grey_cmap="gray_r",
    )
    print(f"\n{'':6s}  {'held-out bits/dim':>24s}  {'params':>9s}  train s  s/step")
    for kind in KINDS:
        if kind in current:
            r = current[kind]
            per_step = r["seconds_per_step"]
            bits = f"{r['bits_per_dim']:.4f} ± {r['bits_per_dim_stderr']:.4f}"
            print(
                f"{NAMES[kind]:6s}  {bits:>24s}  {r['num_params']:9d}  "
                f"{r['train_seconds']:7.0f}  "
                + ("n/a" if per_step is None else f"{per_step:.3f}")
            )
    if "nfdm" in current:
        print("\npaired difference to NFDM on the same held-out images (bits/dim):")
        for kind in KINDS[1:]:
            if kind in current:
                mean, stderr = paired_difference(current[kind], current["nfdm"])
                print(f"  {NAMES[kind]} - NFDM: {mean:+.4f} ± {stderr:.4f}")
    print(f"rows: {results}\nfigure: {figure}")
    return list(current.values())


if __name__ == "__main__":
    main()
