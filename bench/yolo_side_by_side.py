"""Ultralytics YOLO classification on the same ELPV splits, for a side-by-side figure.

Never a project dependency: run it with the python of a throw-away venv that has
``ultralytics`` (and the same torch), after ``dvc repro prepare validate``::

    python3.11 -m venv /tmp/yolo-venv
    /tmp/yolo-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 ultralytics
    /tmp/yolo-venv/bin/python bench/yolo_side_by_side.py --minutes 8

It links data/prepared's images into the ``<split>/<class>/`` layout YOLO reads (the same
train/val/test split as the pipeline), trains ``yolo11n-cls`` built from its model yaml
(no pretrained weights) at the pipeline's input size for a wall-clock budget, and scores
the best checkpoint on the test split: accuracy, macro recall and the share of
``defective`` cells called ``functional``. One JSON line goes to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def link_splits(prepared: Path, out: Path) -> None:
    with (prepared / "manifest.csv").open(newline="") as fh:
        for row in csv.DictReader(fh):
            if row.get("decodable", "True") not in ("True", "true", "1"):
                continue
            folder = out / row["split"] / row["label"]
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / Path(row["path"]).name
            if not target.exists():
                os.symlink((prepared / row["path"]).resolve(), target)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=8.0, help="training wall-clock budget")
    parser.add_argument("--imgsz", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--model", default="yolo11n-cls.yaml")
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--work", type=Path, default=Path("/tmp/synermix-yolo"))
    parser.add_argument("--out", type=Path, default=ROOT / "reports/bench/yolo.jsonl")
    args = parser.parse_args()
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics import YOLO

    data = args.work / "data"
    link_splits(ROOT / "data/prepared", data)
    model = YOLO(args.model)  # built from the yaml: random weights, nothing downloaded
    start = time.perf_counter()
    model.train(
        data=str(data),
        imgsz=args.imgsz,
        batch=args.batch,
        epochs=1000,
        time=args.minutes / 60.0,  # hours; overrides epochs
        device="cpu",
        workers=0,
        pretrained=False,
        seed=args.seed,
        deterministic=True,
        plots=False,
        amp=False,
        project=str(args.work / "runs"),
        name="train",
        exist_ok=True,
        verbose=False,
    )
    seconds = time.perf_counter() - start
    best = YOLO(str(args.work / "runs/train/weights/best.pt"))
    names = None
    confusion: dict[tuple[str, str], int] = {}
    for label_dir in sorted((data / "test").iterdir()):
        files = sorted(str(p) for p in label_dir.iterdir())
        for i in range(0, len(files), 64):
            for result in best.predict(files[i : i + 64], imgsz=args.imgsz, device="cpu", verbose=False):
                names = result.names
                predicted = names[int(result.probs.top1)]
                confusion[(label_dir.name, predicted)] = confusion.get((label_dir.name, predicted), 0) + 1
    classes = sorted({a for a, _ in confusion})
    total = sum(confusion.values())
    correct = sum(v for (a, p), v in confusion.items() if a == p)
    recalls = {
        c: confusion.get((c, c), 0) / sum(v for (a, _), v in confusion.items() if a == c) for c in classes
    }
    defective = sum(v for (a, _), v in confusion.items() if a == "defective")
    record = {
        "tool": f"ultralytics {args.model} (from yaml, no pretrained weights)",
        "imgsz": args.imgsz,
        "batch": args.batch,
        "budget_minutes": args.minutes,
        "train_seconds": round(seconds, 1),
        "test_images": total,
        "test_accuracy": round(correct / total, 4),
        "test_macro_recall": round(sum(recalls.values()) / len(recalls), 4),
        "test_per_class_recall": {c: round(r, 4) for c, r in recalls.items()},
        "test_escape_defective": round(confusion.get(("defective", "functional"), 0) / max(defective, 1), 4),
        "confusion": {f"{a}->{p}": v for (a, p), v in sorted(confusion.items())},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as fh:
        fh.write(json.dumps(record) + "\n")
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
