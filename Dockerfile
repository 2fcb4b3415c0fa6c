# The cachestack service image. Wheels are built on the host (build/wheels, see
# orchestrate/images.py) because pip inside a build may not reach PyPI; only the base
# dependencies are installed, never the extras.
# BASE_IMAGE: python:3.11-slim-bookworm (official) or the offline Debian base.
# checkov:skip=CKV_DOCKER_7: BASE_IMAGE is a pinned tag (orchestrate/stack.py) or a local image tagged by its recipe's hash
ARG BASE_IMAGE=python:3.11.10-slim-bookworm
FROM ${BASE_IMAGE}
RUN groupadd --gid 10001 app \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin app
COPY build/wheels /tmp/wheels
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --no-index --find-links /tmp/wheels cachestack \
 && rm -rf /tmp/wheels
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TMPDIR=/tmp
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=5s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-m", "service.probe"]
CMD ["python", "-m", "service", "--host", "0.0.0.0", "--port", "8000"]
