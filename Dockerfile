# SIA image service: `make docker-build`, then
#   docker run -p 8080:8080 -p 9090:9090 --env-file .env sia:latest
# gRPC on 8080, HTTP (/health, /ready, /metrics, /images) on 9090.

# --- build: install the service and its runtime dependencies into a venv ----
FROM python:3.11-slim-bookworm AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
# Every dependency ships manylinux wheels, so no compiler is needed. `.` is
# this project; its dependencies are bounded in pyproject.toml.
RUN python -m venv /opt/sia \
    && /opt/sia/bin/pip install --no-cache-dir --no-compile . \
    && /opt/sia/bin/python -m compileall -q /opt/sia/lib

# --- runtime: the venv on a clean base, run as an unprivileged user ---------
FROM python:3.11-slim-bookworm

LABEL org.opencontainers.image.title="sia" \
      org.opencontainers.image.description="SIA image service: gRPC image generation (Volcengine Ark Seedream, OpenAI, offline)" \
      org.opencontainers.image.licenses="MIT"

# The read-only root filesystem of the Kubernetes manifests works because
# bytecode is compiled at build time and nothing else writes outside DATA_DIR.
# PYTHONMALLOC=malloc is what `sia serve` would re-execute itself with (see
# sia/runtime.py: freed heap goes back to the OS after a burst); set here, it starts once.
# No PYTHONUNBUFFERED needed: the server writes its log lines itself, in batches on
# the event loop and at once elsewhere (sia/logs.py), either way.
ENV PATH=/opt/sia/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONMALLOC=malloc \
    GRPC_PORT=8080 \
    HTTP_PORT=9090

RUN groupadd --system --gid 10001 sia \
    && useradd --system --uid 10001 --gid sia --no-create-home \
       --home-dir /var/lib/sia --shell /usr/sbin/nologin sia \
    && mkdir -p /var/lib/sia/data \
    && chown -R sia:sia /var/lib/sia

COPY --from=build /opt/sia /opt/sia

# DATA_DIR defaults to `data`, relative to here: /var/lib/sia/data, owned by
# sia, where Compose mounts its volume and Kubernetes an emptyDir.
WORKDIR /var/lib/sia
USER 10001:10001

EXPOSE 8080 9090

# The slim image has no curl; Python is there. HTTP_PORT may be overridden.
# urlopen raises (exit 1) on a refused connection, a timeout or a non-2xx answer.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('HTTP_PORT', '9090') + '/health', timeout=4)"]

# Exec form: `sia` is PID 1 and receives SIGTERM itself; it installs its own
# SIGTERM/SIGINT handlers and runs the graceful shutdown (SHUTDOWN_GRACE,
# default 30 s, so give `docker stop` a longer --time). It starts no child
# processes, so there are no zombies to reap and no init process is needed.
STOPSIGNAL SIGTERM
ENTRYPOINT ["sia"]
CMD ["serve"]
