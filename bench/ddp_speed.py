"""Training speed of 1 process against N under torchrun (``train.launcher``), side by side.

A throw-away project in a temporary folder: ``--per-class`` prepared ELPV images per class
(from this checkout's ``data/prepared``, so run ``dvc repro prepare`` first) as a folder
source, params.yaml's train recipe with ``--epochs`` epochs, trained by ``synermix train``
as one process and as ``--nproc`` torchrun processes, alternating, ``--rounds`` times each.
Prints the training images/s of each run (the history's ``images_per_s``: the epoch's
images over its training time, summed over the ranks; validation not included), the
median per setting and the ratio. On a CPU every process gets ``cores / nproc`` threads,
so on 2 cores this measures the overhead of splitting the same cores, not a speed-up.

    python bench/ddp_speed.py                      # 2 processes, 60 images per class, 2 epochs
    python bench/ddp_speed.py --nproc 4 --epochs 3 # on a machine with 4 GPUs
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
SYNERMIX = Path(sys.executable).with_name("synermix")


def make_project(folder: Path, per_class: int, epochs: int) -> Path:
    manifest = pd.read_csv(ROOT / "data/prepared/manifest.csv")
    photos = folder / "photos"
    for label, rows in manifest[manifest["decodable"]].groupby("label"):
        (photos / label).mkdir(parents=True)
        for path in rows["path"].head(per_class):
            shutil.copy(ROOT / "data/prepared" / path, photos / label / Path(path).name)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"] = {"source": f"folder:{photos}"}
    params["train"].update(epochs=epochs, warmup_epochs=min(1.0, epochs))
    params["mlflow"] = {"experiment": "ddp-speed"}
    params.pop("tune", None)
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    run(folder, "prepare")
    return folder


def run(folder: Path, *args: str) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}
    done = subprocess.run([str(SYNERMIX), *args], cwd=folder, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"synermix {' '.join(args)} failed:\n{done.stderr[-2000:]}")


def train(folder: Path, launcher: str, nproc: int) -> float:
    params = yaml.safe_load((folder / "params.yaml").read_text())
    params["train"].update(launcher=launcher, nproc_per_node=nproc)
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)  # never resume
    run(folder, "train")
    history = pd.read_csv(folder / "reports/train_history.csv")
    return float(history["images_per_s"].mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if not (ROOT / "data/prepared/manifest.csv").is_file():
        sys.exit("data/prepared/manifest.csv is missing: run `dvc repro prepare` first")
    with tempfile.TemporaryDirectory(prefix="ddp-speed-") as tmp:
        folder = make_project(Path(tmp), args.per_class, args.epochs)
        speeds: dict[str, list[float]] = {"1 process": [], f"{args.nproc} processes (torchrun)": []}
        for _ in range(args.rounds):
            speeds["1 process"].append(train(folder, "single", args.nproc))
            speeds[f"{args.nproc} processes (torchrun)"].append(train(folder, "torchrun", args.nproc))
    base = statistics.median(speeds["1 process"])
    print("| setting | images/s per round | median | ratio |\n|---|---|---:|---:|")
    for name, values in speeds.items():
        median = statistics.median(values)
        print(f"| {name} | {', '.join(f'{v:.1f}' for v in values)} | {median:.1f} | {median / base:.2f}x |")


if __name__ == "__main__":
    main()
