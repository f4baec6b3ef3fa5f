"""A Compose file brought up through the container engine's API, as written.

No ``docker compose`` runs here (none can be installed), and podman's healthchecks need
systemd, which these machines do not run as their init. So this reads the file itself
and does what Compose does for the part of the specification the file uses: ``${VAR}``
and ``${VAR:-default}`` interpolation (``$$`` is a literal ``$``), YAML merge keys,
``profiles``, one bridge network where each service is found by its name, named volumes
and bind mounts (relative to the file), ``environment``, ``command``, ``entrypoint``,
``user``, ``ports``, and ``depends_on`` with its three conditions. A healthcheck is run
the way the engine would, in the container (``exec``), every ``interval`` for up to
``retries`` tries. Images are never pulled: one the engine lacks is an error, so what the
fleet runs is exactly what was built here.

Every container, volume and the network carry the project's label: ``down`` removes them
all, whatever state the run left them in.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import docker.errors
import yaml
from docker.models.containers import Container
from docker.types import EndpointConfig

from deploy.engine import LABEL, Engine

VARIABLE = re.compile(r"\$\$|\$\{(\w+)(?::-([^}]*))?\}")
UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
ONE_SHOT_S = 120  # the most a service run to completion may take
DEPENDS = {"service_started", "service_healthy", "service_completed_successfully"}


def interpolated(value: Any, env: Mapping[str, str]) -> Any:
    """``value`` with every string's variables replaced, as Compose does."""
    if isinstance(value, str):

        def one(found: re.Match[str]) -> str:
            if found.group(0) == "$$":
                return "$"
            return env.get(found.group(1)) or (found.group(2) or "")

        return VARIABLE.sub(one, value)
    if isinstance(value, list):
        return [interpolated(item, env) for item in value]
    if isinstance(value, dict):
        return {key: interpolated(item, env) for key, item in value.items()}
    return value


def seconds(duration: str | int | float) -> float:
    """A Compose duration (``5s``, ``1m30s``, ``500ms``) in seconds."""
    if isinstance(duration, int | float):
        return float(duration)
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration)
    if not parts or "".join(n + u for n, u in parts) != duration:
        raise ValueError(f"not a duration: {duration!r}")
    return sum(float(number) * UNITS[unit] for number, unit in parts)


def enabled(file: Path, profiles: frozenset[str], env: Mapping[str, str]) -> dict[str, Any]:
    """The file, interpolated, with only the services enabled for ``profiles`` (those
    without a profile always are)."""
    loaded: dict[str, Any] = interpolated(yaml.safe_load(file.read_text()), env)
    loaded["services"] = {
        name: spec
        for name, spec in loaded["services"].items()
        if not spec.get("profiles") or profiles & set(spec["profiles"])
    }
    return loaded


def order(services: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The services, each after those it depends on; a cycle, or a dependency on a service
    not enabled, is an error."""
    done: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in done:
            return
        if name in path:
            raise ValueError(f"depends_on cycle: {' -> '.join((*path, name))}")
        if name not in services:
            raise ValueError(f"{path[-1]} depends on {name}, which is not enabled")
        for needed in services[name].get("depends_on", {}):
            visit(needed, (*path, name))
        done.append(name)

    for name in services:
        visit(name, ())
    return done


class Fleet:
    def __init__(
        self,
        engine: Engine,
        file: Path,
        project: str,
        profiles: frozenset[str] = frozenset(),
        env: Mapping[str, str] | None = None,
    ) -> None:
        """The services of ``file`` enabled for ``profiles``, with ``env`` (default: this
        process's) for interpolation."""
        self._engine = engine
        self._folder = file.parent
        self.project = project
        loaded = enabled(file, profiles, os.environ if env is None else env)
        self.services: dict[str, dict[str, Any]] = loaded["services"]
        self._volumes = set(loaded.get("volumes") or {})
        self._network = f"{project}_default"
        self.containers: dict[str, Container] = {}

    # -- up ------------------------------------------------------------------------------

    def up(self) -> None:
        labels = {LABEL: self.project}
        self._engine.client.networks.create(self._network, driver="bridge", labels=labels)
        for volume in self._volumes:
            self._engine.client.volumes.create(f"{self.project}_{volume}", labels=labels)
        for name in order(self.services):
            for needed, how in self.services[name].get("depends_on", {}).items():
                self._wait(needed, how.get("condition", "service_started"))
            self.containers[name] = self._start(name)

    def _start(self, name: str, **overrides: Any) -> Container:
        spec = {**self.services[name], **overrides}
        image = spec["image"]
        if not self._engine.image_exists(image):
            raise LookupError(f"service {name}: image {image} is not built here (no pulls)")
        return self._engine.client.containers.run(
            image,
            spec.get("command"),
            entrypoint=spec.get("entrypoint"),
            environment=spec.get("environment"),
            user=spec.get("user"),
            name=f"{self.project}-{name}" + overrides.get("suffix", ""),
            hostname=name,
            labels={LABEL: self.project},
            volumes=dict(self._mounts(spec.get("volumes", []))),
            ports=dict(self._ports(spec.get("ports", []))),
            network=self._network,
            networking_config={self._network: EndpointConfig("1.41", aliases=[name])},
            detach=True,
        )

    def _mounts(self, volumes: list[str]) -> Iterator[tuple[str, dict[str, str]]]:
        for volume in volumes:
            source, target, *mode = volume.split(":")
            if source.startswith((".", "/")):
                source = str((self._folder / source).resolve())
            else:
                source = f"{self.project}_{source}"
            yield source, {"bind": target, "mode": mode[0] if mode else "rw"}

    @staticmethod
    def _ports(ports: list[str]) -> Iterator[tuple[str, tuple[str, int]]]:
        for port in ports:
            host, published, inside = port.split(":")
            yield f"{inside}/tcp", (host, int(published))

    def _wait(self, name: str, condition: str) -> None:
        if condition not in DEPENDS:
            raise ValueError(f"depends_on condition {condition!r}: not one of {sorted(DEPENDS)}")
        container = self.containers[name]
        if condition == "service_completed_successfully":
            code = container.wait(timeout=ONE_SHOT_S)["StatusCode"]
            if code != 0:
                raise RuntimeError(f"{name} exited with {code}:\n{self.logs(name)}")
        elif condition == "service_healthy":
            self.wait_healthy(name)

    def wait_healthy(self, name: str) -> None:
        """Run the service's healthcheck in its container until it passes, as the engine
        would: every ``start_interval`` during its ``start_period`` (failures there do not
        count), then every ``interval``, failing after ``retries`` failures."""
        check = self.services[name]["healthcheck"]
        kind, *test = check["test"]
        argv = ["/bin/sh", "-c", test[0]] if kind == "CMD-SHELL" else test
        interval = seconds(check.get("interval", "30s"))
        starting = time.monotonic() + seconds(check.get("start_period", 0))
        start_interval = seconds(check.get("start_interval", "5s"))
        container, failures = self.containers[name], 0
        while failures < int(check.get("retries", 3)):
            container.reload()
            if container.status != "running":
                raise RuntimeError(f"{name} is {container.status}:\n{self.logs(name)}")
            if container.exec_run(argv).exit_code == 0:
                return
            if time.monotonic() < starting:
                time.sleep(start_interval)
                continue
            failures += 1
            time.sleep(interval)
        raise RuntimeError(f"{name} never became healthy:\n{self.logs(name)}")

    # -- while up ------------------------------------------------------------------------

    def run(self, name: str, entrypoint: list[str], command: list[str]) -> bytes:
        """``compose run --rm``: the service's container for one command; its output,
        or an error with it if the command failed."""
        container = self._start(name, entrypoint=entrypoint, command=command, suffix="-run")
        try:
            code = container.wait(timeout=ONE_SHOT_S)["StatusCode"]
            output = container.logs()
        finally:
            self._engine.remove(container)
        if code != 0:
            raise RuntimeError(f"{name} {command} exited with {code}: {output.decode()}")
        return output

    def logs(self, name: str) -> str:
        return self.containers[name].logs(tail=40).decode(errors="replace")

    # -- down ----------------------------------------------------------------------------

    def _owned(self) -> list[tuple[str, Any]]:
        """Every container, volume and network of the project still there, by kind."""
        client, owned = self._engine.client, {"label": f"{LABEL}={self.project}"}
        return [
            *(("container", c) for c in self._engine.leftovers(self.project)),
            *(("volume", v) for v in client.volumes.list(filters=owned)),
            *(("network", n) for n in client.networks.list(names=[self._network])),
        ]

    def remaining(self) -> list[str]:
        return [f"{kind} {thing.name}" for kind, thing in self._owned()]

    def down(self) -> list[str]:
        """Remove every container, volume and network of the project (containers first:
        the others are in their use); what was removed."""
        removed = []
        for kind, thing in self._owned():
            try:
                if kind == "container":
                    self._engine.remove(thing)
                elif kind == "volume":
                    thing.remove(force=True)
                else:
                    thing.remove()
            except docker.errors.NotFound:
                continue
            removed.append(f"{kind} {thing.name}")
        return removed
