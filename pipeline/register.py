"""DVC stage `register`: a model that passed its gates becomes a registry version with @candidate."""

from synermix.cli import setup_logging
from synermix.config import load_params
from synermix.errors import exit_on_user_error
from synermix.paths import PARAMS_FILE
from synermix.progress import stage_clock
from synermix.stages.register import run_register


@exit_on_user_error
def main() -> None:
    setup_logging()
    with stage_clock("register"):
        run_register(load_params(PARAMS_FILE))


if __name__ == "__main__":
    main()
