# syntax=docker/dockerfile:1
# chatd: one replica. docker-compose.yml runs two of them behind NGINX with
# Redis and MongoDB; docs/deploy.md explains. tests/test_compose.py checks this
# file against the code (ports, settings, health check) without building it.
ARG PYTHON_IMAGE=python:3.11-slim

# --- build: chatd and its dependencies into a venv at /opt/chatd ------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/chatd
WORKDIR /src
COPY setup.cfg pyproject.toml README.md ./
COPY chatd ./chatd
COPY admin ./admin
# setup.cfg's `packages = find:` skips a directory without __init__.py (a
# namespace package), which would then be missing from the image: give every
# package directory one (a no-op once the repository has them all).
RUN find chatd admin -name '*.py' -exec dirname {} \; | sort -u \
      | while read -r dir; do [ -f "$dir/__init__.py" ] || : >"$dir/__init__.py"; done \
 && /opt/chatd/bin/pip install . \
 && /opt/chatd/bin/chatd --version

# --- runtime: the venv, the web client, a non-root user ---------------------
FROM ${PYTHON_IMAGE}
ENV PATH=/opt/chatd/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CHATD_HOST=0.0.0.0 \
    CHATD_DATA_DIR=/data \
    CHATD_WEB_DIR=/opt/chatd/web
RUN groupadd --system --gid 10001 chatd \
 && useradd --system --uid 10001 --gid chatd --home-dir /data --no-create-home \
      --shell /usr/sbin/nologin chatd \
 && install -d -o chatd -g chatd -m 0700 /data
COPY --from=build /opt/chatd /opt/chatd
COPY web /opt/chatd/web
USER 10001:10001
WORKDIR /data
# The SQLite store (when no MONGO_URI is set) and the secrets chatd generates
# when JWT_SECRET / CHATD_KEYS are not given live here.
VOLUME ["/data"]
# HTTP API (+ web client) and the WebSocket (path /ws): chatd's defaults.
EXPOSE 8080 8081
# /healthz answers 200 while the process serves; slim has no curl.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('CHATD_HTTP_PORT') or os.environ.get('PORT') or '8080'; urllib.request.urlopen('http://127.0.0.1:' + port + '/healthz', timeout=2)"]
# SIGTERM: stop accepting, close sockets with 1001, finish in-flight writes, exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["chatd"]
CMD ["serve", "--host", "0.0.0.0"]
