"""MLflow's basic-auth server app with synermix's release policy on top.

Run as ``mlflow server --app-name synermix-auth`` (the compose stack does). MLflow's own
permissions (READ / EDIT / MANAGE per experiment and registered model) cannot keep an alias
move away from someone who may register versions: ``SetRegisteredModelAlias`` asks for the
same "update" right on the registered model as ``CreateModelVersion``. So after MLflow has
authenticated and authorised a request, this app checks the synermix roles, named by user
name in the server's environment:

- **release** (``SYNERMIX_RELEASE_USERS``, and MLflow admins): everything MLflow allows.
- **read-only** (``SYNERMIX_READ_ONLY_USERS``, e.g. the line's ``synermix serve``): reads
  only (GET, the Get/Search/List calls MLflow sends as POST, and GraphQL, whose schema has
  queries and searches only).
- **everyone else** (the pipeline, data scientists): everything MLflow allows except the
  release actions on registered models. They may register versions (with tags) and move
  the aliases in ``SYNERMIX_OPEN_ALIASES`` (default ``candidate``) the way synermix does
  (its intent and history tags, the version's ``alias.candidate.*`` marks); they may not
  move ``pilot`` or ``production`` (or any other alias), set or delete other tags on a
  registered model or version, or delete or rename a registered model or version. The
  alias locks (``<name>.alias-lock``) stay open to all, so any synermix command can take
  and break them.

A refusal is HTTP 403 with MLflow's error body, which the MLflow client raises as
``MlflowException`` (``synermix promote`` prints it as one line).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

from synermix.registry import ALIAS_LOG_PREFIX, BREAK_SUFFIX, INTENT_PREFIX, LOCK_SUFFIX

log = logging.getLogger(__name__)

RELEASE_USERS_ENV = "SYNERMIX_RELEASE_USERS"
READ_ONLY_USERS_ENV = "SYNERMIX_READ_ONLY_USERS"
OPEN_ALIASES_ENV = "SYNERMIX_OPEN_ALIASES"

#: registry calls that change what a line runs or the evidence behind it
RELEASE_ACTIONS = frozenset(
    {
        "SetRegisteredModelAlias",
        "DeleteRegisteredModelAlias",
        "SetRegisteredModelTag",
        "DeleteRegisteredModelTag",
        "SetModelVersionTag",
        "DeleteModelVersionTag",
        "DeleteRegisteredModel",
        "DeleteModelVersion",
        "RenameRegisteredModel",
        "TransitionModelVersionStage",
    }
)
READ_PREFIXES = ("Get", "Search", "List")
#: MLflow's GraphQL endpoint (the UI's run pages): its schema has queries and searches only
GRAPHQL = "GraphQL"


def names(env: Mapping[str, str], key: str, default: str = "") -> frozenset[str]:
    return frozenset(n.strip() for n in env.get(key, default).split(",") if n.strip())


def role_of(user: str, is_admin: bool, env: Mapping[str, str]) -> str:
    if is_admin or user in names(env, RELEASE_USERS_ENV):
        return "release"
    if user in names(env, READ_ONLY_USERS_ENV):
        return "read-only"
    return "team"


def _alias_in_json(value: str | None) -> str:
    try:
        found = json.loads(value or "")
    except (TypeError, ValueError):
        return ""
    return str(found.get("alias", "")) if isinstance(found, dict) else ""


def refusal(
    role: str,
    method: str,
    action: str | None,
    params: Mapping[str, Any],
    open_aliases: frozenset[str],
    current_tag: Callable[[str, str], str | None],
) -> str | None:
    """Why the request is refused under the synermix roles (None: allowed).

    ``action`` is the MLflow request class name (None for routes that are not MLflow API
    calls, e.g. artifact downloads); ``params`` the request's fields; ``current_tag(name,
    key)`` reads a registered model's tag as it is now (for deletes, which carry no value)."""
    if role == "release":
        return None
    if role == "read-only":
        if (
            method in ("GET", "HEAD", "OPTIONS")
            or action == GRAPHQL
            or (action or "").startswith(READ_PREFIXES)
        ):
            return None
        return f"{action or method} writes, and this user is read-only ({READ_ONLY_USERS_ENV})"
    if action not in RELEASE_ACTIONS:
        return None
    name = str(params.get("name", ""))
    if name.endswith((LOCK_SUFFIX, LOCK_SUFFIX + BREAK_SUFFIX)):
        return None  # synermix's alias locks: every synermix command takes and breaks them
    key = str(params.get("key", ""))
    if action in ("SetRegisteredModelAlias", "DeleteRegisteredModelAlias"):
        alias = str(params.get("alias", ""))
        if alias in open_aliases:
            return None
        what = f"moving @{alias} of '{name}'"
    elif action == "SetRegisteredModelTag" and key.startswith((ALIAS_LOG_PREFIX, INTENT_PREFIX)):
        alias = _alias_in_json(params.get("value"))
        if alias in open_aliases:
            return None
        what = f"recording a move of @{alias or '?'} of '{name}'"
    elif action == "DeleteRegisteredModelTag" and key.startswith(INTENT_PREFIX):
        alias = _alias_in_json(current_tag(name, key))
        if alias in open_aliases:
            return None
        what = f"finishing a move of @{alias or '?'} of '{name}'"
    elif action in ("SetModelVersionTag", "DeleteModelVersionTag"):
        if any(key.startswith(f"alias.{a}.") or key == f"held.{a}" for a in open_aliases):
            return None
        what = f"tag {key!r} on '{name}' version {params.get('version', '?')}"
    else:
        what = f"{action} on '{name}'" + (f" (tag {key!r})" if key else "")
    return (
        f"{what} is a release action: only the release role may do it "
        f"({RELEASE_USERS_ENV} on the MLflow server); run synermix promote / rollback as a release user"
    )


def _request_classes() -> dict[tuple[str, str], str]:
    """(path, method) -> the MLflow request class name, for every MLflow API route."""
    from mlflow.server.handlers import get_endpoints

    table: dict[tuple[str, str], str] = {}
    for path, handler, methods in get_endpoints(lambda request_class: request_class):
        if isinstance(handler, type):  # explicit routes carry view functions: not API calls
            for method in methods:
                table[(path, method)] = handler.__name__
    return table


def _params() -> dict[str, Any]:
    from flask import request

    found: dict[str, Any] = dict(request.args.items())
    body = request.get_json(silent=True, force=True) if request.data else None
    if isinstance(body, dict):
        found.update(body)
    return found


def _current_tag(name: str, key: str) -> str | None:
    from mlflow.server.handlers import _get_model_registry_store

    try:
        model = _get_model_registry_store().get_registered_model(name)
    except Exception:  # no such model: MLflow's own handler answers that
        return None
    return dict(model.tags or {}).get(key)


def create_app(app: Any = None) -> Any:
    """The basic-auth app (MLflow's ``create_app``) with the release policy after it."""
    from flask import g, make_response, request
    from mlflow.server import app as flask_app
    from mlflow.server.auth import create_app as basic_auth_app
    from mlflow.server.auth import store

    flask = app if app is not None else flask_app
    served = basic_auth_app(flask)
    classes = _request_classes()
    env = dict(os.environ)
    open_aliases = names(env, OPEN_ALIASES_ENV, "candidate")

    def release_policy():
        user = getattr(g, "mlflow_authenticated_user", None)
        if not user:  # an unprotected route (health, static files): MLflow let it through
            return None
        try:
            is_admin = bool(store.get_user(user).is_admin)
        except Exception:
            is_admin = False
        role = role_of(user, is_admin, env)
        action = classes.get((request.path, request.method))
        if action is None and request.path.endswith("/graphql"):
            action = GRAPHQL
        why = refusal(role, request.method, action, _params(), open_aliases, _current_tag)
        if why is None:
            return None
        log.warning("refused %s %s for %s (%s): %s", request.method, request.path, user, role, why)
        body = json.dumps({"error_code": "PERMISSION_DENIED", "message": f"{user}: {why}"})
        return make_response(body, 403, {"Content-Type": "application/json"})

    # after MLflow's own before_request (registered by basic_auth_app): the user is known
    flask.before_request(release_policy)
    log.info(
        "synermix release policy: release users %s, read-only users %s, open aliases %s",
        sorted(names(env, RELEASE_USERS_ENV)) or "none (admins only)",
        sorted(names(env, READ_ONLY_USERS_ENV)) or "none",
        sorted(open_aliases),
    )
    return served


def create_users(tracking_uri: str, users: Mapping[str, str]) -> list[str]:
    """Create the users named (user -> password) that the server does not have yet, signed in
    as the admin of MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD; returns the new ones."""
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth.client import AuthServiceClient

    admin = AuthServiceClient(tracking_uri)
    created = []
    for user, password in users.items():
        try:
            admin.get_user(user)
            continue
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
        admin.create_user(user, password)
        created.append(user)
    return created


def _parser():
    import argparse

    parser = argparse.ArgumentParser(
        prog="synermix-mlflow-users",
        description="Set up the users of an MLflow server run with --app-name synermix-auth.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    users = commands.add_parser(
        "users", help="create missing users (admin credentials from MLFLOW_TRACKING_USERNAME/PASSWORD)"
    )
    users.add_argument("specs", nargs="+", metavar="NAME=PASSWORD_VARIABLE")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``synermix-mlflow-users users NAME=PASSWORD_VARIABLE ...`` (the compose stack's one-shot
    ``mlflow-users`` service): each user gets the password held in the environment variable
    named after ``=``; existing users are left as they are."""
    import sys

    parser = _parser()
    args = parser.parse_args(argv)
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    wanted: dict[str, str] = {}
    for spec in args.specs:
        user, _, variable = spec.partition("=")
        password = os.environ.get(variable, "") if variable else ""
        if not user or not password:
            print(f"error: {spec}: expected NAME=VARIABLE with the password in $VARIABLE", file=sys.stderr)
            return 2
        wanted[user] = password
    if not uri.startswith(("http://", "https://")):
        print("error: set MLFLOW_TRACKING_URI to the MLflow server (http://...)", file=sys.stderr)
        return 2
    from mlflow.exceptions import MlflowException

    try:
        created = create_users(uri, wanted)
    except MlflowException as exc:
        print(f"error: MLflow at {uri} refused: {exc.message.splitlines()[0][:300]}", file=sys.stderr)
        return 1
    print(
        f"users created: {', '.join(created) or 'none'}; already there: "
        f"{', '.join(u for u in wanted if u not in created) or 'none'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
