# Serving image, GPU: `synermix serve` on onnxruntime-gpu (CUDA, or TensorRT where its libraries
# are added), with only the serving packages: no torch, dvc, optuna or great-expectations.
#   docker build -f docker/serve.Dockerfile -t synermix-serve .
#   docker run --rm --gpus all -p 127.0.0.1:8080:8080 -v "$PWD/line-bundle:/models/bundle:ro" synermix-serve
#
# Base: the locked onnxruntime-gpu 1.31.1 wheel is a CUDA 13.0 build (its provider library needs
# libcudart.so.13, libcublas.so.13 and cuDNN 9; build_and_package_info says cuda_version 13.0), so
# a CUDA 12 image would leave it on CPU. The cudnn-runtime image has those libraries on the
# loader path, with no compilers. CUDA 13 needs an NVIDIA driver 580 or newer on the host and a
# GPU of compute capability 7.5 (Turing) or newer. Ubuntu 22.04 does not ship a current Python
# 3.11, hence the deadsnakes PPA.
FROM nvidia/cuda:13.0.2-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates software-properties-common \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
 && apt-get purge -y --auto-remove software-properties-common \
 && rm -rf /var/lib/apt/lists/* \
 && python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /opt/synermix
# Dependencies first, so code edits do not reinstall them. Versions come from requirements.lock
# (docker/lock_pins.py); the lock also constrains what they pull in.
COPY requirements.lock docker/lock_pins.py docker/serve-packages.txt ./
RUN python lock_pins.py requirements.lock @serve-packages.txt onnxruntime-gpu > serving.txt \
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
