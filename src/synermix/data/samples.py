"""A per-class sample grid of the prepared images (reports/validation/samples.png): before
anything trains, a person sees whether each folder holds what its name says (a class of
blank frames, a mislabelled folder, another camera's images)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

#: images per class in the grid, and their side in pixels
SAMPLES_PER_CLASS = 8
THUMB_SIDE = 96


def usable_images(manifest: pd.DataFrame, quarantined: set[str]) -> pd.DataFrame:
    """The decodable images that are not quarantined (by their source path)."""
    return manifest[manifest["decodable"].astype(bool) & ~manifest["source_path"].isin(quarantined)]


def pick_samples(usable: pd.DataFrame, per_class: int = SAMPLES_PER_CLASS) -> pd.DataFrame:
    """Up to ``per_class`` images per class in the order of their content hash: a sample that
    depends on the images alone, not on file names or a seed."""
    ordered = usable.sort_values(["label", "content_sha256", "path"], kind="stable")
    return ordered.groupby("label", sort=True).head(per_class)


def write_sample_grid(picked: pd.DataFrame, image_root: Path, counts: dict[str, int], out: Path) -> Path:
    """One row per class (``counts``: its usable images), the picked thumbnails along it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = sorted(counts)
    rows = max(len(classes), 1)
    fig, axes = plt.subplots(
        rows, SAMPLES_PER_CLASS, figsize=(1.3 * SAMPLES_PER_CLASS, 1.45 * rows), squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    for r, label in enumerate(classes):
        mine = picked[picked["label"] == label]
        for c, path in enumerate(mine["path"]):
            with Image.open(image_root / path) as img:
                thumb = img.convert("L").resize((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BILINEAR)
            axes[r, c].imshow(np.asarray(thumb), cmap="gray", vmin=0, vmax=255)
        axes[r, 0].set_title(f"{label} ({counts[label]} images)", fontsize=8, loc="left")
    fig.suptitle("samples per class (prepared images)", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, metadata={"Software": None})
    plt.close(fig)
    return out
