"""The service's watchers over real HTTP (uvicorn on loopback): monitoring records with their
slice keys, the live drift gauges, a swap the golden set refuses under live load with no
failed request, and the review queue."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import pytest

from synermix.config import MonitorParams
from synermix.inference import Classifier
from synermix.watch import golden_images, score_golden

from .helpers.monitored import cell, monitored_model
from .test_serve import serving, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("watched")
    # b: a's network with its class scores moved one place: it answers another class everywhere
    return {
        "a": monitored_model(root / "a.onnx", seed=0),
        "b": monitored_model(root / "b.onnx", seed=0, roll=1),
    }


def test_records_carry_slices_and_feed_the_live_drift_gauges(models, tmp_path):
    records = tmp_path / "logs" / "records.jsonl"
    monitor = MonitorParams(min_records=20, window=40, permutations=99)
    with serving(str(models["a"]), provider="cpu", records=records, monitor_every=20, monitor=monitor) as (
        client,
        service,
    ):
        for i in range(30):
            camera = {"X-Camera-Id": "cam-1\x07"} if i % 2 else {"X-Line-Id": "L2"}
            code, _ = client.request(
                "POST", "/v1/predict", cell(30_000 + i), {"Content-Type": "image/png", **camera}
            )
            assert code == 200
        for i in range(30):  # darker: the next live check sees it
            code, _ = client.predict(cell(31_000 + i, brightness=0.6))
            assert code == 200
        service.records.flush()
        service.live.wait_idle()
        wait_for(lambda: service.live.verdict is not None and service.live.verdict["records"] == 40)
        code, metrics = client.request("GET", "/metrics")
        _, about = client.request("GET", "/v1/model")
    lines = [json.loads(line) for line in records.read_text().splitlines()]
    assert len(lines) == 60
    assert lines[1]["slices"] == {"camera": "cam-1?"} and lines[0]["slices"] == {"line": "L2"}
    assert len(lines[0]["embedding"]) == 4 and set(lines[0]["stats"]) >= {"mean", "sharpness"}
    assert lines[0]["weights_sha256"] == f"{1:060d}0000"
    assert 'synermix_drift_p_value{slice="all",test="image mean (KS)"}' in metrics
    assert "synermix_drift_alarm 1.0" in metrics  # 20 dark images of the last 40
    assert 'synermix_monitor_records_total{result="written"} 60.0' in metrics
    assert about["monitoring"]["live_drift"]["verdict"]["drift"] is True
    assert about["monitoring"]["records"]["written"] == 60


def labelled_golden(root: Path, model: Path, n: int = 16) -> Path:
    classifier = Classifier(model, provider="cpu")
    for i in range(n):
        data = cell(40_000 + i)
        label = classifier.class_names[int(classifier.logits(classifier.preprocess(data)[None]).argmax())]
        (root / label).mkdir(parents=True, exist_ok=True)
        (root / label / f"g{i}.png").write_bytes(data)
    return root


def test_a_swap_the_golden_set_refuses_keeps_the_old_model_under_load(models, tmp_path):
    golden = labelled_golden(tmp_path / "golden", models["a"])
    b_accuracy = score_golden(Classifier(models["b"], provider="cpu"), golden_images(golden))["accuracy"]
    assert b_accuracy == 0.0  # so the drop check must refuse b
    live = tmp_path / "live.onnx"
    shutil.copy(models["a"], live)
    with serving(str(live), provider="cpu", poll_seconds=0.1, golden_set=golden, golden_max_drop=0.02) as (
        client,
        service,
    ):
        stop, seen, failures = threading.Event(), [], []

        def hammer() -> None:
            i = 0
            while not stop.is_set():
                try:
                    code, answer = client.predict(cell(50_000 + i % 5))
                except Exception as exc:
                    failures.append(repr(exc))
                    continue
                i += 1
                (seen if code == 200 else failures).append(
                    answer["model"]["sha256"] if code == 200 else answer
                )

        workers = [threading.Thread(target=hammer) for _ in range(3)]
        for w in workers:
            w.start()
        wait_for(lambda: len(seen) > 20)
        shutil.copy(models["b"], tmp_path / "incoming.onnx")
        os.replace(tmp_path / "incoming.onnx", live)
        wait_for(lambda: "golden set" in service.primary.last_error)
        count = len(seen)
        wait_for(lambda: len(seen) > count + 20)
        stop.set()
        for w in workers:
            w.join(timeout=30)
        _, about = client.request("GET", "/v1/model")
        refused = service.metrics.registry.get_sample_value(
            "synermix_model_reloads_total", {"role": "primary", "result": "refused_golden"}
        )
    assert failures == []
    assert len(set(seen)) == 1  # every answer came from a
    assert refused >= 1
    assert "more than serve.golden_max_drop" in about["primary_reload_error"]
    assert about["golden"]["last_check"]["passed"] is False
    assert about["primary"]["golden"]["accuracy"] == 1.0


def test_abstentions_go_to_the_review_queue_once_each(models, tmp_path):
    review = tmp_path / "review"
    with serving(str(models["a"]), provider="cpu", abstain=0.999, review_dir=review) as (client, service):
        for i in range(6):
            assert client.predict(cell(60_000 + i % 3))[0] == 200
        service._review_pool.submit(lambda: None).result()  # the writes queued so far are done
    saved = sorted(p.relative_to(review).as_posix() for p in review.rglob("*.png"))
    assert len(saved) == 3  # three distinct images, each sent twice
    index = [json.loads(line) for line in (review / "review.jsonl").read_text().splitlines()]
    assert len(index) == 3 and {e["reason"] for e in index} == {"abstain"}
    assert all(e["file"].split("/")[0] == e["class"] for e in index)


def test_shadow_disagreements_go_to_the_review_queue(models, tmp_path):
    review = tmp_path / "review"
    options = {"provider": "cpu", "shadow": str(models["b"]), "review_dir": review}
    with serving(str(models["a"]), **options) as (client, _):
        for i in range(4):
            assert client.predict(cell(70_000 + i))[0] == 200
        wait_for(
            lambda: len((review / "review.jsonl").read_text().splitlines()) == 4 if review.is_dir() else False
        )
    index = [json.loads(line) for line in (review / "review.jsonl").read_text().splitlines()]
    assert {e["reason"] for e in index} == {"shadow disagrees"}
    assert all(e["shadow_class"] != e["class"] for e in index)
