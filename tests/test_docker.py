"""No Docker engine runs here: check the images and the compose stack statically.

What each Dockerfile copies exists (and .dockerignore keeps it); each default command is a
console script whose subcommand and flags the real CLI parsers accept (synermix, dvc, mlflow);
compose.yaml's services, builds and dependencies hang together; the serving images install
neither the training stack nor the wrong onnxruntime; versions agree with requirements.lock.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib.metadata
import importlib.util
import json
import re
import shlex
from functools import cache
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from .helpers import REPO_ROOT

DOCKER = REPO_ROOT / "docker"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
COMPOSE = DOCKER / "compose.yaml"
LOCK = REPO_ROOT / "requirements.lock"
SERVING = [DOCKER / "serve.Dockerfile", DOCKER / "serve-cpu.Dockerfile"]
#: gigabytes of training stack that a serving image must not carry
TRAINING_ONLY = {"torch", "torchvision", "dvc", "optuna", "great-expectations", "triton"}
CONSOLE_SCRIPTS = {"synermix", "synermix-mlflow-users", "dvc", "mlflow"}


def _load_lock_pins():
    spec = importlib.util.spec_from_file_location("lock_pins", DOCKER / "lock_pins.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lock_pins = _load_lock_pins()
canonical = lock_pins.canonical


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """``(KEYWORD, arguments)`` per instruction: comments dropped, continuation lines joined."""
    joined, pending = [], ""
    for line in dockerfile.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    result = []
    for text in joined:
        keyword, _, arguments = text.strip().partition(" ")
        result.append((keyword.upper(), arguments.strip()))
    return result


def command_words(arguments: str) -> list[str]:
    """An ENTRYPOINT/CMD's words: exec form (JSON) or shell form."""
    return json.loads(arguments) if arguments.startswith("[") else shlex.split(arguments)


def last(dockerfile: Path, keyword: str) -> list[str]:
    found = [arguments for kw, arguments in instructions(dockerfile) if kw == keyword]
    return command_words(found[-1]) if found else []


def default_command(dockerfile: Path) -> list[str]:
    """What ``docker run IMAGE`` runs: ENTRYPOINT followed by CMD."""
    return last(dockerfile, "ENTRYPOINT") + last(dockerfile, "CMD")


def run_lines(dockerfile: Path) -> list[str]:
    return [arguments for keyword, arguments in instructions(dockerfile) if keyword == "RUN"]


def lock_pin_specs(dockerfile: Path) -> list[list[str]]:
    """The package specs of each ``lock_pins.py LOCK SPEC...`` call in the RUN lines."""
    calls = []
    for run in run_lines(dockerfile):
        for match in re.finditer(r"lock_pins\.py\s+\S+\s+([^>&;|]+)", run):
            calls.append(shlex.split(match.group(1)))
    return calls


def explicit_requirements(dockerfile: Path) -> list[str]:
    """Package arguments of ``pip install`` in the RUN lines (options, files and ``.`` dropped)."""
    found = []
    for run in run_lines(dockerfile):
        for segment in re.split(r"&&|;|\|", run):
            words = shlex.split(segment)
            if "pip" not in words or "install" not in words:
                continue
            rest, skip = words[words.index("install") + 1 :], False
            for word in rest:
                if skip:
                    skip = False
                elif word in {"-c", "-r", "--constraint", "--requirement", "-e", "--editable"}:
                    skip = True
                elif not word.startswith("-") and word not in {".", ">"}:
                    found.append(word)
    return found


def installed_names(dockerfile: Path) -> set[str]:
    """Canonical names of everything a Dockerfile asks pip for (before dependencies)."""
    names = {canonical(Requirement(word).name) for word in explicit_requirements(dockerfile)}
    for specs in lock_pin_specs(dockerfile):
        for install, _ in lock_pins.expand_specs(specs, DOCKER):
            names.add(canonical(Requirement(install).name))
    return names


@cache
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def service_dockerfile(service: dict) -> Path | None:
    build = service.get("build")
    if build is None:
        return None
    if isinstance(build, str):
        return COMPOSE.parent / build / "Dockerfile"
    return COMPOSE.parent / build.get("context", ".") / build.get("dockerfile", "Dockerfile")


def service_command(service: dict) -> list[str]:
    """What a built service runs: its entrypoint (or the image's), then its command (or the image's)."""
    dockerfile = service_dockerfile(service)

    def words(value):
        return shlex.split(value) if isinstance(value, str) else [str(word) for word in value]

    entrypoint = words(service["entrypoint"]) if "entrypoint" in service else last(dockerfile, "ENTRYPOINT")
    command = words(service["command"]) if "command" in service else last(dockerfile, "CMD")
    return entrypoint + command


def commands_run() -> list[tuple[str, list[str]]]:
    """``(where, argv)`` for every command the images and the built compose services run."""
    found = [(path.name, default_command(path)) for path in DOCKERFILES]
    for name, service in compose()["services"].items():
        if service.get("build"):
            found.append((f"compose.yaml:{name}", service_command(service)))
    return found


# --- the CLIs the commands run -------------------------------------------------------------


def argparse_subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def argparse_options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {option: action for action in parser._actions for option in action.option_strings}


def check_argparse_command(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """What ``argv`` (after the program name) uses that ``parser`` lacks."""
    problems, words = [], list(argv)
    top_options = argparse_options(parser)
    while words and words[0].startswith("-"):  # options before the subcommand
        option = words.pop(0).split("=", 1)[0]
        if option not in top_options:
            problems.append(f"unknown option {option}")
        elif top_options[option].nargs != 0 and "=" not in option and words:
            words.pop(0)
    subcommands = argparse_subcommands(parser)
    if not words:
        return [*problems, "no subcommand"]
    if words[0] not in subcommands:
        return [*problems, f"no subcommand {words[0]!r} (it has: {', '.join(sorted(subcommands))})"]
    options = argparse_options(subcommands[words[0]])
    flags = [word.split("=", 1)[0] for word in words[1:] if re.match(r"-[^\d]", word)]
    return problems + [f"{words[0]} has no option {flag}" for flag in flags if flag not in options]


def check_mlflow_command(argv: list[str]) -> list[str]:
    from mlflow.cli import cli

    if not argv or argv[0] not in cli.commands:
        return [f"no mlflow subcommand {argv[:1]}"]
    command = cli.commands[argv[0]]
    options = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
    return [
        f"mlflow {argv[0]} has no option {word}"
        for word in argv[1:]
        if word.startswith("-") and word.split("=", 1)[0] not in options
    ]


def check_command(argv: list[str]) -> list[str]:
    program, rest = argv[0], argv[1:]
    if program == "synermix":
        from synermix.cli import _parser

        return check_argparse_command(_parser(), rest)
    if program == "synermix-mlflow-users":
        from synermix.mlflow_auth import _parser as users_parser

        return check_argparse_command(users_parser(), rest)
    if program == "dvc":
        from dvc.cli.parser import get_main_parser

        return check_argparse_command(get_main_parser(), rest)
    if program == "mlflow":
        return check_mlflow_command(rest)
    return [f"{program} is not one of the project's console scripts"]


# --- Dockerfiles ---------------------------------------------------------------------------


def test_there_are_training_and_serving_images():
    names = {path.name for path in DOCKERFILES}
    assert {"train.Dockerfile", "serve.Dockerfile", "serve-cpu.Dockerfile", "mlflow.Dockerfile"} <= names


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copied_files_exist(dockerfile):
    for keyword, arguments in instructions(dockerfile):
        words = arguments.split()
        if keyword not in {"COPY", "ADD"} or any(word.startswith("--from") for word in words):
            continue
        for source in [word for word in words if not word.startswith("--")][:-1]:
            if source != ".":
                assert (REPO_ROOT / source).exists(), f"{dockerfile.name} copies missing {source}"


def dockerignore_patterns() -> list[str]:
    lines = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(path: str) -> bool:
    """Whether .dockerignore leaves ``path`` (or a folder above it) out of the build context:
    a pattern matches from the context root, ``**/`` at any depth, the last match decides."""
    parts = Path(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    outcome = False
    for line in dockerignore_patterns():
        pattern = line.removeprefix("!").strip("/")
        if pattern.startswith("**/"):
            subjects = ["/".join(Path(prefix).parts[i:]) for prefix in prefixes for i in range(len(parts))]
            pattern = pattern[3:]
        else:
            subjects = prefixes
        if any(fnmatch.fnmatchcase(subject, pattern) for subject in subjects if subject):
            outcome = not line.startswith("!")
    return outcome


def test_dockerignore_keeps_what_the_images_copy_and_drops_local_state():
    copied = {
        source
        for dockerfile in DOCKERFILES
        for keyword, arguments in instructions(dockerfile)
        if keyword == "COPY"
        for source in arguments.split()[:-1]
        if source != "." and not source.startswith("--")
    }
    # the training image copies `.` and runs dvc repro, which needs these
    needed = copied | {".git", "dvc.yaml", "dvc.lock", "params.yaml", "pipeline", ".dvc/config", "tuning"}
    assert not [path for path in sorted(needed) if ignored(path)]
    for local in (
        ".venv",
        "mlruns",
        "mlflow.db",
        ".dvc/cache",
        ".dvc/config.local",
        "checkpoints",
        "models/onnx",
    ):
        assert ignored(local), f".dockerignore should leave out {local}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_default_command_is_a_console_script(dockerfile):
    command = default_command(dockerfile)
    assert command and command[0] in CONSOLE_SCRIPTS, f"{dockerfile.name} runs {command}"
    scripts = {entry.name for entry in importlib.metadata.entry_points(group="console_scripts")}
    assert command[0] in scripts


@pytest.mark.parametrize("where, argv", commands_run(), ids=[where for where, _ in commands_run()])
def test_commands_exist_in_the_real_cli(where, argv):
    """Subcommand and every option, checked against synermix.cli._parser(), dvc's parser and
    mlflow's click commands. A missing subcommand (``synermix serve``) fails, never skips."""
    assert argv and argv[0] in CONSOLE_SCRIPTS, f"{where} runs {argv}"
    assert check_command(argv) == [], f"{where}: {shlex.join(argv)}"


@pytest.mark.parametrize("dockerfile", SERVING, ids=lambda p: p.name)
def test_serving_images_run_synermix_serve_as_a_user_with_a_readiness_check(dockerfile):
    assert default_command(dockerfile)[:2] == ["synermix", "serve"]
    assert "/models/bundle" in default_command(dockerfile)
    user = last(dockerfile, "USER")
    assert user and user[0] not in {"root", "0"}
    assert last(dockerfile, "EXPOSE") == ["8080"]
    healthcheck = " ".join(
        arguments for keyword, arguments in instructions(dockerfile) if keyword == "HEALTHCHECK"
    )
    assert "127.0.0.1:8080/readyz" in healthcheck


@pytest.mark.parametrize("dockerfile", SERVING, ids=lambda p: p.name)
def test_serving_images_leave_out_the_training_stack(dockerfile):
    assert not installed_names(dockerfile) & TRAINING_ONLY
    assert any(re.search(r"pip install --no-deps \.", run) for run in run_lines(dockerfile))


@pytest.mark.parametrize("dockerfile", SERVING, ids=lambda p: p.name)
def test_serving_dependencies_do_not_pull_in_the_training_stack(dockerfile):
    """The serving packages' dependency closure, from the metadata of the locked environment
    this suite runs in (a package not installed here is taken as it stands)."""
    seen, todo = set(), list(installed_names(dockerfile))
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for line in requires:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(canonical(requirement.name))
    assert not seen & TRAINING_ONLY


def test_the_cpu_image_installs_onnxruntime_and_the_gpu_image_onnxruntime_gpu():
    """One of the two only: they share the ``onnxruntime`` import folder."""
    cpu = installed_names(DOCKER / "serve-cpu.Dockerfile")
    gpu = installed_names(DOCKER / "serve.Dockerfile")
    assert "onnxruntime" in cpu and "onnxruntime-gpu" not in cpu
    assert "onnxruntime-gpu" in gpu and "onnxruntime" not in gpu


def test_the_gpu_image_has_the_cuda_major_of_the_locked_onnxruntime_gpu():
    """onnxruntime-gpu wheels are built for one CUDA major (1.31.1 on PyPI: CUDA 13); on another
    the CUDA provider fails to load and serving silently runs on CPU."""
    base = last(DOCKER / "serve.Dockerfile", "FROM")[0]
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", base)
    assert match, base
    try:
        from onnxruntime.capi import build_and_package_info as info
    except ImportError:
        pytest.skip("onnxruntime-gpu is not installed here")
    if (
        info.package_name != "onnxruntime-gpu"
        or info.__version__ != lock_pins.read_lock(LOCK)["onnxruntime-gpu"]
    ):
        pytest.skip("the onnxruntime here is not the locked onnxruntime-gpu")
    assert match.group(1) == info.cuda_version.split(".")[0]


# --- versions ------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_explicit_pins_agree_with_the_lock(dockerfile):
    locked = lock_pins.read_lock(LOCK)
    for word in explicit_requirements(dockerfile):
        requirement = Requirement(word)
        name = canonical(requirement.name)
        if name in locked:
            assert requirement.specifier.contains(locked[name]), (
                f"{dockerfile.name}: {word}, lock {locked[name]}"
            )


@pytest.mark.parametrize(
    "dockerfile", [path for path in DOCKERFILES if lock_pin_specs(path)], ids=lambda p: p.name
)
def test_the_lock_pins_every_package_an_image_takes_from_it(dockerfile):
    for specs in lock_pin_specs(dockerfile):
        lock_pins.pinned(LOCK, specs, DOCKER)  # LookupError names what the lock lacks


def test_lock_pins_takes_versions_from_the_lock(tmp_path):
    lock = tmp_path / "requirements.lock"
    lock.write_text(
        "# header\nPyYAML==6.0.4\nprometheus_client==0.26.0\nonnxruntime-gpu==1.31.1\npsycopg==3.3.9\n"
    )
    (tmp_path / "names.txt").write_text("# comment\npyyaml\n\nprometheus-client  # trailing\n")
    specs = ["@names.txt", "onnxruntime=onnxruntime-gpu", "psycopg[binary]"]
    assert lock_pins.pinned(lock, specs, tmp_path) == [
        "pyyaml==6.0.4",
        "prometheus-client==0.26.0",
        "onnxruntime==1.31.1",
        "psycopg[binary]==3.3.9",
    ]
    with pytest.raises(LookupError, match="torch, numpy"):
        lock_pins.pinned(lock, ["torch", "pyyaml", "numpy"], tmp_path)
    assert lock_pins.main([str(lock), "torch"]) == 1


# --- compose -------------------------------------------------------------------------------


def test_compose_builds_existing_dockerfiles_and_depends_on_real_services():
    services = compose()["services"]
    assert {"postgres", "minio", "minio-setup", "mlflow", "serve", "train"} <= set(services)
    for name, service in services.items():
        dockerfile = service_dockerfile(service)
        assert dockerfile is None or dockerfile.is_file(), f"{name} builds missing {dockerfile}"
        assert "image" in service or dockerfile, f"{name} has neither image nor build"
        for dependency in service.get("depends_on", []):
            assert dependency in services, f"{name} depends on unknown service {dependency}"
        for key in ("command", "entrypoint"):  # the compose schema takes strings only (YAML: 5000 is an int)
            value = service.get(key, [])
            assert isinstance(value, str) or all(isinstance(word, str) for word in value), f"{name}.{key}"


def test_compose_publishes_ports_on_loopback_only():
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"


def test_compose_serves_the_production_alias_from_the_stacks_mlflow():
    services = compose()["services"]
    serve = services["serve"]
    assert service_dockerfile(serve).name == "serve-cpu.Dockerfile"
    assert serve["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert service_command(serve)[:4] == ["synermix", "serve", "--model", "models:/synermix@production"]
    assert serve["depends_on"]["mlflow-users"]["condition"] == "service_completed_successfully"
    assert services["mlflow-users"]["depends_on"]["mlflow"]["condition"] == "service_healthy"
    assert services["train"]["profiles"] == ["train"]
    assert services["train"]["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    # containers call the server by its service name: MLflow's host check must let that in
    mlflow = service_command(services["mlflow"])
    allowed = mlflow[mlflow.index("--allowed-hosts") + 1]
    assert "mlflow:5000" in allowed


def _default(value: str) -> str:
    """``${VAR:-default}`` -> default (what compose uses when VAR is unset)."""
    found = re.fullmatch(r"\$\{[A-Z_]+:-([^}]*)\}", value)
    return found.group(1) if found else value


def test_compose_runs_mlflow_with_auth_and_the_release_roles():
    """The registry's writes are limited by role: MLflow's basic auth plus the synermix policy;
    the line reads as a read-only user, training writes as a team user (not a release one),
    and the one-shot setup creates every user a service signs in as."""
    services = compose()["services"]
    mlflow = services["mlflow"]
    command = service_command(mlflow)
    assert command[command.index("--app-name") + 1] == "synermix-auth"
    names = {e.name for e in importlib.metadata.entry_points(group="mlflow.app")}
    assert "synermix-auth" in names
    env = {k: _default(str(v)) for k, v in mlflow["environment"].items()}
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"] and env["MLFLOW_FLASK_SERVER_SECRET_KEY"]
    release = set(env["SYNERMIX_RELEASE_USERS"].split(","))
    read_only = set(env["SYNERMIX_READ_ONLY_USERS"].split(","))
    serve_user = services["serve"]["environment"]["MLFLOW_TRACKING_USERNAME"]
    train_user = services["train"]["environment"]["MLFLOW_TRACKING_USERNAME"]
    assert serve_user in read_only and train_user not in release | read_only
    setup = service_command(services["mlflow-users"])
    created = {spec.split("=")[0] for spec in setup[2:]}
    assert {serve_user, train_user} | release <= created
    setup_env = services["mlflow-users"]["environment"]
    assert all(spec.split("=")[1] in setup_env for spec in setup[2:])
    ini = (DOCKER / "mlflow-auth.ini").read_text()
    assert "database_uri = sqlite:////var/lib/mlflow-auth/" in ini
    assert any(v.endswith(":/var/lib/mlflow-auth") for v in mlflow["volumes"])
    assert "admin_password" not in ini.replace("# ", "")


def test_training_image_shows_a_two_node_torchrun_line_that_parses():
    """The training image's header shows the multi-node command (issue 21): a torchrun line
    for two nodes whose rank entry point exists and takes the flags it is given."""
    header = [
        line.lstrip("#").strip().rstrip("\\").strip()
        for line in (DOCKER / "train.Dockerfile").read_text().splitlines()
        if line.startswith("#")
    ]
    start = next(i for i, line in enumerate(header) if line.startswith("torchrun "))
    words = shlex.split(" ".join(header[start : start + 3]))
    assert words[words.index("--nnodes") + 1] == "2" and "--rdzv_endpoint" in words
    module = words[words.index("-m") + 1]
    assert module == "synermix.stages.train" and importlib.util.find_spec(module) is not None
    from synermix.stages.train import main

    with pytest.raises(SystemExit) as shown:
        main([*words[words.index("-m") + 2 :], "--help"])
    assert shown.value.code == 0
