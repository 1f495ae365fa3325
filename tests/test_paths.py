"""synermix.paths against dvc.yaml, and each stage's code against its dvc.yaml deps."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from synermix import paths
from synermix.training import TRAINING_CODE

from .helpers import REPO_ROOT

DVC_STAGES = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
SRC = REPO_ROOT / "src"


def declared_outputs(spec: dict) -> set[Path]:
    found = set()
    for key in ("outs", "metrics", "plots"):
        for entry in spec.get(key, []):
            found.add(Path(entry if isinstance(entry, str) else next(iter(entry))))
    return found


def test_every_stage_output_is_named_in_paths_and_the_reverse():
    assert set(paths.STAGE_OUTPUTS) == set(DVC_STAGES)
    for stage, spec in DVC_STAGES.items():
        assert declared_outputs(spec) == set(paths.STAGE_OUTPUTS[stage]), stage
    # every other path in paths.py lies inside a declared output, is the folder of some,
    # or is declared as none
    outputs = {p for group in paths.STAGE_OUTPUTS.values() for p in group}
    constants = [v for k, v in vars(paths).items() if k.isupper() and isinstance(v, Path)]
    constants += [v for k, v in vars(paths).items() if k.endswith(("_TABLES", "_FIGURES"))]
    for value in constants:
        for path in value.values() if isinstance(value, dict) else [value]:
            inside = any(path == out or out in path.parents or path in out.parents for out in outputs)
            assert inside or path in paths.NOT_STAGE_OUTPUTS, f"{path}: no stage declares it"


def _module_file(module: str) -> Path | None:
    base = SRC / module.replace(".", "/")
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _top_level_imports(path: Path, module: str) -> set[str]:
    """The synermix modules ``path`` imports when it is imported (module level, not inside
    functions: those are the library's own business and covered by the lists below)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.If | ast.Try):
                visit(node.body)
                visit(node.orelse)
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("synermix"))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                if base.startswith("synermix"):
                    found.add(base)
                    found.update(f"{base}.{a.name}" for a in node.names if _module_file(f"{base}.{a.name}"))

    visit(ast.parse(path.read_text()).body)
    return found


def import_closure(module: str) -> set[str]:
    """Source files (relative to the repo) a module pulls in at import, itself included."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        path = _module_file(name)
        if name in seen or path is None:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        todo += _top_level_imports(path, name)
    files = {_module_file(name) for name in seen}
    # package __init__ files that hold only a docstring and a version carry no code
    return {str(f.relative_to(REPO_ROOT)) for f in files if f.name != "__init__.py" or "stages" in f.parts}


@pytest.mark.parametrize("stage", sorted(DVC_STAGES))
def test_a_stage_depends_on_its_own_code_and_no_other_stage(stage):
    deps = set(DVC_STAGES[stage]["deps"])
    needed = import_closure(f"synermix.stages.{stage}")
    if stage in ("tune", "train"):  # train_model imports these when it runs
        needed |= {f"src/synermix/{name}" for name in TRAINING_CODE}
    if stage == "tune":
        needed |= {"src/synermix/tuning.py", "src/synermix/tune_report.py"}
    missing = sorted(needed - deps)
    assert not missing, f"dvc.yaml stage {stage} misses deps {missing}"
    stage_modules = {d for d in deps if d.startswith("src/synermix/stages/")}
    assert stage_modules <= {
        "src/synermix/stages/__init__.py",
        "src/synermix/stages/common.py",
        f"src/synermix/stages/{stage}.py",
    }, f"{stage} depends on another stage's module: editing that one would rerun this stage"
    assert f"src/synermix/stages/{stage}.py" in deps


def test_editing_one_stage_module_reruns_that_stage_and_the_ones_after_it_only():
    """Each stage module is a dependency of its own stage alone, so a changed line in
    stages/export.py changes the export stage; register follows only through export's outputs."""
    for stage in DVC_STAGES:
        users = {s for s, spec in DVC_STAGES.items() if f"src/synermix/stages/{stage}.py" in spec["deps"]}
        assert users == {stage}


def test_the_training_code_list_is_in_the_deps_of_tune_and_train():
    for stage in ("tune", "train"):
        deps = set(DVC_STAGES[stage]["deps"])
        assert {f"src/synermix/{name}" for name in TRAINING_CODE} <= deps, stage
    for name in TRAINING_CODE:
        assert (SRC / "synermix" / name).is_file(), name


def test_tune_depends_on_every_train_key_but_epochs():
    """Trials train with train.* (epochs from tune.epochs, in one process): a train.* key
    missing from the tune stage's params would leave a stale study when it changes."""
    from synermix.config import TrainParams
    from synermix.tuning import TRIAL_FIXED

    listed = {p.removeprefix("train.") for p in DVC_STAGES["tune"]["params"] if p.startswith("train.")}
    assert listed == set(TrainParams.model_fields) - {"epochs", *TRIAL_FIXED}
    assert set(TRIAL_FIXED) == {"launcher", "nproc_per_node", "sync_batchnorm"}
