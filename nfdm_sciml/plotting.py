"""Matplotlib figures of samples, image grids, trajectories and training curves (PNG
files).

Every function draws on its own `matplotlib.figure.Figure` (not through pyplot), so it
needs no display, leaves the user's backend alone and keeps no figure open.
"""

from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from jaxtyping import Float
from matplotlib.figure import Figure

from ._constraints import AbstractShape


def _save(fig: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def _limits(*arrays, margin: float = 0.1):
    points = np.concatenate([np.asarray(a).reshape(-1, 2) for a in arrays])
    low, high = np.percentile(points, 0.5, 0), np.percentile(points, 99.5, 0)
    pad = margin * (high - low)
    return (low[0] - pad[0], high[0] + pad[0]), (low[1] - pad[1], high[1] + pad[1])


def _draw_shapes(ax, shapes) -> None:
    # Each shape's boundary is the zero level of its signed distance on a grid that
    # covers the axes; the inside is shaded.
    if not shapes:
        return
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    gx, gy = np.meshgrid(np.linspace(x0, x1, 200), np.linspace(y0, y1, 200))
    grid = jnp.asarray(np.stack([gx.ravel(), gy.ravel()], -1))
    for shape in shapes:
        sdf = np.asarray(jax.vmap(shape.signed_distance)(grid)).reshape(gx.shape)
        ax.contourf(gx, gy, sdf, levels=[-np.inf, 0], colors=["0.6"], alpha=0.5)
        ax.contour(gx, gy, sdf, levels=[0], colors=["k"], linewidths=0.8)


def plot_samples_2d(
    data,
    samples: Mapping[str, np.ndarray],
    path,
    *,
    title: str | None = None,
    shapes: Sequence[AbstractShape] = (),
) -> Path:
    """Scatter plots of 2D data beside each named set of samples.

    **Arguments:**

    - `data`: reference points, shape `(n, 2)`.
    - `samples`: name -> points of shape `(m, 2)`, one panel each.
    - `path`: where to write the PNG.
    - `shapes`: obstacles or regions ([`nfdm_sciml.AbstractShape`][]) to draw.
    """
    panels = {
        "data": np.asarray(data),
        **{k: np.asarray(v) for k, v in samples.items()},
    }
    xlim, ylim = _limits(*panels.values())
    fig = Figure(figsize=(3.2 * len(panels), 3.2))
    axes = fig.subplots(1, len(panels))
    for ax, (name, points) in zip(np.atleast_1d(axes), panels.items(), strict=True):
        ax.scatter(points[:, 0], points[:, 1], s=1, alpha=0.4)
        ax.set(title=name, xlim=xlim, ylim=ylim, aspect="equal", xticks=[], yticks=[])
        _draw_shapes(ax, shapes)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_trajectories_2d(
    trajectories: Mapping[str, np.ndarray],
    path,
    *,
    title: str | None = None,
    shapes: Sequence[AbstractShape] = (),
) -> Path:
    """Paths of 2D trajectories, one panel per named set.

    **Arguments:**

    - `trajectories`: name -> array of shape `(n, times, 2)`; each path is drawn from
      its first to its last state, with the last states marked.
    - `path`: where to write the PNG.
    - `shapes`: obstacles or regions ([`nfdm_sciml.AbstractShape`][]) to draw.
    """
    # One frame for every panel, from the percentiles of all points, so that panels
    # compare and a few far excursions do not shrink the rest.
    xlim, ylim = _limits(*trajectories.values())
    fig = Figure(figsize=(3.6 * len(trajectories), 3.6))
    axes = fig.subplots(1, len(trajectories))
    for ax, (name, paths) in zip(
        np.atleast_1d(axes), trajectories.items(), strict=True
    ):
        paths = np.asarray(paths)
        for p in paths:
            ax.plot(p[:, 0], p[:, 1], lw=0.6, alpha=0.6)
        ax.scatter(paths[:, 0, 0], paths[:, 0, 1], s=4, c="k", label="start")
        ax.scatter(paths[:, -1, 0], paths[:, -1, 1], s=4, c="r", label="end")
        ax.set(title=name, xlim=xlim, ylim=ylim, aspect="equal", xticks=[], yticks=[])
        _draw_shapes(ax, shapes)
    np.atleast_1d(axes)[0].legend(loc="lower left", fontsize=7)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_curves(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path,
    *,
    xlabel: str = "step",
    ylabel: str = "loss (nats)",
    smooth: int = 1,
    title: str | None = None,
) -> Path:
    """Line plots of named `(x, y)` curves, optionally smoothed by a running mean."""
    fig = Figure(figsize=(5.5, 3.5))
    ax = fig.subplots()
    for name, (xs, ys) in curves.items():
        xs, ys = np.asarray(xs, float), np.asarray(ys, float)
        if smooth > 1 and ys.size >= smooth:
            kernel = np.ones(smooth) / smooth
            ys = np.convolve(ys, kernel, mode="valid")
            xs = xs[smooth - 1 :]
        ax.plot(xs, ys, label=name, lw=1)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    return _save(fig, path)


def _mosaic(images: np.ndarray, num_columns: int) -> np.ndarray:
    # Tiles (n, channels, height, width) into one (rows, columns, channels) picture
    # with a one-pixel gap of NaN between tiles.
    n, channels, height, width = images.shape
    columns = min(num_columns, n)
    rows = -(-n // columns)
    out = np.full(
        (rows * (height + 1) + 1, columns * (width + 1) + 1, channels), np.nan
    )
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        top, left = 1 + r * (height + 1), 1 + c * (width + 1)
        out[top : top + height, left : left + width] = image.transpose(1, 2, 0)
    return out


def plot_images(
    images: Mapping[str, Float[np.ndarray, "n channels height width"]],
    path,
    *,
    title: str | None = None,
    num_columns: int = 8,
    grey_cmap: str = "gray",
) -> Path:
    """Grids of images, one panel per named set.

    **Arguments:**

    - `images`: name -> images of shape `(n, channels, height, width)` with pixels in
      $[-1, 1]$ (as [`nfdm_sciml.load_images`][] gives them; values outside are
      clipped). One channel is drawn in grey, three in colour; NaN pixels (of
      samples that diverged, say) are left white.
    - `path`: where to write the PNG.
    - `num_columns`: images per row of each grid.
    - `grey_cmap`: the Matplotlib colour map of grey images; `"gray_r"` draws high
      values dark, as ink (the digits count ink per pixel).
    """
    if not images:
        raise ValueError("`plot_images` needs at least one named set of images.")
    panels = {}
    for name, array in images.items():
        array = np.clip(np.asarray(array, float), -1, 1)
        if array.ndim != 4 or array.shape[1] not in (1, 3) or array.shape[0] == 0:
            raise ValueError(
                f"`plot_images` draws images of shape (n, 1 or 3, height, width); "
                f"{name!r} has shape {array.shape}."
            )
        panels[name] = _mosaic(array, num_columns)
    fig = Figure(figsize=(3.2 * len(panels), 3.6), layout="constrained")
    axes = fig.subplots(1, len(panels))
    for ax, (name, mosaic) in zip(np.atleast_1d(axes), panels.items(), strict=True):
        if mosaic.shape[-1] == 1:
            cmap = matplotlib.colormaps[grey_cmap].with_extremes(bad="white")
            ax.imshow(
                mosaic[..., 0], cmap=cmap, vmin=-1, vmax=1, interpolation="nearest"
            )
        else:
            colour = np.where(np.isnan(mosaic), 1.0, (mosaic + 1) / 2)
            ax.imshow(colour, interpolation="nearest")
        ax.set(title=name, xticks=[], yticks=[])
    if title:
        fig.suptitle(title)
    return _save(fig, path)
