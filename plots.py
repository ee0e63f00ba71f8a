"""The report's figures, drawn with matplotlib (optional: without it nothing is drawn). The
numbers come ready from report.py: curves of mean ± SE against training eps, and strips of
images. numpy and matplotlib only.
"""
import numpy as np


def available():
    """Whether matplotlib can be imported (the figures are optional)."""
    import importlib.util
    return importlib.util.find_spec("matplotlib") is not None


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def panels_figure(path, panel_rows, ylabel, log=False):
    """Rows of panels (title, [(label, eps, means, SEs)], the grid's eps > 0): mean ± SE against
    eps, the legend under each panel; False (nothing written) when no panel has data."""
    plt = pyplot()
    ncols = max(len(r) for r in panel_rows)
    fig, axes = plt.subplots(len(panel_rows), ncols, figsize=(4.6 * ncols, 4.4 * len(panel_rows)),
                             squeeze=False)
    for ax_row, panels in zip(axes, panel_rows):
        for ax, (title, curves, positive) in zip(ax_row, panels):
            for label, eps, means, ses in curves:
                if eps:
                    ax.errorbar(eps, means, yerr=ses, marker="o", capsize=3, label=label)
            if positive and max(positive) / min(positive) > 50:  # published grids: 0.01 .. 5
                ax.set_xscale("symlog", linthresh=min(positive))
            ax.set(title=title, xlabel="training eps", ylabel=ylabel,
                   yscale="log" if log else "linear")
            if ax.has_data():
                ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
        for ax in ax_row[len(panels):]:
            ax.set_axis_off()
    drawn = any(ax.has_data() for ax in axes.flat)
    if drawn:
        fig.tight_layout()
        fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return drawn


def image_strip(x, n_images, size=64):
    """[N, C, H, W] in [0, 1] -> [H', n_images * W', 3]: the first images side by side, RGB,
    subsampled to at most size pixels, each with a 1-pixel white frame."""
    x = np.asarray(x[:n_images], dtype=np.float32).clip(0, 1)
    x = x[..., ::-(-x.shape[-2] // size), ::-(-x.shape[-1] // size)]
    x = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=1.0)
    x = np.repeat(x, 3, 1) if x.shape[1] == 1 else x[:, :3]
    return x.transpose(2, 0, 3, 1).reshape(x.shape[2], -1, 3)


def mosaic_figure(path, strips, labels, xlabel):
    """Image strips (image_strip, one shape) stacked, a row label each; True when written."""
    if not strips:
        return False
    plt = pyplot()
    h, n_images = strips[0].shape[0], strips[0].shape[1] // strips[0].shape[0]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * n_images, 0.6 + 0.9 * len(strips)))
    ax.imshow(np.concatenate(strips), interpolation="nearest")
    ax.set_yticks([h * (i + 0.5) for i in range(len(strips))], labels, fontsize=8)
    ax.set_xticks([])
    ax.set_xlabel(xlabel)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return True
