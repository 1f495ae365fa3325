"""Print ``name==version`` lines for packages pinned in requirements.lock (the images' pip input).

requirements.lock is the one home of every version; an image names the packages it wants and
takes their versions from there, so a lock update reaches the images without editing them.

    python lock_pins.py LOCK SPEC...

A SPEC is a package name (``fastapi``, ``psycopg[binary]``), ``@FILE`` (names one a line, ``#``
comments), or ``name=locked-name``: install ``name`` at the version locked for ``locked-name``
(``onnxruntime=onnxruntime-gpu``: the CPU runtime at the GPU runtime's version, since the two
share one import folder and never install together). Exits 1 naming every package the lock
lacks: an image must not silently install an unpinned version. Standard library only: it runs
in a bare base image, before anything is installed.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path


def canonical(name: str) -> str:
    """PEP 503 name: ``PyYAML``, ``prometheus_client`` → ``pyyaml``, ``prometheus-client``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(lock: Path) -> dict[str, str]:
    """Canonical name → pinned version, from ``name==version`` lines."""
    pins = {}
    for line in lock.read_text().splitlines():
        match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;#]+)", line)
        if match:
            pins[canonical(match.group(1))] = match.group(2)
    return pins


def expand_specs(specs: list[str], base: Path) -> list[tuple[str, str]]:
    """``(what to install, whose locked version to use)`` for each spec; ``@FILE`` is read from
    ``base`` when relative."""
    pairs = []
    for spec in specs:
        if spec.startswith("@"):
            lines = (base / spec[1:]).read_text().splitlines()
            names = [line.split("#", 1)[0].strip() for line in lines]
            pairs += expand_specs([name for name in names if name], base)
        elif "=" in spec:
            install, locked = spec.split("=", 1)
            pairs.append((install.strip(), locked.strip()))
        else:
            pairs.append((spec, spec))
    return pairs


def pinned(lock: Path, specs: list[str], base: Path | None = None) -> list[str]:
    """``install==version`` lines; ``LookupError`` naming every package the lock lacks."""
    pins = read_lock(lock)
    pairs = expand_specs(specs, base or Path.cwd())
    missing = [locked for _, locked in pairs if canonical(locked.split("[")[0]) not in pins]
    if missing:
        raise LookupError(
            f"{lock}: no pin for {', '.join(missing)}; add them to pyproject.toml and run make lock"
        )
    return [f"{install}=={pins[canonical(locked.split('[')[0])]}" for install, locked in pairs]


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        lines = pinned(Path(argv[0]), argv[1:])
    except (LookupError, OSError) as exc:
        print(f"lock_pins: {exc}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
