"""Figures of a run (matplotlib, headless): used by the runner's TensorBoard images, the run directory's PNGs and
the notebooks."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def accuracy_matrix_figure(R: np.ndarray, title: str = "", ax=None):
    """Annotated heatmap of the accuracy matrix (rows: trained up to, columns: evaluated experience)."""
    R = np.asarray(R, dtype=float)
    n_rows, n_cols = R.shape
    if ax is None:
        fig, ax = plt.subplots(figsize=(1.0 + 0.55 * n_cols, 0.9 + 0.5 * max(n_rows, 1)), dpi=100)
    else:
        fig = ax.figure
    im = ax.imshow(np.ma.masked_invalid(R), vmin=0, vmax=1, cmap="viridis")
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
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig
