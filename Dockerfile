# syntax=docker/dockerfile:1
# The `pivotmap:latest` image that infra/compose.yaml runs (Dask scheduler and workers, Prefect
# workers): this checkout installed at /opt/pivotmap (PIVOTMAP_REPO, where the workers find
# flows/deploy.py), pinned like the Makefile: torch first, then everything else constrained by
# requirements.lock.
#
#   docker build -t pivotmap:latest .                   # CPU (torch from PyTorch's CPU index)
#   docker build -t pivotmap:latest --build-arg CUDA=1 .  # CUDA 12 (torch from PyPI, CUDA
#                                                         # libraries as wheels; the `gpu` extra:
#                                                         # dask-cuda) on an NVIDIA host
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 ...
#
# The GPU needs the NVIDIA container toolkit on the host (compose: `driver: nvidia`), not a CUDA
# base image: the CUDA runtime comes with torch's wheels.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG CUDA=0
ARG TORCH_INDEX_URL=""

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIVOTMAP_REPO=/opt/pivotmap \
    DO_NOT_TRACK=true

# GDAL, PROJ and GEOS come inside the rasterio, pyogrio, pyproj and shapely wheels; curl for
# health checks; PostgreSQL 15 with PostGIS (Debian bookworm's) for `pivotmap serve`, which starts
# its own pgstac database (the compose `viewer` service).
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl ca-certificates \
       postgresql-15 postgresql-15-postgis-3 \
    && rm -rf /var/lib/apt/lists/*

RUN python -c 'import sys; assert sys.version_info[:2] == (3, 11), "pivotmap needs Python 3.11"'

# torch first, pinned (a resolver left alone would pull another build): the CPU wheel unless
# CUDA=1, or the index given.
RUN set -eux; \
    if [ -n "$TORCH_INDEX_URL" ]; then index="--index-url $TORCH_INDEX_URL"; \
    elif [ "$CUDA" = "1" ]; then index=""; \
    else index="--index-url https://download.pytorch.org/whl/cpu"; fi; \
    pip install $index "torch==${TORCH_VERSION}"

WORKDIR /opt/pivotmap
COPY requirements.lock pyproject.toml README.md ./
COPY pivotmap ./pivotmap
COPY flows ./flows
COPY tasks ./tasks
COPY models ./models
COPY infra ./infra
RUN set -eux; \
    extra=""; if [ "$CUDA" = "1" ]; then extra="[gpu]"; fi; \
    pip install -c requirements.lock -e ".${extra}"; \
    python -c "import torch; assert torch.__version__.split('+')[0] == '${TORCH_VERSION}', torch.__version__"; \
    pivotmap --help >/dev/null

RUN useradd --create-home --uid 1000 pivotmap && mkdir -p /runs && chown pivotmap /runs
USER pivotmap
CMD ["pivotmap", "--help"]
