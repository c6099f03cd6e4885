"""Resumed against uninterrupted training: the per-chunk losses of the 2D recipe after
resuming from the step-1000 checkpoint, beside those of the run that never stopped.

    python benchmarks/resume_equivalence.py
"""

import pathlib
import tempfile

import jax.random as jr

import nfdm_sciml as nf


def main() -> None:
    folder = pathlib.Path(tempfile.mkdtemp())
    config = nf.TrainConfig(
        steps=2000, batch_size=1024, steps_per_call=250, checkpoint_every=1000
    )

    def sample(key):
        return nf.eight_gaussians(key, 1024)

    full = nf.Trainer(config, run_dir=folder / "full")
    model = nf.build_model("nfdm", 2, key=jr.key(0))
    _, records = full.fit(full.init(model), sample)
    resumed = nf.Trainer(config, run_dir=folder / "resumed")
    # Any model of the same shape serves as the template; its values are replaced.
    like = resumed.init(nf.build_model("nfdm", 2, key=jr.key(1)))
    state = resumed.restore(like, folder / "full/checkpoints/ckpt_00001000.eqx")
    _, tail = resumed.fit(state, sample)
    print("| step | uninterrupted NELBO | resumed NELBO | identical |")
    print("| ---: | ---: | ---: | --- |")
    for a, b in zip(records[4:], tail, strict=True):
        same = a["nelbo"] == b["nelbo"]
        print(f"| {a['step']} | {a['nelbo']!r} | {b['nelbo']!r} | {same} |")


if __name__ == "__main__":
    main()
