"""Cycles between routes: refused when a message could never leave them, counted otherwise.

Routes and sinks are the nodes of a graph; an edge X → Y says that a message X publishes
reaches Y, because Y's stream stores the subject and Y's `from` matches it:

* a route's outputs: `to`, `switch` destinations, `wiretap` copies, `enrich` requests;
* any component's dead letters, read by a route that re-feeds them (or by a sink).

An edge is *certain* when nothing on it can stop a message: the route has no `when` and none
of the stages that can drop or redirect one (filter, python, split, switch, aggregate, dedupe,
validate). Dead letters are never certain: only failures take that edge.

`check_cycles` refuses, with the routes and subjects named:

* a cycle of certain edges: every message entering it loops forever;
* a cycle through an `enrich` request (the request does not carry the hop count, so the loop
  could not be cut) or through nothing but sinks and dead letters (no route to count it);
* a component that reads its own dead letters (a message it fails on comes back forever).

Any other cycle may end, because a condition or a failure decides; it is cut at run time
instead: its routes count hops in the `Busway-Hops` header (see `busway._routing.hops`) and
dead-letter a message past their `hop_limit`. Routes with a `reply` stage are counted too,
since their reply goes wherever the request's `Busway-Reply-To` header says, a stored subject
included.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from busway._config.model import Config, RouteConfig, SinkConfig, route_targets
from busway._errors import ConfigError
from busway.routers.subject import covers

__all__ = ["CycleReport", "check_cycles"]

# Stages that may drop a message or choose its destination: a cycle through them may end.
_DECIDING_STAGES = frozenset(
    {"filter", "python", "split", "switch", "aggregate", "dedupe", "validate"}
)


@dataclass(frozen=True)
class CycleReport:
    """What `busway check` and the bus need to know about the cycles a config allows."""

    counted: frozenset[str]
    """Names of the routes that count hops (and enforce their `hop_limit`) at run time."""
    notes: tuple[str, ...]
    """One sentence per allowed cycle, for `busway check` and the start-up log."""


@dataclass(frozen=True)
class _Node:
    kind: str  # "route" or "sink"
    index: int
    config: RouteConfig | SinkConfig

    @property
    def label(self) -> str:
        return f"{self.kind} {self.config.name!r}"

    @property
    def path(self) -> str:
        return f"$.{self.kind}s[{self.index}]"


@dataclass(frozen=True)
class _Edge:
    source: _Node
    target: _Node
    subject: str
    path: str
    via: str  # "output", "enrich" or "dead letter"
    certain: bool

    def describe(self) -> str:
        what = {"output": "publishes", "enrich": "sends enrich requests to"}.get(
            self.via, "dead-letters to"
        )
        return (
            f"{self.source.label} {what} {self.subject!r}, which {self.target.label} reads "
            f"(from {self.target.config.from_!r})"
        )


def check_cycles(config: Config) -> CycleReport:
    """Refuse the cycles that cannot be cut; name the routes that must count hops."""
    nodes = [_Node("route", i, route) for i, route in enumerate(config.routes)]
    nodes += [_Node("sink", i, sink) for i, sink in enumerate(config.sinks)]
    edges = list(_edges(config, nodes))
    for edge in edges:
        if edge.source is edge.target and edge.via == "dead letter":
            raise ConfigError(
                f"{edge.source.label} reads its own dead letters ({edge.subject!r} matches its "
                "from): a message it fails on would come back forever; set `dead_letter` to a "
                "subject outside `from`",
                path=f"{edge.source.path}.dead_letter",
            )
    certain = [edge for edge in edges if edge.certain]
    for component in _components(nodes, certain):
        if len(component) > 1:
            cycle = _cycle_in(component, certain)
            raise ConfigError(
                f"{_chain(cycle)} form a cycle that every message would go round forever: "
                f"{'; '.join(edge.describe() for edge in cycle)}. Break the cycle, or give one "
                "of them a condition (`when`, a filter or a switch) so a message can leave it",
                path=cycle[0].path,
            )
    counted: set[str] = set()
    notes: list[str] = []
    for component in _components(nodes, edges):
        inside = [e for e in edges if e.source in component and e.target in component]
        if len(component) == 1 and not inside:
            continue
        cycle = _cycle_in(component, inside)
        for edge in inside:
            if edge.via == "enrich":
                raise ConfigError(
                    f"{_chain(cycle)} form a cycle through an enrich request, which cannot be "
                    f"cut at run time (a request does not carry the hop count): "
                    f"{'; '.join(e.describe() for e in cycle)}. Break the cycle",
                    path=edge.path,
                )
        routes = [node.config.name for node in component if node.kind == "route"]
        if not routes:
            raise ConfigError(
                f"{_chain(cycle)} pass dead letters round in a cycle with no route to count "
                f"it: {'; '.join(e.describe() for e in cycle)}. Break the cycle",
                path=cycle[0].path,
            )
        counted.update(routes)
        notes.append(
            f"{_chain(cycle)} can form a cycle; each message is dead-lettered after its "
            "route's hop_limit hops round it"
        )
    for route in config.routes:
        if any(stage.reply is not None for stage in route.stages):
            counted.add(route.name)
    return CycleReport(counted=frozenset(counted), notes=tuple(notes))


def _edges(config: Config, nodes: list[_Node]) -> Iterator[_Edge]:
    streams = {id(node): _stream_of(config, node.config) for node in nodes}

    def readers(subject: str) -> Iterator[_Node]:
        stream = config.stream_for(subject)
        if stream is None:
            return
        for node in nodes:
            if streams[id(node)] == stream.name and covers(node.config.from_, subject):
                yield node

    for node in nodes:
        dead_letter = config.dead_letter_subject(node.config)
        for reader in readers(dead_letter):
            yield _Edge(node, reader, dead_letter, f"{node.path}.dead_letter", "dead letter", False)
        if not isinstance(node.config, RouteConfig):
            continue
        route = node.config
        certain = route.when is None and not any(
            stage.kind in _DECIDING_STAGES for stage in route.stages
        )
        targets = [(subject, path, "output") for subject, path in route_targets(route, node.path)]
        targets += [
            (stage.enrich.request, f"{node.path}.stages[{j}].enrich.request", "enrich")
            for j, stage in enumerate(route.stages)
            if stage.enrich is not None
        ]
        for subject, path, via in targets:
            for reader in readers(subject):
                yield _Edge(node, reader, subject, path, via, certain)


def _stream_of(config: Config, component: RouteConfig | SinkConfig) -> str | None:
    if component.stream is not None:
        return component.stream
    stream = config.stream_for(component.from_)
    return stream.name if stream is not None else None


def _components(nodes: list[_Node], edges: list[_Edge]) -> list[list[_Node]]:
    """Strongly connected components (Tarjan's algorithm, iterative: no recursion limit)."""
    successors: dict[int, list[_Node]] = {id(node): [] for node in nodes}
    for edge in edges:
        successors[id(edge.source)].append(edge.target)
    index: dict[int, int] = {}
    low: dict[int, int] = {}
    on_stack: set[int] = set()
    stack: list[_Node] = []
    result: list[list[_Node]] = []
    for root in nodes:
        if id(root) in index:
            continue
        work: list[tuple[_Node, int]] = [(root, 0)]
        while work:
            node, child = work.pop()
            key = id(node)
            if child == 0:
                index[key] = low[key] = len(index)
                stack.append(node)
                on_stack.add(key)
            following = successors[key]
            if child < len(following):
                work.append((node, child + 1))
                successor = following[child]
                if id(successor) not in index:
                    work.append((successor, 0))
                elif id(successor) in on_stack:
                    low[key] = min(low[key], index[id(successor)])
                continue
            if work:  # back in the parent: pass the low-link up
                parent = id(work[-1][0])
                low[parent] = min(low[parent], low[key])
            if low[key] == index[key]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(id(member))
                    component.append(member)
                    if member is node:
                        break
                result.append(component[::-1])
    return result


def _cycle_in(component: list[_Node], edges: list[_Edge]) -> list[_Edge]:
    """One cycle through the first node of a strongly connected `component` (breadth first,
    so the shortest), as the list of its edges."""
    start = component[0]
    members = {id(node) for node in component}
    came_by: dict[int, _Edge] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for edge in edges:
                if edge.source is not node or id(edge.target) not in members:
                    continue
                if edge.target is start:
                    cycle = [edge]
                    while cycle[0].source is not start:
                        cycle.insert(0, came_by[id(cycle[0].source)])
                    return cycle
                if id(edge.target) not in came_by:
                    came_by[id(edge.target)] = edge
                    following.append(edge.target)
        frontier = following
    raise AssertionError("a strongly connected component always holds a cycle")


def _chain(cycle: list[_Edge]) -> str:
    names = [edge.source.label for edge in cycle] + [cycle[0].source.label]
    return " → ".join(names)
