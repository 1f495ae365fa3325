"""DVC stage `evaluate`: test metrics and release gates -> reports/evaluation*; exit 1 on a failed gate."""

from synermix.cli import setup_logging
from synermix.config import load_params
from synermix.errors import exit_on_user_error
from synermix.paths import PARAMS_FILE
from synermix.progress import stage_clock
from synermix.stages.evaluate import run_evaluate


@exit_on_user_error
def main() -> None:
    setup_logging()
    with stage_clock("evaluate"):
        run_evaluate(load_params(PARAMS_FILE))


if __name__ == "__main__":
    main()
