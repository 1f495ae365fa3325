"""Drift monitor benchmark: false alarms on unchanged windows, images needed per shift.

ELPV test images (never seen by training, tuning or the reference profile, which is the
val split) run through the exported model as the service scores them, unchanged and with
synthetic shifts: brightness -30 %, Gaussian blur sigma 2, a 5 degree rotation, and a
tenth of the images from another domain (Fashion-MNIST, Debian's dataset-fashion-mnist;
random noise images when it is absent). Windows are seeded draws without replacement from
the 393 records of each condition.

    dvc repro export                         # the model with its profile
    python bench/monitor_drift.py            # the tables for docs/benchmarks.md

Targets (issue 20): false alarm rate <= 1 in 20 over at least 20 unchanged windows at the
default significance, and <= 200 images to raise the brightness shift's alarm.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from synermix.config import load_params
from synermix.data.manifest import read_manifest
from synermix.inference import Classifier
from synermix.monitor import Window, check_window, records_from_images
from synermix.paths import MANIFEST, ONNX_MODEL, PREPARED_DIR
from synermix.profile import profile_from_metadata

FASHION = Path("/usr/share/datasets/fashion-mnist")


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def other_domain(count: int, seed: int) -> list[bytes]:
    """Images from another domain: Fashion-MNIST when installed, else uniform noise."""
    rng = np.random.default_rng(seed)
    if (FASHION / "t10k-images-idx3-ubyte.gz").is_file():
        from synermix.data.sources import read_idx

        images = read_idx(FASHION / "t10k-images-idx3-ubyte.gz")
        picks = rng.choice(len(images), count, replace=False)
        return [png(Image.fromarray(images[i]).resize((300, 300))) for i in picks]
    return [png(Image.fromarray(rng.integers(0, 256, (300, 300), dtype=np.uint8))) for _ in range(count)]


SHIFTS = {
    "brightness -30 %": lambda im: ImageEnhance.Brightness(im).enhance(0.7),
    "Gaussian blur sigma 2": lambda im: im.filter(ImageFilter.GaussianBlur(2)),
    "rotation 5 degrees": lambda im: im.rotate(5, resample=Image.Resampling.BILINEAR),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unchanged-windows", type=int, default=100)
    parser.add_argument("--shift-windows", type=int, default=20)
    parser.add_argument("--window", type=int, default=200)
    parser.add_argument("--sizes", default="10,20,30,50,75,100,150,200")
    parser.add_argument("--unchanged-sizes", default="50,100,200", help="other window sizes for false alarms")
    args = parser.parse_args()
    params = load_params()
    settings = params.monitor
    classifier = Classifier(ONNX_MODEL, provider="cpu", threads=2)
    profile = profile_from_metadata(classifier.session.get_modelmeta().custom_metadata_map, str(ONNX_MODEL))
    manifest = read_manifest(MANIFEST)
    rows = manifest[manifest["split"] == "test"]
    originals = [Image.open(PREPARED_DIR / p) for p in rows["path"]]
    about = {"weights_sha256": profile.weights_sha256, "sha256": "bench"}

    def records_of(images: list[bytes]) -> list[dict]:
        records, bad = records_from_images(classifier, [(str(i), b) for i, b in enumerate(images)], about)
        assert not bad
        for i, r in enumerate(records):  # a stable order for select-free windows
            r["at"] = f"{i:06d}"
        return records

    started = time.perf_counter()
    conditions = {"unchanged": records_of([png(im) for im in originals])}
    for name, shift in SHIFTS.items():
        conditions[name] = records_of([png(shift(im)) for im in originals])
    foreign = records_of(other_domain(len(originals), params.seed))
    scored = time.perf_counter() - started
    rng = np.random.default_rng(params.seed)
    base = conditions["unchanged"]

    def window(records: list[dict], n: int, foreign_share: float = 0.0) -> list[dict]:
        k = round(n * foreign_share)
        picked = [records[i] for i in rng.choice(len(records), n - k, replace=False)]
        picked += [foreign[i] for i in rng.choice(len(foreign), k, replace=False)]
        return picked

    def alarm(records: list[dict], seed: int) -> dict:
        small = settings.model_copy(update={"min_records": min(settings.min_records, len(records))})
        return check_window(profile, Window(records), small, seed=seed)

    started = time.perf_counter()
    false = [alarm(window(base, args.window), 1000 + i) for i in range(args.unchanged_windows)]
    per_window = (time.perf_counter() - started) / args.unchanged_windows
    alarms = sum(v["drift"] for v in false)
    print(
        f"# model weights {profile.weights_sha256[:12]}, reference {profile.statistics_images} "
        f"training + val images (statistics), {profile.images} val images (features, mix); "
        f"{len(base)} test images per condition (scored in {scored:.0f} s); alpha {settings.alpha}, "
        f"{settings.permutations} permutations; {per_window:.2f} s per window check"
    )
    print()
    print(
        f"Unchanged windows of {args.window}: {alarms} alarm(s) in {args.unchanged_windows} "
        f"(false alarm rate {alarms / args.unchanged_windows:.3f}; target <= 0.05)"
    )

    def breakdown(verdicts: list[dict]) -> None:
        tests: dict[str, int] = {}
        for v in verdicts:
            for a in v["alarms"]:
                key = a.split(" p=")[0]
                tests[key] = tests.get(key, 0) + 1
        for key, count in sorted(tests.items()):
            print(f"  - {key}: {count}")

    breakdown(false)
    for n in (int(x) for x in args.unchanged_sizes.split(",")):
        if n == args.window:
            continue
        verdicts = [alarm(window(base, n), 3000 + i) for i in range(args.unchanged_windows)]
        hits = sum(v["drift"] for v in verdicts)
        print(
            f"Unchanged windows of {n}: {hits} alarm(s) in {args.unchanged_windows} "
            f"({hits / args.unchanged_windows:.3f})"
        )
        breakdown(verdicts)
    print()
    sizes = [int(s) for s in args.sizes.split(",")]
    print("| shift | " + " | ".join(f"{n} images" for n in sizes) + " | fewest images alarmed in >= 90 % |")
    print("|---|" + "---:|" * (len(sizes) + 1))
    cases = [(name, conditions[name], 0.0) for name in SHIFTS] + [("a tenth from another domain", base, 0.1)]
    for name, records, share in cases:
        rates = []
        for n in sizes:
            hits = sum(alarm(window(records, n, share), 2000 + j)["drift"] for j in range(args.shift_windows))
            rates.append(hits / args.shift_windows)
        fewest = next((n for n, r in zip(sizes, rates, strict=True) if r >= 0.9), None)
        cells = " | ".join(f"{r:.2f}" for r in rates)
        print(f"| {name} | {cells} | {fewest if fewest else f'> {sizes[-1]}'} |")
    print()
    print(f"(share of {args.shift_windows} seeded windows that raised an alarm, per window size)")


if __name__ == "__main__":
    main()
