"""The per-class sample grid of the validate stage."""

import pandas as pd
import pytest

from synermix.data.samples import SAMPLES_PER_CLASS, pick_samples, usable_images


def manifest() -> pd.DataFrame:
    rows = [
        {
            "path": f"images/{label}/{i}.png",
            "source_path": f"{label}/{i}.png",
            "label": label,
            "decodable": i != 0,  # image 0 of each class cannot be decoded
            "content_sha256": f"{(i * 7919) % 101:04d}",
        }
        for label, count in (("crack", 12), ("ok", 3))
        for i in range(count)
    ]
    return pd.DataFrame(rows)


def test_the_sample_leaves_out_bad_and_quarantined_images_and_depends_on_content_only():
    frame = manifest()
    usable = usable_images(frame, {"crack/5.png"})
    assert "crack/0.png" not in set(usable["source_path"]) and "crack/5.png" not in set(usable["source_path"])
    picked = pick_samples(usable)
    assert picked["label"].value_counts().to_dict() == {"crack": SAMPLES_PER_CLASS, "ok": 2}
    crack = picked[picked["label"] == "crack"]["content_sha256"].tolist()
    assert crack == sorted(crack)  # the lowest content hashes: no file name or seed decides
    shuffled = pick_samples(usable.sample(frac=1.0, random_state=3))
    assert shuffled["path"].tolist() == picked["path"].tolist()


@pytest.mark.integration  # runs prepare and validate
def test_validate_writes_the_grid_and_links_it(tmp_path, make_dataset, make_params, monkeypatch):
    from synermix.paths import VALIDATION_MD, VALIDATION_SAMPLES
    from synermix.stages.prepare import run_prepare
    from synermix.stages.validate import run_validate

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    params = make_params(data={"source": f"folder:{make_dataset({'crack': 20, 'ok': 20})}"})
    run_prepare(params, tmp_path)
    run_validate(params, tmp_path)
    assert (tmp_path / VALIDATION_SAMPLES).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (
        (tmp_path / VALIDATION_MD)
        .read_text()
        .endswith("## Samples per class\n\n![samples per class](validation/samples.png)\n")
    )
