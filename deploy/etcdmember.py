"""An etcd member run as a container, where ``EtcdMember`` runs a child process.

The same member, argument for argument: the container shares the host's network (so its
ports are the ones the member was given, on 127.0.0.1 as for a process), and sees its
data folder and its certificates at the very paths the arguments name (bind mounts: the
certificates read-only). Only the program differs: the etcd in the image, built by
``deploy.engine.etcd_image`` from the binary the dev extra brings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import docker.errors
from docker.models.containers import Container

from deploy.engine import ETCD_IN_IMAGE, LABEL, Engine
from mesh.local.etcdserver import EtcdMember

STOP_S = 5


@dataclass(kw_only=True)
class ContainerMember(EtcdMember):
    engine: Engine
    image: str
    owner: str = "tests"  # the ``LABEL`` value: who may sweep it up if left behind
    container: Container | None = field(default=None, repr=False)
    _log: Path | None = field(default=None, repr=False)

    def argv(self) -> list[str]:
        return [ETCD_IN_IMAGE, *super().argv()[1:]]

    def _mounts(self) -> dict[str, dict[str, str]]:
        mounts = {str(self.data_dir): {"bind": str(self.data_dir), "mode": "rw"}}
        if self.tls is not None:
            for path in (self.tls.ca, self.tls.cert, self.tls.key):
                mounts[str(path)] = {"bind": str(path), "mode": "ro"}
        return mounts

    def start(self, log_path: Path | None = None) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._log = log_path
        self.container = self.engine.client.containers.run(
            self.image,
            self.argv(),
            name=f"gpumesh-etcd-{self.name}-{self.client_port}",
            network_mode="host",
            volumes=self._mounts(),
            labels={LABEL: self.owner},
            detach=True,
        )

    def exited(self) -> int | None:
        if self.container is None:
            return None
        try:
            self.container.reload()
        except docker.errors.NotFound:
            return -1
        state = self.container.attrs.get("State", {})
        return int(state.get("ExitCode", -1)) if state.get("Status") == "exited" else None

    def stop(self, timeout_s: float = STOP_S) -> None:
        """Stop and remove the container (its log kept where a process's would be)."""
        container, self.container = self.container, None
        if container is None:
            return
        try:
            container.stop(timeout=int(timeout_s))
            if self._log is not None:
                self._log.write_bytes(container.logs())
        except docker.errors.APIError:
            pass  # gone already, or will be with the removal below
        finally:
            self.engine.remove(container)
