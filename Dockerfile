# syntax=docker/dockerfile:1
# Images of osmo-router. Targets:
#   router (default)  docker build -t osmo-router .
#   agent             docker build --target agent -t osmo-router-agent .   (adds rsync)
# The package is built once as a wheel (with its dependencies' wheels) in `build`, so the
# runtime stages install offline and carry no compiler, no sources and no pip cache.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# README* may be absent; pyproject.toml always matches, so the COPY never fails.
COPY pyproject.toml README* ./
COPY src ./src
RUN pip wheel --wheel-dir /wheels .

FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# A fixed numeric uid lets Kubernetes' runAsNonRoot verify it without a passwd lookup.
RUN groupadd --system --gid 10001 osmo \
 && useradd --system --uid 10001 --gid osmo --home-dir /home/osmo --create-home --shell /usr/sbin/nologin osmo
# Bind-mount the wheels instead of COPYing them, so they never land in an image layer.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels osmo-router
WORKDIR /home/osmo
USER 10001:10001
EXPOSE 50051 8080
ENTRYPOINT ["osmo-router"]

# The agent runs inside workload containers; rsync needs the real binary on this side
# (`rsync --server` is what the user's rsync talks to).
FROM runtime AS agent
USER root
RUN apt-get update \
 && apt-get install -y --no-install-recommends rsync \
 && rm -rf /var/lib/apt/lists/*
USER 10001:10001
# Settings come from OSMO_ROUTER_ADDRESS, OSMO_WORKFLOW_ID, OSMO_TOKEN, ... or extra arguments.
CMD ["agent"]

# Last stage, so a plain `docker build .` produces the router.
FROM runtime AS router
# slim has no curl. Docker only (Kubernetes uses the chart's probes); assumes --metrics-port 8080.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]
# TLS and JWT settings are deployment-specific: pass them as arguments (the Helm chart does).
CMD ["serve", "--host", "0.0.0.0", "--log-format", "json"]
