# syntax=docker/dockerfile:1
# One image for every caviar role: api (`caviar serve`), worker (`caviar worker`), migrate, dashboard.
#
# torch comes from PyTorch's own wheel index. The default (CUDA 12.8 wheels) bundles the CUDA
# runtime, so a slim Python base is enough on any host with an NVIDIA driver and the NVIDIA
# container toolkit. For CPU-only machines build a much smaller image:
#   docker compose build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG TORCH_SPEC="torch>=2.3,<3"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CAVIAR_ARTIFACT_DIR=/data/artifacts

# torch first (the largest layer, rebuilt only when the index or the spec changes).
RUN pip install "${TORCH_SPEC}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /app
# Every other dependency at the version of the lock (requirements/constraints.txt, `make lock`);
# torch is the one installed above (the lock's torch line is left out so TORCH_SPEC may differ).
COPY requirements/constraints.txt ./requirements/
COPY pyproject.toml README.md* ./
COPY caviar ./caviar
RUN grep -v '^torch==' requirements/constraints.txt > /tmp/constraints.txt \
    && pip install -c /tmp/constraints.txt . && caviar --help >/dev/null

RUN useradd --create-home --uid 10001 caviar \
    && mkdir -p /data/artifacts \
    && chown -R caviar /data
USER caviar

EXPOSE 8000 8080
ENTRYPOINT ["caviar"]
CMD ["serve", "--host", "0.0.0.0", "--no-migrate"]
