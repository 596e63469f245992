# The hpo image: the `hpo` CLI, the objectives in objectives/ and the example study files.
# docker-compose.yml runs it as the study creator, the dashboard and the GPU workers. The host
# needs the NVIDIA driver and the NVIDIA Container Toolkit; PyTorch's Linux wheels bring their own
# CUDA runtime, so a slim Python base is enough.
#
# BASE_IMAGE: any Debian-like image with Python 3.11 or 3.12 and its venv module. CI, which cannot
# pull images, builds it from a local Debian root (scripts/ci-podman-stack.sh).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

WORKDIR /hpo

# hpbandster needs netifaces, which has no wheel for Python 3.11 and is compiled from source: gcc
# (absent from python:*-slim). A venv, because a distribution's own python3 refuses system-wide
# pip installs (PEP 668).
RUN if ! command -v gcc >/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends gcc libc6-dev \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv

# Dependencies (torch is most of the image) in a layer of their own, built from pyproject.toml
# alone with empty packages and an empty README, so that editing hpo's code or README rebuilds in
# seconds. CONSTRAINTS: the versions hpo is tested with (CI's image build names a copy without the
# CUDA build of torch, to install a CPU wheel).
ARG CONSTRAINTS=constraints.txt
COPY pyproject.toml constraints.txt ./
RUN mkdir -p hpo objectives \
    && touch hpo/__init__.py objectives/__init__.py README.md \
    && pip install . -c "${CONSTRAINTS}" \
    && pip uninstall -y hpo \
    && rm -rf hpo objectives README.md build

COPY README.md ./
COPY hpo/ hpo/
COPY objectives/ objectives/
RUN pip install --no-deps . && rm -rf build

# Example study files; docker-compose.yml mounts the host's over them so edits need no rebuild.
COPY studies/ studies/
COPY search_spaces/ search_spaces/

# An unprivileged user owning storage/, so the named volumes mounted there are writable by it.
RUN useradd --create-home --uid 1000 hpo \
    && mkdir -p storage/artifacts storage/checkpoints data \
    && chown -R hpo:hpo storage
USER hpo

CMD ["hpo", "--help"]
