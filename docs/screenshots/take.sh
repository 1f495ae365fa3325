#!/usr/bin/env bash
# Screenshots of the MLflow pipeline run, its evaluate run and the DVC plots page, taken with
# headless Chromium (Debian: apt-get install chromium) against this project's store after a
# real `dvc repro`. The machine that took the committed ones had no route to any CDN, so the
# DVC plots page shows what a user without internet sees. Run from the repository root:
#   bash docs/screenshots/take.sh
set -euo pipefail
out=docs/screenshots
port=${UI_PORT:-5077}
.venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port "$port" >/tmp/synermix-ui.log 2>&1 &
ui=$!
trap 'kill $ui 2>/dev/null || true' EXIT
for _ in $(seq 60); do curl -fs -o /dev/null "http://127.0.0.1:$port/" && break; sleep 1; done

# the latest pipeline run and its evaluate run
read -r experiment pipeline evaluate < <(.venv/bin/python - <<'PY'
from mlflow.tracking import MlflowClient
c = MlflowClient("sqlite:///mlflow.db")
e = c.get_experiment_by_name("synermix").experiment_id
(p,) = c.search_runs([e], "tags.synermix_role = 'pipeline'", order_by=["attributes.start_time DESC"], max_results=1)
print(e, p.info.run_id, p.data.tags.get("run.evaluate", p.info.run_id))
PY
)
shot() {  # name url height
  chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size="1500,$3" \
    --virtual-time-budget=20000 --screenshot="$out/$1.png" "$2" 2>/dev/null
}
base="http://127.0.0.1:$port/#/experiments/$experiment"
shot mlflow_pipeline_run "$base/runs/$pipeline?workflowType=machine_learning" 1700
shot mlflow_evaluate_run "$base/runs/$evaluate?workflowType=machine_learning" 1700
shot mlflow_runs_table "$base/runs?workflowType=machine_learning" 900

.venv/bin/dvc plots show -o /tmp/synermix-dvc-plots >/dev/null
shot dvc_plots "file:///tmp/synermix-dvc-plots/index.html" 5200
ls -l "$out"/*.png
