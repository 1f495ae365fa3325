# Serving image, CPU: `synermix serve` on onnxruntime (CPU build), for machines without an NVIDIA
# GPU and for the compose stack. Same packages as serve.Dockerfile otherwise.
#   docker build -f docker/serve-cpu.Dockerfile -t synermix-serve-cpu .
#   docker run --rm -p 127.0.0.1:8080:8080 -v "$PWD/line-bundle:/models/bundle:ro" synermix-serve-cpu
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /opt/synermix
# Dependencies first, so code edits do not reinstall them. Versions come from requirements.lock
# (docker/lock_pins.py). onnxruntime, not onnxruntime-gpu: the two share one import folder, so
# only one may be installed; the CPU build is taken at the GPU build's locked version.
COPY requirements.lock docker/lock_pins.py docker/serve-packages.txt ./
RUN python lock_pins.py requirements.lock @serve-packages.txt onnxruntime=onnxruntime-gpu > serving.txt \
 && pip install -c requirements.lock -r serving.txt

# The package alone: --no-deps, since pyproject's dependencies are the training stack.
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-deps . \
 && rm -rf src build

RUN useradd --create-home --uid 10001 --user-group synermix
USER synermix
WORKDIR /home/synermix

EXPOSE 8080
# /readyz answers 200 once a model is loaded; urllib raises on anything else (no curl needed).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/readyz', timeout=4)"]

# The bundle (synermix bundle --out ...) is mounted read-only at /models/bundle; give other
# flags after the image name (they replace this CMD, so repeat --model and --host).
ENTRYPOINT ["synermix", "serve"]
CMD ["--model", "/models/bundle", "--host", "0.0.0.0"]
