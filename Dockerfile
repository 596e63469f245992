# The hpo image: the `hpo` CLI, the objectives in objectives/ and the example study files.
# docker-compose.yml runs it as the study creator, the dashboard and the GPU workers. The host
# needs the NVIDIA driver and the NVIDIA Container Toolkit; PyTorch's Linux wheels bring their own
# CUDA runtime, so a slim Python base is enough.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /hpo

# Dependencies (torch is most of the image) in a layer of their own, built from pyproject.toml
# alone with empty packages, so that editing hpo's code rebuilds in seconds.
COPY pyproject.toml README.md ./
RUN mkdir -p hpo objectives \
    && touch hpo/__init__.py objectives/__init__.py \
    && pip install . \
    && pip uninstall -y hpo \
    && rm -rf hpo objectives

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
