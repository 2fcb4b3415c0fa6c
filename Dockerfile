# The cachestack service image, built in stages. The builder makes virtualenvs: one with the
# service and its dependencies, one with the orchestrator's for compose's set-up step. The
# images copy just their virtualenv, without pip, wheels or anything else the build used.
#   WHEELS=pypi (the default): the builder installs from PyPI, as any build that reaches it.
#   WHEELS=host: from wheels built on the host into build/wheels, for a build that cannot
#   reach PyPI (`python -m orchestrate --images offline` makes them).
#   BASE_IMAGE: python:<version>-slim-bookworm, or the offline Debian base (docker/offline).
# Targets: `service` (the last stage, so the default), `setup` (docker-compose.yml's set-up).
# checkov:skip=CKV_DOCKER_7: BASE_IMAGE is a pinned tag (orchestrate/stack.py) or a local image tagged by its recipe's hash
ARG BASE_IMAGE=python:3.11.16-slim-bookworm

FROM ${BASE_IMAGE} AS builder
ARG WHEELS=pypi
COPY . /src/
# hadolint ignore=DL3013
RUN if [ "$WHEELS" = host ]; then \
        set -- --no-index --find-links /src/build/wheels; service=cachestack; \
    else \
        set --; service=/src; \
    fi \
 && python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir "$@" "${service}" \
 && python3 -m venv /opt/setup \
 && /opt/setup/bin/pip install --no-cache-dir "$@" "${service}[orchestrate]" \
 && for venv in /opt/venv /opt/setup; do "$venv/bin/pip" uninstall --yes --quiet pip setuptools; done

# Compose's set-up (`docker compose run --rm setup`): the secrets and certificates, and each
# container's copy of them with its owner and mode, which compose outside swarm cannot set.
# checkov:skip=CKV_DOCKER_2: a one-shot task, not a server: nothing to check while it runs
# checkov:skip=CKV_DOCKER_3: it runs as root to chown each container's copy to that container's user
FROM ${BASE_IMAGE} AS setup
COPY --from=builder /opt/setup /opt/setup
ENV PATH=/opt/setup/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1
CMD ["python", "-m", "orchestrate", "secrets"]

FROM ${BASE_IMAGE} AS service
RUN groupadd --gid 10001 app \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin app
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TMPDIR=/tmp
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=5s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-m", "service.probe"]
CMD ["python", "-m", "service", "--host", "0.0.0.0", "--port", "8000"]
