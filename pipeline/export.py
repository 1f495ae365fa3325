"""DVC stage `export`: models/model -> models/onnx/model.onnx, parity-checked against PyTorch."""

from synermix.cli import setup_logging
from synermix.config import load_params
from synermix.errors import exit_on_user_error
from synermix.paths import PARAMS_FILE
from synermix.progress import stage_clock
from synermix.stages.export import run_export


@exit_on_user_error
def main() -> None:
    setup_logging()
    with stage_clock("export"):
        run_export(load_params(PARAMS_FILE))


if __name__ == "__main__":
    main()
