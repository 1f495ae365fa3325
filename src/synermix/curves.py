"""PNG figures of the training curves (reports/train/): the losses and the val scores on
separate axes, because a loss of 0-7 and scores of 0-1 on one axis flatten the scores. PNGs
show on the DVC plots page without the network (its interactive charts load a script from a
CDN)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from synermix.paths import TRAIN_FIGURES


def write_training_curves(out_dir: Path, history: pd.DataFrame, selected_epoch: int | None) -> list[Path]:
    """``loss.png`` (train and val loss per epoch) and ``scores.png`` (val accuracy, val macro
    recall and each class's val recall), the kept epoch marked on both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    panels = {
        "loss": ([c for c in ("train_loss", "train_intra_loss", "val_loss") if c in history], "loss", None),
        "scores": (
            [c for c in ("val_accuracy", "val_macro_recall") if c in history]
            + sorted(c for c in history if c.startswith("val_recall_")),
            "score (val)",
            (0.0, 1.0),
        ),
    }
    for name, (columns, ylabel, ylim) in panels.items():
        fig, ax = plt.subplots(figsize=(7, 4))
        for column in columns:
            thin = column.startswith("val_recall_")
            ax.plot(
                history["epoch"],
                history[column],
                label=column,
                lw=1 if thin else 2,
                ls=":" if thin else "-",
            )
        if selected_epoch:
            ax.axvline(selected_epoch, c="grey", ls="--", lw=1, label=f"kept epoch {selected_epoch}")
        ax.set(xlabel="epoch", ylabel=ylabel, title=f"training: {ylabel}")
        if ylim:
            ax.set_ylim(*ylim)
        if columns:
            ax.legend(fontsize="small", loc="best")
        fig.tight_layout()
        path = out_dir / TRAIN_FIGURES[name].name
        fig.savefig(path, dpi=100, metadata={"Software": None})
        written.append(path)
    plt.close("all")
    return written
