# The cachestack service image, built in stages. The builder makes virtualenvs: one with the
# service and its dependencies, one with the orchestrator's for compose's set-up step. Each
# installs exactly its lock (requirements/, `bash scripts/lock.sh`), every file checked against
# the lock's sha256, then the package itself with the locked build backend, so nothing unpinned
# is fetched. The images copy just their virtualenv, without pip or anything else the build used.
#   WHEELS=pypi (the default): the locked files come from PyPI, as in any build that reaches it.
#   WHEELS=host: from build/wheels, where the host downloaded them, for a build that cannot
#   reach PyPI (`python -m orchestrate --images offline` does).
#   BASE_IMAGE: python:<version>-slim-bookworm, or the offline Debian base (docker/offline).
# Targets: `service` (the last stage, so the default), `setup` (docker-compose.yml's set-up).
# checkov:skip=CKV_DOCKER_7: BASE_IMAGE is a pinned tag (orchestrate/stack.py) or a local image tagged by its recipe's hash
ARG BASE_IMAGE=python:3.11.16-slim-bookworm

FROM ${BASE_IMAGE} AS builder
ARG WHEELS=pypi
COPY . /src/
# pip check: every dependency of what is installed is there, for this image's Python.
RUN if [ "$WHEELS" = host ]; then set -- --no-index --find-links /src/build/wheels; fi \
 && for image in service setup; do \
        venv="/opt/$image" lock="/src/requirements/$image.lock" \
     && python3 -m venv "$venv" \
     && "$venv/bin/pip" install --no-cache-dir --require-hashes --no-deps "$@" -r "$lock" \
     && "$venv/bin/pip" install --no-cache-dir --no-deps --no-index --no-build-isolation /src \
     && "$venv/bin/pip" check \
     && "$venv/bin/pip" uninstall --yes --quiet pip setuptools \
     || exit 1; \
    done

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
COPY --from=builder /opt/service /opt/service
ENV PATH=/opt/service/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TMPDIR=/tmp
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=5s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-m", "service.probe"]
CMD ["python", "-m", "service", "--host", "0.0.0.0", "--port", "8000"]
