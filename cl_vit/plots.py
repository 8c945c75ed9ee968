"""Figures of runs: the run directory's PNGs, the TensorBoard images and the notebooks all draw with these.

Figures are plain ``matplotlib.figure.Figure`` objects, not pyplot ones: they need no GUI backend, are safe to make
in a training process, are garbage-collected like any object, and display in a notebook as a cell's value.
"""
from __future__ import annotations

import io
import math
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from cl_vit.errors import UserError

FORGETTING_KEYS = ("forgetting_max", "forgetting_first_last", "forgetting_consecutive")
FORGETTING_LABELS = {"forgetting_max": "max-based", "forgetting_first_last": "first-minus-last",
                     "forgetting_consecutive": "consecutive-drop"}
SHOT_COLORS = {"many": "tab:blue", "medium": "tab:orange", "few": "tab:red"}


def _axes(ax, figsize) -> tuple[Figure, object]:
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=figsize, dpi=100)
    return fig, fig.add_subplot()


def _nanmean(a, axis=0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # columns without any value stay nan
        return np.nanmean(a, axis)


def _nanstd(a, axis=0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanstd(a, axis, ddof=1)


def save_png(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Write ``fig`` as a PNG file atomically (a run killed while writing never leaves half an image)."""
    from cl_vit.rundir import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


# -- the stream ----------------------------------------------------------------------------------------------------


def accuracy_matrix_figure(R: np.ndarray, title: str = "", ax=None) -> Figure:
    """Annotated heatmap of the accuracy matrix in % (rows: trained up to, columns: evaluated experience)."""
    R = np.asarray(R, dtype=float)
    n_rows, n_cols = R.shape
    fig, ax = _axes(ax, (1.4 + 0.55 * n_cols, 0.9 + 0.5 * max(n_rows, 1)))
    im = ax.imshow(np.ma.masked_invalid(R * 100), vmin=0, vmax=100, cmap="viridis")
    if n_rows * n_cols <= 400:
        for i in range(n_rows):
            for j in range(n_cols):
                if not np.isnan(R[i, j]):
                    ax.text(j, i, f"{100 * R[i, j]:.0f}", ha="center", va="center", fontsize=7,
                            color="white" if R[i, j] < 0.6 else "black")
    ax.set_xlabel("evaluated experience")
    ax.set_ylabel("trained up to")
    ax.set_xticks(range(n_cols), [str(j + 1) for j in range(n_cols)])
    ax.set_yticks(range(n_rows), [str(i + 1) for i in range(n_rows)])
    if title:
        ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="accuracy (%)")
    fig.tight_layout()
    return fig


def accuracy_matrices_figure(matrices: Mapping[str, np.ndarray], ncols: int = 3) -> Figure:
    """Several accuracy matrices side by side (one panel per label)."""
    n = max(1, len(matrices))
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    side = max((np.asarray(R).shape[1] for R in matrices.values()), default=1)
    fig = Figure(figsize=(ncols * (2.6 + 0.5 * side), nrows * (1.6 + 0.45 * side)), dpi=100)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (label, R) in zip(axes, matrices.items()):
        accuracy_matrix_figure(R, title=label, ax=ax)
    for ax in axes[len(matrices):]:
        ax.set_axis_off()
    fig.tight_layout()
    return fig


def average_accuracy_figure(curves: Mapping[str, np.ndarray], title: str = "", ax=None) -> Figure:
    """``A_t`` after each experience, in %. ``curves``: label -> ``A_t`` of one run ([T]) or of several seeds
    ([runs, T], drawn as the mean with a band of one standard deviation)."""
    fig, ax = _axes(ax, (5.0, 3.2))
    n_max = 1
    for label, a in curves.items():
        a = np.atleast_2d(np.asarray(a, dtype=float)) * 100
        x = np.arange(1, a.shape[1] + 1)
        n_max = max(n_max, a.shape[1])
        mean = _nanmean(a)
        ok = ~np.isnan(mean)
        (line,) = ax.plot(x[ok], mean[ok], marker="o", ms=3, label=label)
        if a.shape[0] > 1:
            std = np.nan_to_num(_nanstd(a))
            ax.fill_between(x[ok], (mean - std)[ok], (mean + std)[ok], alpha=0.2, color=line.get_color(), lw=0)
    ax.set_xlabel("trained up to experience")
    ax.set_ylabel("A_t (%)")
    ax.set_ylim(0, 100)
    ax.set_xticks(range(1, n_max + 1))
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend(fontsize=7)
    ax.set_title(title or "average accuracy over the seen experiences", fontsize=9)
    fig.tight_layout()
    return fig


def forgetting_figure(values: Mapping[str, Mapping[str, Sequence[float]]], title: str = "", ax=None) -> Figure:
    """Bars of the three forgettings (%), one bar per label; ``values``: label -> {metric key -> values over
    seeds} (error bar: standard deviation over seeds)."""
    fig, ax = _axes(ax, (1.5 + 1.2 * len(FORGETTING_KEYS) * max(1, len(values)) ** 0.5, 3.2))
    width = 0.8 / max(1, len(values))
    x = np.arange(len(FORGETTING_KEYS))
    for k, (label, per_key) in enumerate(values.items()):
        v = [np.asarray(per_key.get(key, []), dtype=float) * 100 for key in FORGETTING_KEYS]
        mean = [_nanmean(a) if a.size else np.nan for a in v]
        err = [_nanstd(a) if np.sum(~np.isnan(a)) > 1 else 0.0 for a in v]
        ax.bar(x + (k - (len(values) - 1) / 2) * width, mean, width, yerr=err, capsize=2, label=label)
    ax.set_xticks(x, [FORGETTING_LABELS[k] for k in FORGETTING_KEYS])
    ax.set_ylabel("forgetting (%)")
    ax.axhline(0, color="black", lw=0.5)
    ax.grid(axis="y", alpha=0.3)
    if len(values) > 1:
        ax.legend(fontsize=7)
    ax.set_title(title or "forgetting (lower is better)", fontsize=9)
    fig.tight_layout()
    return fig


def strategy_table_figure(rows: Sequence[Mapping], baseline: Sequence[float], title: str = "") -> Figure:
    """Every strategy's A_N (%) as a horizontal bar (mean over seeds, error bar: sample std) with its seeds as dots,
    the baseline's (fine-tuning's) mean and spread as a band; ``rows``: {"strategy", "A_N": values in [0, 1]}."""
    rows = [r for r in rows if r["A_N"]]
    fig, ax = _axes(None, (6.0, 0.9 + 0.28 * max(1, len(rows))))
    y = np.arange(len(rows))[::-1]
    values = [100 * np.asarray(r["A_N"], dtype=float) for r in rows]
    ax.barh(y, [v.mean() for v in values], xerr=[v.std(ddof=1) if v.size > 1 else 0.0 for v in values],
            color="tab:blue", alpha=0.6, capsize=2)
    for yi, v in zip(y, values):
        ax.plot(v, np.full(v.size, yi), "k.", ms=3)
    if len(baseline):
        b = 100 * np.asarray(baseline, dtype=float)
        ax.axvspan(b.min(), b.max(), color="tab:red", alpha=0.15, lw=0)
        ax.axvline(b.mean(), color="tab:red", lw=1, label=f"fine-tuning {b.mean():.1f}")
        ax.legend(fontsize=7, loc="lower right")
    ax.set_yticks(y, [r["strategy"] for r in rows], fontsize=8)
    ax.set_xlabel("A_N (%)")
    ax.set_xlim(0, 100)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title or "every strategy on the stream (bars: mean ± std, dots: seeds)", fontsize=9)
    fig.tight_layout()
    return fig


# -- the long tail -------------------------------------------------------------------------------------------------


def _count_axis(ax, counts: np.ndarray) -> None:
    """Training-set sizes spanning a decade or more on a log axis, labelled with plain numbers."""
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    if counts.size and counts.min() > 0 and counts.max() / counts.min() >= 5:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("training images of the class")


def per_class_accuracy_figure(counts: Sequence[int], accuracy: Mapping[str, np.ndarray],
                              groups: Sequence[str] | None = None, title: str = "", ax=None) -> Figure:
    """Accuracy of every class (%) against its number of training images, one marker per head; the shot groups
    are shaded over the range of training-set sizes they cover and each group's mean accuracy is drawn."""
    counts = np.asarray(counts, dtype=float)
    fig, ax = _axes(ax, (6.0, 3.4))
    if groups is not None:
        groups = np.asarray(groups)
        for g, color in SHOT_COLORS.items():
            sel = groups == g
            if sel.any():
                lo, hi = counts[sel].min(), counts[sel].max()
                ax.axvspan(lo * 0.97, hi * 1.03, color=color, alpha=0.08, lw=0)
                ax.text(math.sqrt(lo * hi), 101, f"{g} ({int(sel.sum())})", ha="center", va="bottom", fontsize=7,
                        color=color)
    markers = "os^Dv"
    for k, (head, acc) in enumerate(accuracy.items()):
        acc = np.asarray(acc, dtype=float) * 100
        ok = ~np.isnan(acc)
        ax.scatter(counts[ok], acc[ok], s=14, marker=markers[k % len(markers)], alpha=0.8, color=f"C{k}", label=head)
        if groups is not None:
            for g in SHOT_COLORS:
                sel = ok & (groups == g)
                if sel.any():
                    ax.hlines(acc[sel].mean(), counts[sel].min(), counts[sel].max(), color=f"C{k}", lw=1,
                              linestyles="--")
    _count_axis(ax, counts)
    ax.set_ylabel("class accuracy (%)")
    ax.set_ylim(-2, 108)
    ax.grid(alpha=0.3)
    if len(accuracy) > 1:
        ax.legend(fontsize=7, loc="lower right")
    if title:
        ax.set_title(title, fontsize=9, pad=14)
    fig.tight_layout()
    return fig


def shot_accuracy_figure(values: Mapping[str, Mapping[str, float]], title: str = "", ax=None) -> Figure:
    """Grouped bars: accuracy (%) of each shot group, one bar per label (heads of a run, or runs)."""
    fig, ax = _axes(ax, (4.8, 3.2))
    shots = [g for g in SHOT_COLORS if any(g in v for v in values.values())]
    width = 0.8 / max(1, len(values))
    x = np.arange(len(shots))
    for k, (label, acc) in enumerate(values.items()):
        ax.bar(x + (k - (len(values) - 1) / 2) * width, [100 * acc.get(g, np.nan) for g in shots], width, label=label)
    ax.set_xticks(x, shots)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title or "accuracy per shot group", fontsize=9)
    fig.tight_layout()
    return fig


def expert_comparison_figure(counts: Sequence[int], a: np.ndarray, b: np.ndarray,
                             names: tuple[str, str] = ("cls", "dist"), groups: Sequence[str] | None = None,
                             title: str = "", ax=None) -> Figure:
    """Per-class accuracy of head ``b`` minus head ``a`` (points) against training images: where each expert wins
    (DeiT-LT: the DIST head should win on the tail, the CLS head on the head classes)."""
    counts = np.asarray(counts, dtype=float)
    diff = (np.asarray(b, dtype=float) - np.asarray(a, dtype=float)) * 100
    ok = ~np.isnan(diff)
    fig, ax = _axes(ax, (6.0, 3.2))
    groups = np.asarray(groups) if groups is not None else np.full(len(diff), "class")
    for g in dict.fromkeys(groups):
        sel = ok & (groups == g)
        ax.scatter(counts[sel], diff[sel], s=14, color=SHOT_COLORS.get(g, "C0"), label=g)
    ax.axhline(0, color="black", lw=0.6)
    if len(set(groups)) > 1:
        ax.legend(fontsize=7)
    _count_axis(ax, counts)
    ax.set_ylabel(f"{names[1]} − {names[0]} accuracy (points)")
    ax.grid(alpha=0.3)
    ax.set_title(title or f"{names[1]} vs {names[0]} per class", fontsize=9)
    fig.tight_layout()
    return fig


def run_figures(run) -> dict[str, Figure]:
    """The figures of one run (a ``cl_vit.runs.Run``): ``accuracy_matrix``, ``average_accuracy`` (A_t of every
    head) and, for long-tailed runs, ``per_class_accuracy`` against training-set size with the shot groups."""
    figs = {
        "accuracy_matrix": accuracy_matrix_figure(run.accuracy_matrix, title=run.label),
        "average_accuracy": average_accuracy_figure({h: run.head(h).average_accuracy for h in run.head_names},
                                                    title=f"A_t · {run.label}"),
    }
    groups = run.shot_groups()
    if groups is not None and run.class_counts is not None:
        figs["per_class_accuracy"] = per_class_accuracy_figure(
            run.class_counts, {h: run.per_class_accuracy(h) for h in run.head_names}, groups.groups,
            title=f"{run.label} · {groups.definition}" if groups.definition else run.label,
        )
    return figs


# -- attention -----------------------------------------------------------------------------------------------------
#
# A model exposes its attention as ``get_attention_maps(x) -> list[dict]``, one dict per block with "raw" (the
# block's attention, [B, H, N, N]) and "refined" (the refined map a Refiner-ViT block uses, or None).


def attention_model(model):
    """The network inside ``model`` (a ContinualModule or a net) that has ``get_attention_maps``, or None."""
    for m in (model, getattr(model, "net", None)):
        if m is not None and callable(getattr(m, "get_attention_maps", None)):
            return m
    return None


def has_attention_maps(model) -> bool:
    return attention_model(model) is not None


def fixed_image(scenario, index: int = 0) -> torch.Tensor:
    """The image every attention figure of a run shows: test image ``index`` of the first experience."""
    return scenario.test_stream[0].dataset[index][0]


@torch.no_grad()
def attention_maps(model, image: torch.Tensor) -> list[dict[str, np.ndarray | None]]:
    """Raw and refined attention of every block for one image ([C, H, W]), as arrays [heads, N, N] (eval mode)."""
    net = attention_model(model)
    if net is None:
        raise UserError(f"{type(getattr(model, 'net', model)).__name__} has no get_attention_maps(x): attention maps "
                        "need a model that exposes them, e.g. a Refiner-ViT (model=refiner_vit_tiny)")
    param = next(net.parameters(), None)
    x = image[None] if image.ndim == 3 else image[:1]
    if param is not None:
        x = x.to(param.device, param.dtype)
    was_training = net.training
    net.eval()
    try:
        maps = net.get_attention_maps(x)
    finally:
        net.train(was_training)
    as_np = lambda t: None if t is None else t[0].detach().float().cpu().numpy()  # noqa: E731
    return [{"raw": as_np(m["raw"]), "refined": as_np(m.get("refined"))} for m in maps]


def token_layout(model, n_tokens: int) -> tuple[int, tuple[int, int] | None]:
    """(prefix tokens, patch grid) of a model's attention maps: from timm attributes, else guessed from N."""
    net = attention_model(model) or model
    prefix = getattr(net, "num_prefix_tokens", None)
    grid = getattr(getattr(net, "patch_embed", None), "grid_size", None)
    if prefix is None:
        prefix = next((p for p in range(1, 9) if math.isqrt(n_tokens - p) ** 2 == n_tokens - p), 0)
    if grid is None or grid[0] * grid[1] != n_tokens - prefix:
        side = math.isqrt(n_tokens - prefix)
        grid = (side, side) if side * side == n_tokens - prefix else None
    return int(prefix), (tuple(grid) if grid is not None else None)


def _attention_panel(A: np.ndarray, view: str, prefix: int, grid) -> np.ndarray:
    """[N, N] -> what one panel shows: the class token's attention over the patch grid, or the whole matrix."""
    if view == "cls" and prefix > 0 and grid is not None:
        return A[0, prefix:].reshape(grid)
    return A


def _show_image(ax, image: torch.Tensor) -> None:
    img = image.detach().float().cpu()
    img = (img - img.min()) / (img.max() - img.min() + 1e-8)
    if img.shape[0] == 1:
        ax.imshow(img[0].numpy(), cmap="gray")
    else:
        ax.imshow(img[:3].permute(1, 2, 0).numpy())
    ax.set_axis_off()
    ax.set_title("image", fontsize=7)


def attention_block_figure(block: Mapping[str, np.ndarray | None], index: int, image: torch.Tensor | None = None,
                           view: str = "cls", prefix: int = 1, grid=None, title: str = "") -> Figure:
    """One block, per head: the raw map (top row) and the refined map (bottom row, when the block refines).

    ``view="cls"``: the class token's attention over the patch grid; ``"matrix"``: the whole N x N map."""
    rows = [("raw", block["raw"])] + ([("refined", block["refined"])] if block.get("refined") is not None else [])
    n_heads = block["raw"].shape[0]
    lead = 1 if image is not None else 0
    fig = Figure(figsize=(1.3 * (n_heads + lead) + 0.6, 1.35 * len(rows) + 0.5), dpi=100)
    axes = fig.subplots(len(rows), n_heads + lead, squeeze=False)
    for r, (kind, maps) in enumerate(rows):
        if lead:
            if r == 0:
                _show_image(axes[r, 0], image)
            else:
                axes[r, 0].set_axis_off()
        for h in range(n_heads):
            ax = axes[r, h + lead]
            ax.imshow(_attention_panel(maps[h], view, prefix, grid), cmap="inferno")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"head {h}", fontsize=7)
            if h == 0:
                ax.set_ylabel(kind, fontsize=8)
    what = "class-token attention over the patches" if view == "cls" and grid is not None else "attention matrix"
    fig.suptitle(title or f"block {index} · {what} (each panel on its own colour scale)", fontsize=9)
    fig.tight_layout()
    return fig


def attention_summary_figure(maps: Sequence[Mapping[str, np.ndarray | None]], view: str = "cls", prefix: int = 1,
                             grid=None, title: str = "") -> Figure:
    """Every block at a glance: the mean over heads of the raw map (top) and of the refined map (bottom)."""
    n = len(maps)
    has_refined = any(m.get("refined") is not None for m in maps)
    rows = ["raw", "refined"] if has_refined else ["raw"]
    fig = Figure(figsize=(1.3 * n + 0.6, 1.35 * len(rows) + 0.5), dpi=100)
    axes = fig.subplots(len(rows), n, squeeze=False)
    for b, block in enumerate(maps):
        for r, kind in enumerate(rows):
            ax = axes[r, b]
            ax.set_xticks([])
            ax.set_yticks([])
            if block.get(kind) is None:
                ax.set_axis_off()
                continue
            ax.imshow(_attention_panel(block[kind].mean(0), view, prefix, grid), cmap="inferno")
            if r == 0:
                ax.set_title(f"block {b}", fontsize=7)
            if b == 0:
                ax.set_ylabel(kind, fontsize=8)
    fig.suptitle(title or "every block, mean over heads (each panel on its own colour scale)", fontsize=9)
    fig.tight_layout()
    return fig


def attention_figures(model, image: torch.Tensor, view: str = "cls",
                      blocks: Sequence[int] | None = None) -> list[Figure]:
    """Figures of the raw and refined attention of ``model`` (anything with ``get_attention_maps``, or a module
    holding such a net) on one image: one per block (per head), in block order."""
    maps = attention_maps(model, image)
    prefix, grid = token_layout(model, maps[0]["raw"].shape[-1]) if maps else (0, None)
    chosen = range(len(maps)) if blocks is None else blocks
    return [attention_block_figure(maps[b], b, image, view, prefix, grid) for b in chosen]


def _unit(a: np.ndarray) -> np.ndarray:
    """``a`` scaled to [0, 1] between its minimum and maximum, as ``imshow`` colours a panel."""
    a = np.asarray(a, dtype=np.float64)
    span = a.max() - a.min()
    return (a - a.min()) / span if span > 0 else np.zeros_like(a)


def _resized(a: np.ndarray, cell: int) -> np.ndarray:
    """[h, w, ...] -> [cell, cell, ...] by nearest neighbour (panels stay sharp, as ``imshow`` draws small maps)."""
    return a[np.arange(cell) * a.shape[0] // cell][:, np.arange(cell) * a.shape[1] // cell]


def attention_mosaic(block: Mapping[str, np.ndarray | None], image: torch.Tensor | None = None, view: str = "cls",
                     prefix: int = 1, grid=None, cell: int = 64, gap: int = 4, cmap: str = "inferno") -> np.ndarray:
    """One block as an RGB image [height, width, 3] (uint8): the panels of ``attention_block_figure`` (the image,
    then one panel per head; the raw map on top, the refined map below when the block refines; each panel on its own
    colour scale) without its axes and titles, for TensorBoard: drawing a figure per block at every experience was a
    tenth of the default run's time."""
    from matplotlib import colormaps

    colour = colormaps[cmap]
    rows = [block["raw"]] + ([block["refined"]] if block.get("refined") is not None else [])
    lead = 1 if image is not None else 0
    n_cols = rows[0].shape[0] + lead
    out = np.full((len(rows) * (cell + gap) - gap, n_cols * (cell + gap) - gap, 3), 255, dtype=np.uint8)

    def put(r: int, c: int, rgb: np.ndarray) -> None:
        y, x = r * (cell + gap), c * (cell + gap)
        out[y:y + cell, x:x + cell] = _resized(np.round(255 * rgb).astype(np.uint8), cell)

    if lead:
        img = _unit(image.detach().float().cpu().numpy())
        put(0, 0, np.repeat(img[0][..., None], 3, -1) if img.shape[0] == 1 else img[:3].transpose(1, 2, 0))
    for r, maps in enumerate(rows):
        for h in range(maps.shape[0]):
            put(r, h + lead, colour(_unit(_attention_panel(maps[h], view, prefix, grid)))[..., :3])
    return out


def log_attention_maps(writer, module, scenario, step: int) -> None:
    """TensorBoard images ``attention/block_XX`` of the fixed image (``attention_mosaic``), for models with
    ``get_attention_maps``."""
    if writer is None or not has_attention_maps(module):
        return
    image = fixed_image(scenario)
    maps = attention_maps(module, image)
    prefix, grid = token_layout(module, maps[0]["raw"].shape[-1]) if maps else (0, None)
    for b, block in enumerate(maps):
        writer.add_image(f"attention/block_{b:02d}", attention_mosaic(block, image, "cls", prefix, grid), step,
                         dataformats="HWC")
