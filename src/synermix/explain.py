"""What a quality engineer looks at first: the test images the line would get most wrong
(the most confident escapes and overkills), as a contact sheet of thumbnails with actual,
predicted and confidence, and the same images with Grad-CAM overlays (where in the cell the
model looked; captum's ``LayerGradCam`` on the backbone's last stage, not a hand-written CAM).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from synermix.paths import EVAL_FIGURES, EVAL_TABLES

log = logging.getLogger(__name__)

COLUMNS = ["kind", "path", "actual", "predicted", "decision", "confidence"]


def pick(predictions: pd.DataFrame, defect_classes: Sequence[str], per_kind: int) -> pd.DataFrame:
    """The ``per_kind`` most confident escapes (defective parts the decision accepts) and as
    many overkills (good parts it rejects); without defect classes or decisions, the most
    confident wrong classifications (kind ``mistake``)."""
    rows = predictions.copy()
    if "decision" not in rows:
        rows["decision"] = ""
    if defect_classes and rows["decision"].astype(bool).any():
        defect = rows["actual"].isin(list(defect_classes))
        escapes = rows[defect & (rows["decision"] == "accept")].assign(kind="escape")
        overkills = rows[~defect & (rows["decision"] == "reject")].assign(kind="overkill")
        parts = [escapes, overkills]
    else:
        parts = [rows[~rows["correct"].astype(bool)].assign(kind="mistake")]
    chosen = [
        p.sort_values(["confidence", "path"], ascending=[False, True], kind="stable").head(per_kind)
        for p in parts
    ]
    return pd.concat(chosen, ignore_index=True)[COLUMNS] if chosen else pd.DataFrame(columns=COLUMNS)


def gradcam(model, x, targets) -> np.ndarray:
    """Grad-CAM maps in [0, 1] at the input's size, one per image, for class ``targets``."""
    import torch
    from captum.attr import LayerAttribution, LayerGradCam

    model = model.eval()
    cam = LayerGradCam(model, model.stages[-1])
    with torch.enable_grad():
        maps = cam.attribute(x.requires_grad_(True), target=list(targets), relu_attributions=True)
    maps = LayerAttribution.interpolate(maps.detach(), tuple(x.shape[-2:]), "bilinear")[:, 0]
    maps = maps.clamp(min=0).numpy()
    peak = maps.reshape(len(maps), -1).max(axis=1).reshape(-1, 1, 1)
    return np.divide(maps, peak, out=np.zeros_like(maps), where=peak > 0)


def write(
    out_dir: Path,
    picked: pd.DataFrame,
    model,
    preprocessing,
    image_root: Path,
    class_names: Sequence[str],
) -> list[Path]:
    """``contact_sheet.csv``, ``contact_sheet.png`` and ``gradcam.png`` (a figure saying so
    when there is nothing to show: the files are DVC outputs either way)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from synermix.data.datasets import InspectionImages

    out_dir.mkdir(parents=True, exist_ok=True)
    table = out_dir / EVAL_TABLES["contact_sheet"].name
    picked.to_csv(table, index=False, lineterminator="\n", float_format="%.6g")
    maps = None
    if len(picked):
        images = InspectionImages(
            picked.assign(label=picked["actual"]),
            image_root,
            list(class_names),
            preprocessing,
            image_size=preprocessing.image_size,
            channels=preprocessing.channels,
            cache=False,
        )
        x = torch.stack([images[i][0] for i in range(len(picked))]).float()
        maps = gradcam(model.cpu(), x, [class_names.index(c) for c in picked["predicted"]])
    written = [table]
    for name, overlay in (("contact_sheet", False), ("gradcam", True)):
        columns = max(min(len(picked), 8), 1)
        rows = max(-(-len(picked) // columns), 1)
        fig, axes = plt.subplots(rows, columns, figsize=(2.1 * columns, 2.5 * rows), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        if not len(picked):
            axes[0, 0].text(0.5, 0.5, "no escapes, overkills or mistakes on test", ha="center", va="center")
        for i, row in enumerate(picked.itertuples(index=False)):
            ax = axes.flat[i]
            with Image.open(image_root / row.path) as img:
                side = preprocessing.image_size
                shown = np.asarray(img.convert("L").resize((side, side), Image.Resampling.BILINEAR))
            ax.imshow(shown, cmap="gray", vmin=0, vmax=255)
            if overlay and maps is not None:
                ax.imshow(maps[i], cmap="jet", alpha=0.45, vmin=0, vmax=1)
            decision = f" → {row.decision}" if row.decision else ""
            ax.set_title(
                f"{row.kind}: {row.actual}\npred {row.predicted} {row.confidence:.2f}{decision}",
                fontsize=7,
                color="firebrick" if row.kind == "escape" else "black",
            )
        what = "Grad-CAM of the predicted class" if overlay else "contact sheet"
        fig.suptitle(f"{what}: most confident escapes and overkills (test)", fontsize=9)
        fig.tight_layout()
        path = out_dir / EVAL_FIGURES[name].name
        fig.savefig(path, dpi=100, metadata={"Software": None})
        plt.close(fig)
        written.append(path)
    return written
