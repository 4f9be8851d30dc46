# nanomsg container image.
#
#   docker build -t nanomsg .
#   docker run --rm -p 7777:7777 -p 127.0.0.1:7778:7778 --ulimit nofile=65536:65536 \
#       -e NANOMSG_JWT_SECRET=... nanomsg
#
# The side-port (7778) administers rooms: publish it where only partner backends reach it.
#
# Stage 1 builds the wheel; stage 2 installs it (and its dependencies, all published as binary
# wheels for linux/amd64 and linux/arm64) into a virtualenv and runs it as an unprivileged user.

ARG PYTHON_IMAGE=python:3.11-slim

# -- build: the wheel ---------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
# README.md is the package's readme and schema.sql is force-included into the wheel as
# nanomsg/store/schema.sql (see [tool.hatch.build.targets.wheel.force-include]): both are needed.
COPY pyproject.toml README.md schema.sql ./
COPY nanomsg ./nanomsg
RUN python -m pip wheel --no-deps --wheel-dir /dist .

# -- runtime ------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/nanomsg \
    PATH=/opt/nanomsg/bin:$PATH

RUN python -m venv /opt/nanomsg
COPY --from=build /dist/ /tmp/dist/
# Fails the build if the wheel lacks the packaged PostgreSQL schema.
RUN pip install /tmp/dist/nanomsg-*.whl \
    && rm -rf /tmp/dist \
    && python -c "from nanomsg.store.migrate import postgres_schema_path; postgres_schema_path()"

# An unprivileged user, owning only /var/lib/nanomsg (mount a volume there to keep a SQLite file).
RUN groupadd --system --gid 10001 nanomsg \
    && useradd --system --uid 10001 --gid nanomsg --home-dir /var/lib/nanomsg --create-home \
       --shell /usr/sbin/nologin nanomsg
WORKDIR /var/lib/nanomsg
USER nanomsg:nanomsg

# Listen on every interface inside the container and keep the SQLite file (used when no
# PostgreSQL URL is given) in /var/lib/nanomsg. Every other setting keeps nanomsg's default (see
# `nanomsg serve --help`) and is set with NANOMSG_* variables at run time.
ENV NANOMSG_HOST=0.0.0.0 \
    NANOMSG_DATABASE_URL=sqlite:////var/lib/nanomsg/nanomsg.db

# 7777: WebSocket (/chat); 7778: HTTP side-port (REST API, /healthz, /readyz, /openapi.json).
EXPOSE 7777 7778

# Liveness through the side-port; slim images have no curl, so Python's urllib does the request
# (it raises, and the command exits 1, on anything but a 2xx answer).
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('NANOMSG_HTTP_PORT', '7778') + '/healthz', timeout=4)"]

# SIGTERM (docker stop) closes every WebSocket with 1001 and exits 0.
STOPSIGNAL SIGTERM
CMD ["nanomsg", "serve"]
