"""DVC stage `validate`: Great Expectations on the manifest -> reports + quarantine list."""

from synermix.cli import setup_logging
from synermix.config import load_params
from synermix.errors import exit_on_user_error
from synermix.paths import PARAMS_FILE
from synermix.progress import stage_clock
from synermix.stages.validate import run_validate


@exit_on_user_error
def main() -> None:
    setup_logging()
    with stage_clock("validate"):
        run_validate(load_params(PARAMS_FILE))


if __name__ == "__main__":
    main()
