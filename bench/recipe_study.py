"""Recipe study: what moves test accuracy, macro recall and escapes on the prepared data.

Each named recipe is a set of ``train.*`` overrides on params.yaml. Every recipe trains
with the project's own :func:`synermix.training.train_model` on the usable train split
(validated on val every epoch, the kept epoch chosen on val), then is scored once on the
test split. One JSON line per recipe goes to ``--out`` (default
reports/bench/recipes.jsonl); a recipe already there with the same settings is not run
again, so a killed study resumes. Run after ``dvc repro prepare validate``::

    python bench/recipe_study.py --recipe mv2_f1_160_e10 --seed 2     # a named recipe, another seed
    python bench/recipe_study.py --name default                       # params.yaml's train section
    python bench/recipe_study.py --name ls01 --set label_smoothing=0.1  # an ad-hoc recipe on it
    python bench/recipe_study.py --list

``escape_defective``: share of ``defective`` test images called ``functional`` (the rate
the issue targets); ``escape_any_defect``: share of all non-``functional`` test images
called ``functional``; ``overkill``: share of ``functional`` test images called anything
else. Wall time is this host's (compare ratios across hosts, never seconds).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from synermix.config import TrainParams, load_params  # noqa: E402
from synermix.data.datasets import InspectionImages  # noqa: E402
from synermix.data.manifest import MANIFEST_NAME, read_manifest, read_quarantine, usable_rows  # noqa: E402
from synermix.engine import evaluate, select_device  # noqa: E402
from synermix.paths import PREPARED_DIR, QUARANTINE_CSV  # noqa: E402
from synermix.stages.common import train_val_rows  # noqa: E402
from synermix.training import load_training_data, train_model  # noqa: E402

log = logging.getLogger("recipe_study")

#: the ImageNet MobileNetV2 recipes' common settings
_MV2 = {"arch": "mobilenet_v2", "init": "imagenet"}

#: train.* overrides per recipe (on top of params.yaml's train section)
RECIPES: dict[str, dict] = {
    "old_default_64": {"image_size": 64, "epochs": 12, "keep": "last", "beta": 0.4722, "lr": 0.01},
    "r18_64_best": {"image_size": 64, "epochs": 12, "beta": 0.4722, "lr": 0.01},
    "r18w32_128": {"image_size": 128, "width": 32, "epochs": 12, "beta": 0.3, "lr": 0.05},
    "r18w32_128_bal": {
        "image_size": 128,
        "width": 32,
        "epochs": 12,
        "beta": 0.3,
        "lr": 0.05,
        "sampling": "balanced",
        "balance_power": 0.5,
    },
    "r18w32_128_cw": {
        "image_size": 128,
        "width": 32,
        "epochs": 12,
        "beta": 0.3,
        "lr": 0.05,
        "class_weights": "balanced",
        "balance_power": 0.5,
    },
    "r18w32_128_cw_ema": {
        "image_size": 128,
        "width": 32,
        "epochs": 12,
        "beta": 0.3,
        "lr": 0.05,
        "class_weights": "balanced",
        "balance_power": 0.5,
        "ema_decay": 0.995,
    },
    "r18w16_192_cw": {
        "image_size": 192,
        "width": 16,
        "epochs": 12,
        "beta": 0.3,
        "lr": 0.05,
        "class_weights": "balanced",
        "balance_power": 0.5,
    },
    "r18w24_160_cw": {
        "image_size": 160,
        "width": 24,
        "epochs": 12,
        "beta": 0.3,
        "lr": 0.05,
        "class_weights": "balanced",
        "balance_power": 0.5,
    },
    "r18w32_128_cw_ls": {
        "image_size": 128,
        "width": 32,
        "epochs": 12,
        "beta": 0.3,
        "lr": 0.05,
        "class_weights": "balanced",
        "balance_power": 0.5,
        "label_smoothing": 0.1,
    },
    "r18w32_128_cw_e20": {
        "image_size": 128,
        "width": 32,
        "epochs": 20,
        "beta": 0.3,
        "lr": 0.05,
        "class_weights": "balanced",
        "balance_power": 0.5,
    },
    "r18w32_128_cw_b32": {
        "image_size": 128,
        "width": 32,
        "epochs": 12,
        "beta": 0.3,
        "lr": 0.05,
        "batch_size": 32,
        "class_weights": "balanced",
        "balance_power": 0.5,
    },
    "w16_128_a02_e30_cw": {
        "image_size": 128,
        "width": 16,
        "epochs": 30,
        "beta": 0.3,
        "lr": 0.05,
        "mixup_alpha": 0.2,
        "class_weights": "balanced",
        "balance_power": 0.5,
    },
    "w24_128_a02_e20_cw": {
        "image_size": 128,
        "width": 24,
        "epochs": 20,
        "beta": 0.3,
        "lr": 0.05,
        "mixup_alpha": 0.2,
        "class_weights": "balanced",
        "balance_power": 0.5,
    },
    "w16_128_erm_e30_cw": {
        "image_size": 128,
        "width": 16,
        "epochs": 30,
        "method": "erm",
        "lr": 0.05,
        "class_weights": "balanced",
        "balance_power": 0.5,
    },
    "w16_128_erm_e20": {"image_size": 128, "width": 16, "epochs": 20, "method": "erm", "lr": 0.05},
    "w16_128_a02_e20": {
        "image_size": 128,
        "width": 16,
        "epochs": 20,
        "beta": 0.3,
        "lr": 0.05,
        "mixup_alpha": 0.2,
    },
    "w16_128_a02_e30_bal": {
        "image_size": 128,
        "width": 16,
        "epochs": 30,
        "beta": 0.3,
        "lr": 0.05,
        "mixup_alpha": 0.2,
        "sampling": "balanced",
        "balance_power": 0.5,
    },
    "w16_160_a02_e30_bal": {
        "image_size": 160,
        "width": 16,
        "epochs": 30,
        "beta": 0.3,
        "lr": 0.05,
        "mixup_alpha": 0.2,
        "sampling": "balanced",
        "balance_power": 0.5,
    },
    "w16_128_a02_e30_bal_adamw": {
        "image_size": 128,
        "width": 16,
        "epochs": 30,
        "beta": 0.3,
        "lr": 0.003,
        "mixup_alpha": 0.2,
        "sampling": "balanced",
        "balance_power": 0.5,
        "optimizer": "adamw",
        "weight_decay": 0.05,
    },
    "r18w32_128_cw_noaug": {
        "image_size": 128,
        "width": 32,
        "epochs": 12,
        "beta": 0.3,
        "lr": 0.05,
        "class_weights": "balanced",
        "balance_power": 0.5,
        "augment": {"crop_scale": 1.0, "brightness": 0.0, "contrast": 0.0},
    },
    # ImageNet MobileNetV2 (2026-12-07), over the params.yaml of that day
    "mv2_in_128_e8": {**_MV2, "freeze_stages": 0, "image_size": 128, "epochs": 8},
    "mv2_f1_128_e10": {**_MV2, "freeze_stages": 1, "image_size": 128},
    "mv2_f1_160_e10": {**_MV2, "freeze_stages": 1, "image_size": 160},
    "mv2_f1_160_e10_bal1": {**_MV2, "freeze_stages": 1, "image_size": 160, "balance_power": 1.0},
}


def settings_key(train: TrainParams, seed: int) -> str:
    blob = json.dumps([train.model_dump(mode="json"), seed], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def rates(confusion: list[list[int]], names: list[str]) -> dict[str, float]:
    """Escapes and overkill from a confusion matrix (rows actual, columns predicted)."""
    good = names.index("functional") if "functional" in names else None
    out: dict[str, float] = {}
    if good is None:
        return out
    row = lambda i: sum(confusion[i])  # noqa: E731
    if "defective" in names:
        d = names.index("defective")
        out["escape_defective"] = confusion[d][good] / max(row(d), 1)
    bad = [i for i in range(len(names)) if i != good]
    out["escape_any_defect"] = sum(confusion[i][good] for i in bad) / max(sum(row(i) for i in bad), 1)
    out["overkill"] = 1 - confusion[good][good] / max(row(good), 1)
    return out


def markdown_table(records: list[dict]) -> str:
    """One row per measured run (settings, seed, wall time, val at the kept epoch, test), then
    mean ± std over seeds for every recipe measured with more than one seed."""
    head = (
        "| recipe | settings (train.* over params.yaml) | seed | threads | wall s | kept epoch | val acc | "
        "val macro recall | test acc | test macro recall | defective→functional | overkill |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    rows = []
    for r in records:
        settings = ", ".join(f"{k}={v}" for k, v in r["overrides"].items())
        rows.append(
            f"| {r['recipe']} | {settings} | {r['seed']} | {r['threads']} | {r['seconds']:.0f} | "
            f"{r['selected_epoch']}/{r['epochs']} | {r['val_accuracy']:.4f} | {r['val_macro_recall']:.4f} | "
            f"{r['test_accuracy']:.4f} | {r['test_macro_recall']:.4f} | "
            f"{r.get('test_escape_defective', float('nan')):.4f} | "
            f"{r.get('test_overkill', float('nan')):.4f} |"
        )
    out = [head, *rows]
    by_recipe: dict[str, list[dict]] = {}
    for r in records:
        by_recipe.setdefault(r["recipe"], []).append(r)
    repeated = {name: runs for name, runs in by_recipe.items() if len({r["seed"] for r in runs}) > 1}
    if repeated:
        columns = ("val_macro_recall", "test_accuracy", "test_macro_recall", "test_escape_defective")
        out += [
            "",
            "| recipe | seeds | val macro recall | test acc | test macro recall | defective→functional |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for name, runs in repeated.items():
            cells = []
            for column in columns:
                values = [r[column] for r in runs if column in r]
                if len(values) < 2:  # older records lack some columns
                    cells.append("n/a")
                    continue
                cells.append(f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}")
            seeds = ", ".join(str(r["seed"]) for r in runs)
            out.append(f"| {name} | {seeds} | {' | '.join(cells)} |")
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", action="append", default=[], help="recipe name (repeatable)")
    parser.add_argument(
        "--set", action="append", default=[], help="extra train.KEY=VALUE (YAML value) for every recipe"
    )
    parser.add_argument("--name", help="name of the ad-hoc recipe given by --set alone")
    parser.add_argument("--seed", type=int, help="override params.yaml seed")
    parser.add_argument("--list", action="store_true", help="list the recipes and exit")
    parser.add_argument("--table", action="store_true", help="print the measured recipes as Markdown")
    parser.add_argument("--out", type=Path, default=ROOT / "reports/bench/recipes.jsonl")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.table:
        print(markdown_table([json.loads(line) for line in args.out.read_text().splitlines()]))
        return 0
    if args.list:
        for name, over in RECIPES.items():
            print(f"{name}: {over}")
        return 0
    import yaml

    extra = {}
    for item in args.set:
        key, _, value = item.partition("=")
        extra[key.removeprefix("train.")] = yaml.safe_load(value)
    unknown = [name for name in args.recipe if name not in RECIPES]
    if unknown:
        parser.error(
            f"unknown recipe {', '.join(unknown)} (--list shows them); an ad-hoc one is "
            "--name NAME with --set train.KEY=VALUE on params.yaml's train section"
        )
    todo = [(name, RECIPES[name]) for name in args.recipe]
    if args.name:
        todo.append((args.name, {}))
    params = load_params(ROOT / "params.yaml")
    seed = params.seed if args.seed is None else args.seed
    names, train_rows, val_rows, _ = train_val_rows(params, ROOT)
    manifest = read_manifest(ROOT / PREPARED_DIR / MANIFEST_NAME)
    usable = usable_rows(manifest, read_quarantine(ROOT / QUARANTINE_CSV))
    test_rows = usable[usable["split"] == "test"]
    done = {}
    if args.out.is_file():
        for line in args.out.read_text().splitlines():
            record = json.loads(line)
            done[record["key"]] = record
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name, over in todo:
        merged = {**params.train.model_dump(), "device": "cpu"}
        for key, value in {**over, **extra}.items():
            merged[key] = {**merged[key], **value} if isinstance(value, dict) else value
        train = TrainParams.model_validate(merged)
        key = settings_key(train, seed)
        if key in done:
            log.info("%s: already measured (%s)", name, key)
            continue
        start = time.perf_counter()
        data = load_training_data(train_rows, val_rows, ROOT / PREPARED_DIR, names, train)
        result = train_model(data, names, train, seed)
        seconds = time.perf_counter() - start
        test_set = InspectionImages(
            test_rows,
            ROOT / PREPARED_DIR,
            names,
            data.preprocessing,
            train.image_size,
            data.preprocessing.channels,
        )
        setup = select_device("cpu")
        test = evaluate(result.model, DataLoader(test_set, batch_size=128), setup, len(names))
        sel = result.selected
        record = {
            "key": key,
            "recipe": name,
            "overrides": {**over, **extra},
            "seed": seed,
            "seconds": round(seconds, 1),
            "threads": torch.get_num_threads(),
            "selected_epoch": result.selected_epoch,
            "epochs": len(result.history),
            "val_accuracy": round(sel["val_accuracy"], 4),
            "val_macro_recall": round(sel["val_macro_recall"], 4),
            "test_accuracy": round(test["accuracy"], 4),
            "test_macro_recall": round(test["macro_recall"], 4),
            "test_per_class_recall": dict(
                zip(names, [round(r, 4) for r in test["per_class_recall"]], strict=True)
            ),
            **{f"test_{k}": round(v, 4) for k, v in rates(test["confusion"], names).items()},
            "test_confusion": test["confusion"],
            "history": [
                {
                    k: round(v, 4) if isinstance(v, float) else v
                    for k, v in row.items()
                    if not k.startswith("val_recall")
                }
                for row in result.history
            ],
        }
        with args.out.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        print(
            f"{name}: {seconds:.0f} s, epoch {result.selected_epoch}/{len(result.history)}, val acc "
            f"{record['val_accuracy']:.4f} mr {record['val_macro_recall']:.4f} | test acc "
            f"{record['test_accuracy']:.4f} mr {record['test_macro_recall']:.4f} "
            f"esc {record.get('test_escape_defective', float('nan')):.4f} "
            f"ovk {record.get('test_overkill', float('nan')):.4f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
