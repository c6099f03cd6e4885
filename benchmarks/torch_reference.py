r"""PyTorch reference for the NFDM 2D training recipe, used only as a speed baseline.

This is the plain-PyTorch version of one training step of NFDM-Gaussian on the
8-Gaussian toy data (digest sections 1.4, 1.5, 1.10 and 3.1): three 4x64 SELU MLPs
(flow, predictor, volatility), one JVP in $t$ at the data $x$ and one at
the prediction $\hat{x}$, and Adam at lr 1e-3. It is written the way a competent
PyTorch user would write it, so that the benchmark compares like with like; it is not
part of the `nfdm_sciml` library and nothing there imports it.

Run as

```
python benchmarks/torch_reference.py --steps N --warmup W --threads T --seed S
```

which prints one JSON line on stdout, or import `run` from a harness.
"""

import argparse
import json
import math
import sys
import time

import torch
from torch import nn


DIM = 2
WIDTH = 64
BATCH = 1024
DELTA = 0.01  # sigma at t = 0, as in the notebook
LR = 1e-3
Pair = tuple[torch.Tensor, torch.Tensor]


def mlp(n_in: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(n_in, WIDTH),
        nn.SELU(),
        nn.Linear(WIDTH, WIDTH),
        nn.SELU(),
        nn.Linear(WIDTH, WIDTH),
        nn.SELU(),
        nn.Linear(WIDTH, WIDTH),
        nn.SELU(),
        nn.Linear(WIDTH, n_out),
    )


class NFDM(nn.Module):
    def __init__(self, true_forward_mode: bool = False) -> None:
        super().__init__()
        # Two ways to get the JVP in t, both differentiable end to end; see
        # flow_and_time_derivative for which one is used when.
        self.true_forward_mode = true_forward_mode
        self.flow_net = mlp(DIM + 1, 2 * DIM)
        self.predictor_net = mlp(DIM + 1, DIM)
        self.volatility_net = mlp(1, 1)

    def flow(self, x: torch.Tensor, t: torch.Tensor) -> Pair:
        # The schedule pins mu = x, sigma = delta at t = 0 and mu = 0, sigma = 1 at
        # t = 1 whatever the network says, so the prior term of the NELBO vanishes.
        mbar, lbar = self.flow_net(torch.cat([x, t], dim=-1)).chunk(2, dim=-1)
        mu = (1 - t) * x + t * (1 - t) * mbar
        sigma = torch.exp((1 - t) * math.log(DELTA) + t * (1 - t) * lbar)
        return mu, sigma

    def predictor(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (1 - t) * z + (t + DELTA) * self.predictor_net(torch.cat([z, t], dim=-1))

    def volatility(self, t: torch.Tensor) -> torch.Tensor:
        return nn.functional.softplus(self.volatility_net(t))

    def flow_and_time_derivative(
        self, x: torch.Tensor, t: torch.Tensor
    ) -> tuple[Pair, Pair]:
        # Eager default: autograd.functional.jvp emulates forward mode with a double
        # backward, and on this 2-core CPU that measured ~20% faster per training
        # step than true forward mode (torch.func.jvp or forward_ad dual tensors),
        # whose per-op overhead dominates at width 64. AOTAutograd cannot compile a
        # double backward, though, so under torch.compile we use torch.func.jvp,
        # which closes over the parameters and leaves them ordinary autograd leaves
        # (reverse-over-forward). All three give the same gradients to 1e-7.
        def flow_at(tt: torch.Tensor) -> Pair:
            return self.flow(x, tt)

        ones = torch.ones_like(t)
        if self.true_forward_mode:
            out = torch.func.jvp(flow_at, (t,), (ones,))
        else:
            out = torch.autograd.functional.jvp(flow_at, t, ones, create_graph=True)
        return out[0], out[1]

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor
    ) -> torch.Tensor:
        """Single-batch diffusion loss $L_{diff}$ in nats, summed over dimensions."""
        (mu, sigma), (dmu, dsigma) = self.flow_and_time_derivative(x, t)
        z = mu + sigma * eps
        f_x = dmu + dsigma * eps
        score_x = -eps / sigma
        x_hat = self.predictor(z, t)
        (mu_h, sigma_h), (dmu_h, dsigma_h) = self.flow_and_time_derivative(x_hat, t)
        f_h = dmu_h + dsigma_h * (z - mu_h) / sigma_h
        score_h = (mu_h - z) / sigma_h**2
        g2 = self.volatility(t) ** 2
        diff = (f_x - 0.5 * g2 * score_x) - (f_h - 0.5 * g2 * score_h)
        return (0.5 * diff**2 / g2).sum(dim=-1).mean()


def eight_gaussians(batch: int, generator: torch.Generator) -> torch.Tensor:
    angles = torch.arange(8) * (math.pi / 4)
    centres = 4.0 * torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)
    which = torch.randint(0, 8, (batch,), generator=generator)
    x = centres[which] + 0.5 * torch.randn(batch, DIM, generator=generator)
    return x / math.sqrt(2)


def run(
    steps: int, warmup: int = 20, threads: int = 2, seed: int = 0, compile: bool = False
) -> dict:
    """Train for `warmup` untimed then `steps` timed steps; return the benchmark record.

    With `compile=True` the loss is wrapped in `torch.compile`; if that fails on this
    machine the run falls back to eager mode and says so in the record under
    `compile_error`, so a benchmark never mistakes eager numbers for compiled ones.
    `final_loss` and `mean_loss_last_100` are taken over the timed steps only (all of
    them if there are fewer than 100). Note that `torch.set_num_threads(threads)` is
    process-wide and stays in force after this returns.
    """
    if steps < 1 or warmup < 0 or threads < 1:
        raise ValueError(
            f"Expected steps >= 1, warmup >= 0 and threads >= 1; got steps={steps}, "
            f"warmup={warmup}, threads={threads}."
        )
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = NFDM(true_forward_mode=compile)
    optimiser = torch.optim.Adam(model.parameters(), lr=LR)
    loss_fn = torch.compile(model) if compile else model
    compile_error = None

    def step() -> torch.Tensor:
        x = eight_gaussians(BATCH, generator)
        t = torch.rand(BATCH, 1, generator=generator)
        eps = torch.randn(BATCH, DIM, generator=generator)
        loss = loss_fn(x, t, eps)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        return loss.detach()

    if compile:
        # torch.compile is lazy, so failures (no C++ compiler, an unsupported op)
        # surface on the first forward or backward, before optimiser.step touches
        # the parameters. This step also keeps compilation out of the timed loop.
        # On failure the data stream is rewound, so the eager fallback trains on the
        # same batches as a plain eager run with the same seed.
        data_state = generator.get_state()
        try:
            step()
            warmup = max(warmup - 1, 0)
        except Exception as e:
            compile_error = f"{type(e).__name__}: {e}".splitlines()[0]
            generator.set_state(data_state)
            model.true_forward_mode = False
            loss_fn = model
            print(
                f"torch.compile failed, running eager instead: {compile_error}",
                file=sys.stderr,
            )
    for _ in range(warmup):
        step()
    timed_losses = []
    start = time.perf_counter()
    for _ in range(steps):
        timed_losses.append(step())
    seconds = time.perf_counter() - start
    losses = torch.stack(timed_losses)
    record = {
        "framework": "torch",
        "torch_version": torch.__version__,
        "threads": threads,
        "steps": steps,
        "seconds": seconds,
        "it_per_s": steps / seconds,
        "final_loss": losses[-1].item(),
        "mean_loss_last_100": losses[-100:].mean().item(),
        "compiled": compile and compile_error is None,
    }
    if compile_error is not None:
        record["compile_error"] = compile_error
    return record


def main() -> None:
    parser = argparse.ArgumentParser(
        description="PyTorch speed baseline for NFDM 2D training."
    )
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true", help="use torch.compile")
    args = parser.parse_args()
    record = run(args.steps, args.warmup, args.threads, args.seed, args.compile)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
