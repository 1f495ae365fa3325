"""DVC stage `train`: SynerMix training on the usable train split -> models/model + reports."""

from synermix.cli import setup_logging
from synermix.config import load_params
from synermix.errors import exit_on_user_error
from synermix.paths import PARAMS_FILE
from synermix.progress import stage_clock
from synermix.stages.train import run_train


@exit_on_user_error
def main() -> None:
    setup_logging()
    with stage_clock("train"):
        run_train(load_params(PARAMS_FILE))


if __name__ == "__main__":
    main()
