"""DVC stage `tune`: Optuna search of beta (and tune.space) -> tuning/best_params.yaml + reports."""

from synermix.cli import setup_logging
from synermix.config import load_params
from synermix.errors import exit_on_user_error
from synermix.paths import PARAMS_FILE
from synermix.progress import stage_clock
from synermix.stages.tune import run_tune


@exit_on_user_error
def main() -> None:
    setup_logging()
    with stage_clock("tune"):
        run_tune(load_params(PARAMS_FILE))


if __name__ == "__main__":
    main()
