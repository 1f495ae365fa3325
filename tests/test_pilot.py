"""The pilot line's labelled photos (synermix.pilot); pilot-eval on a registered model runs in
the rollout flow of tests/test_rollout.py."""

import pytest

from synermix import pilot as pilot_line
from synermix.errors import UserError

from .helpers import noise_image

# marked integration as it was (module-wide) before the tests were split by module, so
# `make test-unit` runs the same tests as before
pytestmark = pytest.mark.integration


def test_pilot_eval_refuses_unlabelled_or_unknown_folders(tmp_path):
    names = ["crack", "ok"]
    (tmp_path / "line" / "crack").mkdir(parents=True)
    noise_image(1).save(tmp_path / "line" / "crack" / "a.png")
    assert pilot_line.labelled_images(tmp_path / "line", names) == [(tmp_path / "line/crack/a.png", "crack")]
    noise_image(2).save(tmp_path / "line" / "loose.png")
    with pytest.raises(UserError, match="carry no label"):
        pilot_line.labelled_images(tmp_path / "line", names)
    (tmp_path / "line" / "loose.png").unlink()
    (tmp_path / "line" / "dent").mkdir()
    with pytest.raises(UserError, match="dent are not classes of this model"):
        pilot_line.labelled_images(tmp_path / "line", names)
    with pytest.raises(UserError, match="no such folder"):
        pilot_line.labelled_images(tmp_path / "missing", names)
