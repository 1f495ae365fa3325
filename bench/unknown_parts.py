"""Unknown-part rejection benchmark: how many images of another domain the exported model
calls ``unknown``, and how many real test parts it wrongly does, side by side in one run.

The exported model (models/onnx/model.onnx) outputs the Mahalanobis distance of an image's
penultimate features to the nearest class and carries the threshold evaluate fitted on val
(decision.unknown.false_reject). Every image goes through the production path (file bytes,
the model's own preprocessing), as on the line:

- in-domain: the test split of the prepared data (never seen by the fit): its ``unknown``
  share is the false-reject rate;
- another domain: a seeded sample of Fashion-MNIST test images (Debian's
  dataset-fashion-mnist), PNG-encoded and resized by the model's preprocessing;
- noise: seeded uniform-noise images at the model's input size;
- any ``--folder`` of other photos (e.g. parts of another product).

Target (issue 18): at least 95 % of the other domain rejected with at most 5 % of the
in-domain test images wrongly rejected. Also printed: the AUROC of the distance (in-domain
against each other domain), which does not depend on the threshold.

    python bench/unknown_parts.py                  # after dvc repro (needs models/ and data/)
    python bench/unknown_parts.py --fashion 2000 --folder ~/other_photos
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from synermix.config import load_params
from synermix.data.sources import _idx_file, read_idx
from synermix.inference import Classifier, image_files, read_files
from synermix.metrics import wilson_interval
from synermix.paths import MODEL_DIR, ONNX_MODEL, PREPARED_DIR
from synermix.stages.common import evaluation_rows
from synermix.training import load_trained_model

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """P(distance of an outside image > distance of an inside one), ties counted half."""
    above = (outside[:, None] > inside[None, :]).sum() + 0.5 * (outside[:, None] == inside[None, :]).sum()
    return float(above / (len(inside) * len(outside)))


def score(classifier: Classifier, items: list[tuple[str, bytes]]) -> tuple[np.ndarray, list[str]]:
    results = [r for r in classifier.predict(items, batch_size=64) if r.status != "error"]
    return np.array([r.distance for r in results]), [r.decision for r in results]


def line(name: str, decisions: list[str], distances: np.ndarray, reference: np.ndarray | None) -> str:
    n = len(decisions)
    k = sum(d == "unknown" for d in decisions)
    low, high = wilson_interval(k, n)
    text = f"{name:<34} {n:>6} {k / n:>9.4f}  [{low:.4f}, {high:.4f}]"
    text += f"  median distance {np.median(distances):9.3f}"
    if reference is not None:
        text += f"  AUROC {auroc(reference, distances):.4f}"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=str(ONNX_MODEL))
    parser.add_argument("--fashion", type=int, default=1000, help="Fashion-MNIST test images to sample")
    parser.add_argument("--noise", type=int, default=200, help="uniform-noise images")
    parser.add_argument("--folder", action="append", default=[], help="a folder of other photos (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    classifier = Classifier(args.model, provider="cpu")
    threshold = classifier.info.unknown_above
    if threshold is None:
        raise SystemExit(f"{args.model} carries no unknown-part threshold (decision.unknown.enabled: false?)")
    params = load_params()
    _, meta = load_trained_model(Path(MODEL_DIR))
    _, test_rows = evaluation_rows(Path("."), list(meta["class_names"]), meta.get("manifest_sha256"))
    test_items = list(read_files([Path(PREPARED_DIR) / p for p in test_rows["path"]]))
    rng = np.random.default_rng(args.seed)
    groups: dict[str, list[tuple[str, bytes]]] = {}
    fashion = read_idx(_idx_file(FASHION_DIR, "t10k-images-idx3-ubyte"))
    picks = rng.choice(len(fashion), size=min(args.fashion, len(fashion)), replace=False)
    groups["Fashion-MNIST test (other domain)"] = [(f"fashion/{i}", png(fashion[i])) for i in picks]
    size = classifier.info.image_size
    groups["uniform noise"] = [
        (f"noise/{i}", png(rng.integers(0, 256, size=(size, size), dtype=np.uint8)))
        for i in range(args.noise)
    ]
    for folder in args.folder:
        groups[f"folder {folder}"] = list(read_files(image_files([folder])))

    print(
        f"model {args.model}: unknown above distance {threshold:.4f} "
        f"(fitted on val at {params.decision.unknown.false_reject:g} false rejects)"
    )
    print(f"{'images':<34} {'n':>6} {'unknown':>9}  95 % interval")
    inside, inside_decisions = score(classifier, test_items)
    print(line(f"{params.data.source} test (real parts)", inside_decisions, inside, None))
    figures = {
        "threshold": threshold,
        "in_domain_false_reject": sum(d == "unknown" for d in inside_decisions) / len(inside_decisions),
    }
    for name, items in groups.items():
        distances, decisions = score(classifier, items)
        print(line(name, decisions, distances, inside))
        figures[name] = {
            "rejected": sum(d == "unknown" for d in decisions) / len(decisions),
            "auroc": auroc(inside, distances),
            "images": len(decisions),
        }
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
