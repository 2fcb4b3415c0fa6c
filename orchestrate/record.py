"""The record of what a stack was brought up with (stack.Settings), kept with the stack, so
that every later command that makes a container again keeps its port, TLS, monitoring,
replicas and image mode instead of falling back to the defaults.

It is the labels of an empty volume of the project, `<project>_settings`: found by the
project's label like the stack's other resources, removed by `down`, shown by `docker volume
inspect`, and the same whichever checkout asks the engine. A volume's labels cannot change, so
`up` replaces it when the settings do; it holds no data and nothing mounts it. A container's
labels would not do: `up` keeps every container a change does not touch, so none of them could
say that a setting changed. Nothing in it is secret.
"""

from __future__ import annotations

import dataclasses
import json

import docker
import docker.errors
from docker.models.volumes import Volume

from .errors import OrchestrateError
from .stack import PROJECT_LABEL, Settings, Stack

SETTINGS_LABEL = "org.cachestack.settings"
VOLUME = "settings"


def _volume(client: docker.DockerClient, project: str) -> Volume | None:
    """The project's record, if it has one; a volume of its name that is not one is refused."""
    try:
        volume = client.volumes.get(f"{project}_{VOLUME}")
    except docker.errors.NotFound:
        return None
    labels = volume.attrs.get("Labels") or {}
    if labels.get(PROJECT_LABEL) != project or SETTINGS_LABEL not in labels:
        raise OrchestrateError(f"volume {volume.name} exists but is not project {project}'s "
                               "record of its settings")
    return volume


def write(client: docker.DockerClient, stack: Stack, settings: Settings) -> None:
    """Record `settings` as what `stack` is brought up with (unless it already is)."""
    text = json.dumps(dataclasses.asdict(settings), sort_keys=True)
    volume = _volume(client, stack.project)
    if volume is not None:
        if volume.attrs["Labels"][SETTINGS_LABEL] == text:
            return
        volume.remove()
    client.volumes.create(stack.resource_name(VOLUME),
                          labels={**stack.labels(), SETTINGS_LABEL: text})


def read(client: docker.DockerClient, project: str) -> Settings | None:
    """What the project was brought up with; None when it has no record."""
    volume = _volume(client, project)
    if volume is None:
        return None
    try:
        return Settings(**json.loads(volume.attrs["Labels"][SETTINGS_LABEL]))
    except (ValueError, TypeError):
        raise OrchestrateError(
            f"project {project}'s record of its settings ({volume.name}) is not one this "
            f"orchestrator reads: bring it up again with `python -m orchestrate up --project "
            f"{project}` and its options") from None


def forget(client: docker.DockerClient, project: str) -> str | None:
    """Remove the project's record; the name of the volume that held it, if there was one."""
    volume = _volume(client, project)
    if volume is None:
        return None
    volume.remove()
    return volume.name
