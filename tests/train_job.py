"""A training process for the kill-and-resume test: trains, and after ``pause_after`` epochs
sleeps (its checkpoint already written) so the test can kill it with SIGKILL."""

import sys
import time
from pathlib import Path

from synermix.config import TrainParams
from synermix.data.manifest import read_manifest
from synermix.training import load_training_data, train_model

TRAIN = {"image_size": 32, "epochs": 4, "batch_size": 16, "warmup_epochs": 0.5, "lr": 0.02}


def rows(prepared: Path):
    manifest = read_manifest(prepared / "manifest.csv")
    manifest = manifest[manifest["label"].isin(["functional", "defective"])]
    return manifest[manifest["split"] == "train"], manifest[manifest["split"] == "val"]


def main(prepared: str, checkpoint: str, pause_after: int) -> None:
    train, val = rows(Path(prepared))

    def pause(row):
        if row["epoch"] == pause_after:
            print("PAUSED", flush=True)
            time.sleep(600)

    names, params = ["defective", "functional"], TrainParams(**TRAIN)
    train_model(
        load_training_data(train, val, Path(prepared), names, params),
        names,
        params,
        7,
        checkpoint_path=Path(checkpoint),
        on_epoch_end=pause,
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
