"""The prepare stage (synermix.stages.prepare) on a folder source: a rerun writes the same bytes.
What the preparation itself does (manifest, splits, refusals): tests/test_prepare.py."""

import hashlib
from pathlib import Path

from synermix.paths import PREPARE_SUMMARY, PREPARED_DIR
from synermix.stages.prepare import run_prepare

# no integration mark: it trains nothing, starts no server, shells out to nothing


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_rerun_gives_byte_identical_outputs(tmp_path, make_dataset, make_params):
    make_dataset(mode="RGB")
    params = make_params(data={"source": f"folder:{tmp_path / 'photos'}", "image_size": 24})
    run_prepare(params, tmp_path)
    first = tree_digest(tmp_path / PREPARED_DIR)
    summary = (tmp_path / PREPARE_SUMMARY).read_bytes()
    run_prepare(params, tmp_path)
    assert tree_digest(tmp_path / PREPARED_DIR) == first
    assert (tmp_path / PREPARE_SUMMARY).read_bytes() == summary
