"""The MLflow model registry: finding the version an alias points at, and its files.

Versions are moved between ``candidate``, ``pilot`` and ``production`` with aliases
(``models:/<name>@<alias>``), never the deprecated stages. The evaluate stage uses this
module to find the champion (the version holding ``gates.champion.alias``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AliasedVersion:
    name: str
    alias: str
    version: str
    run_id: str
    source: str

    @property
    def label(self) -> str:
        return f"{self.name}@{self.alias} (version {self.version})"


def find_alias(client: Any, name: str, alias: str) -> AliasedVersion | None:
    """The version of registered model ``name`` that holds ``alias``; None when there is none."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    version = dict(model.aliases or {}).get(alias)
    if version is None:
        return None
    found = client.get_model_version(name, str(version))
    return AliasedVersion(name, alias, str(found.version), found.run_id or "", found.source)


def download_version(client: Any, version: AliasedVersion, dst: Path) -> Path:
    """Copy the version's files into ``dst`` (which must exist) and return the folder."""
    from mlflow.artifacts import download_artifacts

    uri = f"models:/{version.name}/{version.version}"
    return Path(download_artifacts(artifact_uri=uri, dst_path=str(dst), tracking_uri=client.tracking_uri))
