# MLflow tracking server + model registry for docker/compose.yaml: PostgreSQL backend (psycopg 3),
# artifacts proxied by the server to an S3 store (boto3), so clients need neither. Runs
# `mlflow server --app-name synermix-auth`: MLflow's basic auth (flask-wtf) plus synermix's
# release policy (src/synermix/mlflow_auth.py), configured by docker/mlflow-auth.ini.
#   docker build -f docker/mlflow.Dockerfile -t synermix-mlflow .
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/mlflow
# mlflow, psycopg and flask-wtf at the versions the project locks (docker/lock_pins.py), the lock
# also constraining what they pull in. boto3 is not in requirements.lock (the project itself never
# talks to S3): pinned here, with the botocore released beside it; bump them together.
COPY requirements.lock docker/lock_pins.py ./
RUN python lock_pins.py requirements.lock mlflow "psycopg[binary]" flask-wtf > server.txt \
 && pip install -c requirements.lock -r server.txt boto3==1.44.5 botocore==1.44.5

# synermix alone (--no-deps: its dependencies are the training stack), for the
# `synermix-auth` app's entry point; the policy imports only the standard library and mlflow.
COPY pyproject.toml README.md ./
COPY src ./src
COPY docker/mlflow-auth.ini /etc/mlflow/auth.ini
RUN pip install --no-deps . \
 && rm -rf src build \
 && useradd --create-home --uid 10001 --user-group mlflow \
 && mkdir -p /var/lib/mlflow-auth && chown mlflow:mlflow /var/lib/mlflow-auth
ENV MLFLOW_AUTH_CONFIG_PATH=/etc/mlflow/auth.ini
USER mlflow
WORKDIR /home/mlflow

EXPOSE 5000
# /health is open without credentials (MLflow's auth leaves it unprotected)
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=6 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/health', timeout=4)"]
CMD ["mlflow", "server", "--app-name", "synermix-auth", "--host", "0.0.0.0", "--port", "5000"]
