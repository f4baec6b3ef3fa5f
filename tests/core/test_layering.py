"""The package layering, read from the source: no import runs upward, and the pure core
reaches no I/O library through any chain of imports.

It also holds the ports to their adapters: nothing in ``mesh.agent`` imports the etcd
client (the store port, ``mesh.store``, does), and only the edges import grpc (the
servicers and their interceptor, the peer adapter, the HTTP gateway). And no import
cycle at all, types-only ones included: parts that need each other meet through the
composition root and the event hub (``mesh.agent.compose``, ``mesh.agent.events``).

Layers, lowest first: ``core`` and the shared base modules (errors, config, topology,
gpus, metrics, logs, tracing, the generated stubs, pipelines, trust, channels, client); the adapters
``store`` and ``gossip``, and the ``sdk`` beside them; ``agent``; ``local``; ``cli``. A
module may import its own package and anything in a lower layer; the core and the base
modules, both pure or shared data, may import each other. Imports under
``if TYPE_CHECKING:`` are types only and do not count.
"""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

import mesh

ROOT = Path(mesh.__file__).parent
FORBIDDEN_IN_CORE = {"grpc", "aetcd", "msgpack", "yaml"}
BASE = {
    "mesh",
    "mesh.errors",
    "mesh.config",
    "mesh.topology",
    "mesh.gpus",
    "mesh.metrics",
    "mesh.logs",
    "mesh.tracing",
    "mesh.protogen",
    "mesh.channels",
    "mesh.client",
}
RANKS = {
    "core": 0,
    "base": 0,
    "store": 1,
    "gossip": 1,
    "sdk": 1,
    "agent": 2,
    "local": 3,
    "cli": 4,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def layer(module: str) -> str:
    if module in BASE or module.startswith(("mesh.v1", "mesh.pipelines", "mesh.trust")):
        return "base"
    package = module.split(".")[1]
    if package not in RANKS:
        raise AssertionError(f"{module} is in no layer: add its package to the layering test")
    return package


def _imports_in(tree: ast.Module, types_too: bool) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            types_only = isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test)
            if types_only and not types_too:
                continue
            if isinstance(child, ast.Import | ast.ImportFrom):
                found.append(child)
            visit(child)

    visit(tree)
    return found


def imports(module: str, types_too: bool = False) -> tuple[set[str], set[str]]:
    """The mesh modules and the third-party top-level packages ``module`` imports (at
    run time; with ``types_too``, under ``if TYPE_CHECKING:`` too)."""
    internal, external = set(), set()
    for node in _imports_in(ast.parse(MODULES[module].read_text()), types_too):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            assert node.level == 0, f"{module}: relative import"
            base = node.module or ""
            # ``from mesh.x import y``: y may be a module of its own.
            names = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names
            ]
        for name in names:
            if name.split(".")[0] != "mesh":
                external.add(name.split(".")[0])
                continue
            parts = name.split(".")
            while ".".join(parts) not in MODULES:  # an attribute of a module
                parts.pop()
            internal.add(".".join(parts))
            for i in range(1, len(parts)):  # importing a.b.c runs a and a.b first
                internal.add(".".join(parts[:i]))
    internal.discard(module)
    return internal, external


GRAPH = {m: imports(m) for m in MODULES}


def test_every_module_is_in_a_layer() -> None:
    for module in MODULES:
        layer(module)


def test_no_import_runs_upward_or_across() -> None:
    wrong = []
    for module, (internal, _) in GRAPH.items():
        mine = layer(module)
        for target in internal:
            theirs = layer(target)
            shared = {mine, theirs} == {"core", "base"}
            if theirs != mine and not shared and RANKS[theirs] >= RANKS[mine]:
                wrong.append(f"{module} ({mine}) imports {target} ({theirs})")
    assert not wrong, "\n".join(sorted(wrong))


def chain_to_forbidden(start: str) -> list[str] | None:
    """A chain of mesh imports from ``start`` to a module that imports a forbidden
    library, ending with that library; None if there is none."""
    came_from: dict[str, str | None] = {start: None}
    todo = deque([start])
    while todo:
        module = todo.popleft()
        internal, external = GRAPH[module]
        bad = sorted(external & FORBIDDEN_IN_CORE)
        if bad:
            chain = [bad[0]]
            at: str | None = module
            while at is not None:
                chain.append(at)
                at = came_from[at]
            return chain[::-1]
        for target in internal:
            if target not in came_from:
                came_from[target] = module
                todo.append(target)
    return None


def test_the_core_reaches_no_io_library() -> None:
    chains = [chain_to_forbidden(m) for m in MODULES if layer(m) == "core"]
    found = [" -> ".join(c) for c in chains if c is not None]
    assert not found, "\n".join(found)


def test_the_walk_sees_a_chain_when_there_is_one() -> None:
    """The checker itself: the agent reaches grpc (through its service), so a chain
    from it must be found, or the core test above would prove nothing."""
    chain = chain_to_forbidden("mesh.agent.service")
    assert chain is not None and chain[-1] in FORBIDDEN_IN_CORE


# The agent modules that may speak gRPC: the servicers and the interceptor that checks
# callers, the status table they answer with, the one peer client, the HTTP gateway.
GRPC_EDGES = {
    "mesh.agent.service",
    "mesh.agent.auth",
    "mesh.agent.status",
    "mesh.agent.peers",
    "mesh.agent.http.gateway",
}


def test_the_agent_reaches_etcd_only_through_the_store_port() -> None:
    direct = sorted(m for m, (_, ext) in GRAPH.items() if layer(m) == "agent" and "aetcd" in ext)
    assert not direct, f"import aetcd outside mesh.store: {direct}"


def test_grpc_is_spoken_only_at_the_agents_edges() -> None:
    speaking = {
        m
        for m, (_, external) in GRAPH.items()
        if layer(m) == "agent" and any(e.startswith("grpc") for e in external)
    }
    assert speaking <= GRPC_EDGES, f"grpc beyond the edges: {sorted(speaking - GRPC_EDGES)}"


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_at_all_types_included() -> None:
    # A package imports its modules' names freely (``mesh.x`` runs first whenever
    # ``mesh.x.y`` is imported): only module-to-module edges can make a cycle.
    graph = {
        m: {t for t in imports(m, types_too=True)[0] if not m.startswith(t + ".")} for m in MODULES
    }
    assert not cycles(graph), cycles(graph)


def test_the_cycle_finder_finds_one() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# Only these modules of mesh.store know the client is aetcd: the key-value port's etcd
# adapter (etcd, etcdkv, group, watcher) and the operator's tools that administer etcd
# itself (rbac: users and roles; topostore: applying a topology), which no agent runs.
ETCD_ADAPTER = {
    "mesh.store.etcd",
    "mesh.store.etcdkv",
    "mesh.store.group",
    "mesh.store.watcher",
    "mesh.store.rbac",
    "mesh.store.topostore",
}


def test_the_store_reaches_etcd_through_its_key_value_port() -> None:
    direct = {m for m, (_, ext) in GRAPH.items() if layer(m) == "store" and "aetcd" in ext}
    assert direct <= ETCD_ADAPTER, f"aetcd outside the adapter: {sorted(direct - ETCD_ADAPTER)}"
