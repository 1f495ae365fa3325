# MLflow tracking server + model registry for docker/compose.yaml: PostgreSQL backend (psycopg 3),
# artifacts proxied by the server to an S3 store (boto3), so clients need neither.
#   docker build -f docker/mlflow.Dockerfile -t synermix-mlflow .
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/mlflow
# mlflow and psycopg at the versions the project locks (docker/lock_pins.py), the lock also
# constraining what they pull in. boto3 is not in requirements.lock (the project itself never
# talks to S3): pinned here, with the botocore released beside it; bump them together.
COPY requirements.lock docker/lock_pins.py ./
RUN python lock_pins.py requirements.lock mlflow "psycopg[binary]" > server.txt \
 && pip install -c requirements.lock -r server.txt boto3==1.44.5 botocore==1.44.5 \
 && useradd --create-home --uid 10001 --user-group mlflow
USER mlflow
WORKDIR /home/mlflow

EXPOSE 5000
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=6 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/health', timeout=4)"]
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
