#!/usr/bin/env bash
# Run bench/gpu_check.py on a GPU machine, or prepare here what it needs to carry there.
#
#   bash bench/gpu_check.sh prepare [--max-per-class N]
#       here (needs .venv with elpv-dataset, and network): writes the git-ignored .gpucheck/
#       with whl/ (pydantic and its companions for CPython 3.12, versions from
#       requirements.lock), elpv/ (a seeded ELPV subset, <class>/<image>) and commit.txt
#   bash bench/gpu_check.sh [gpu_check.py options]
#       there (device tool: command `bash bench/gpu_check.sh`, carry [".gpucheck"]):
#       installs .gpucheck/whl/*.whl into /tmp/gpu_check_site with pip --no-index, then runs
#       the check with PYTHONPATH=src; the log goes to $OUT/gpu_check.log (else reports/bench/)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
CARRY=.gpucheck
WHEELS="pydantic pydantic_core annotated-types typing-inspection typing_extensions"

if [ "${1:-}" = prepare ]; then
  shift
  PY=${PYTHON:-.venv/bin/python}
  [ -x "$PY" ] || PY=python3
  if [ -d .git ]; then
    mkdir -p .git/info
    grep -qxF "/$CARRY/" .git/info/exclude 2>/dev/null || echo "/$CARRY/" >>.git/info/exclude
  fi
  pins=()
  for name in $WHEELS; do
    pattern=$(echo "$name" | sed 's/[-_]/[-_]/g')
    pin=$(grep -iE "^${pattern}==" requirements.lock | head -1 | cut -d' ' -f1)
    [ -n "$pin" ] || { echo "error: $name is not pinned in requirements.lock" >&2; exit 2; }
    pins+=("$pin")
  done
  rm -rf "$CARRY/whl"
  mkdir -p "$CARRY/whl"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$CARRY/whl" "${pins[@]}" || exit 1
  PYTHONPATH=src "$PY" bench/gpu_check.py --export-data "$CARRY/elpv" "$@" || exit 1
  {
    echo "commit $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    echo "modified_files $(git status --porcelain --untracked-files=no 2>/dev/null | wc -l)"
  } >"$CARRY/commit.txt"
  ls "$CARRY/whl"
  du -sh "$CARRY"
  exit 0
fi

PY=${PYTHON:-python3}
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G "$CARRY/whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --find-links "$CARRY/whl" --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/gpu_check_site "$CARRY"/whl/*.whl ||
    { echo "error: installing the carried wheels from $CARRY/whl failed" >&2; exit 2; }
  export PYTHONPATH="src:/tmp/gpu_check_site${PYTHONPATH#src}"
fi
export PYTHONUNBUFFERED=1
logdir=${OUT:-reports/bench}
mkdir -p "$logdir"
"$PY" bench/gpu_check.py "$@" 2>&1 | tee "$logdir/gpu_check.log"
exit "${PIPESTATUS[0]}"
