"""The unit dependency graph: cycles, a topological order, dependents.

Nodes are unit names given in file order; `deps[a]` lists what `a` depends on, so an
edge `a -> b` reads "a needs b first". Names in `deps` that are not nodes are ignored
(the manifest reports those separately).
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Mapping, Sequence


def format_cycle(cycle: Sequence[str]) -> str:
    """`("a", "b", "a")` -> `a -> b -> a`."""
    return " -> ".join(cycle)


def find_cycles(nodes: Sequence[str], deps: Mapping[str, Sequence[str]]) -> list[tuple[str, ...]]:
    """One cycle per group of mutually dependent nodes, in file order.

    Each cycle starts and ends at the earliest node of its group and is a shortest way
    back to it, e.g. `("a", "b", "c", "a")`. A node depending on itself is `("a", "a")`.
    """
    position = {name: index for index, name in enumerate(nodes)}
    cycles = []
    for group in _strongly_connected(nodes, deps, position):
        start = min(group, key=position.__getitem__)
        if len(group) > 1 or start in deps.get(start, ()):
            cycles.append(_shortest_cycle(start, set(group), deps))
    cycles.sort(key=lambda cycle: position[cycle[0]])
    return cycles


def _strongly_connected(
    nodes: Sequence[str], deps: Mapping[str, Sequence[str]], position: Mapping[str, int]
) -> list[list[str]]:
    """Tarjan's algorithm, iterative so that a long chain cannot exhaust the stack."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(name: str) -> None:
        index[name] = low[name] = len(index)
        stack.append(name)
        on_stack.add(name)

    for root in nodes:
        if root in index:
            continue
        visit(root)
        work = [(root, iter(deps.get(root, ())))]
        while work:
            name, successors = work[-1]
            for successor in successors:
                if successor not in position:
                    continue
                if successor not in index:
                    visit(successor)
                    work.append((successor, iter(deps.get(successor, ()))))
                    break
                if successor in on_stack:
                    low[name] = min(low[name], index[successor])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[name])
                if low[name] == index[name]:
                    group = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.append(member)
                        if member == name:
                            break
                    groups.append(group)
    return groups


def _shortest_cycle(
    start: str, group: set[str], deps: Mapping[str, Sequence[str]]
) -> tuple[str, ...]:
    """Breadth-first from `start` within its group until an edge leads back to it."""
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        name = queue.popleft()
        for successor in deps.get(name, ()):
            if successor == start:
                path = [name]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return (*reversed(path), start)
            if successor in group and successor not in parent:
                parent[successor] = name
                queue.append(successor)
    raise ValueError(f"{start} is not on a cycle")  # pragma: no cover - callers check


def topological_order(nodes: Sequence[str], deps: Mapping[str, Sequence[str]]) -> tuple[str, ...]:
    """Every node after the nodes it depends on; among ready nodes, file order wins.

    Raises ValueError if the graph has a cycle.
    """
    position = {name: index for index, name in enumerate(nodes)}
    waiting = {name: {d for d in deps.get(name, ()) if d in position} for name in nodes}
    dependents = _reverse(nodes, deps, position)
    ready = [position[name] for name in nodes if not waiting[name]]
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        name = nodes[heapq.heappop(ready)]
        order.append(name)
        for dependent in dependents[name]:
            waiting[dependent].discard(name)
            if not waiting[dependent]:
                heapq.heappush(ready, position[dependent])
    if len(order) != len(nodes):
        cycle = find_cycles(nodes, deps)[0]
        raise ValueError(f"dependency cycle: {format_cycle(cycle)}")
    return tuple(order)


def transitive_dependents(
    name: str, nodes: Sequence[str], deps: Mapping[str, Sequence[str]]
) -> frozenset[str]:
    """Every node that depends on `name`, directly or through others (not `name` itself)."""
    position = {node: index for index, node in enumerate(nodes)}
    dependents = _reverse(nodes, deps, position)
    found: set[str] = set()
    queue = deque(dependents.get(name, ()))
    while queue:
        current = queue.popleft()
        if current not in found:
            found.add(current)
            queue.extend(dependents[current])
    found.discard(name)
    return frozenset(found)


def _reverse(
    nodes: Sequence[str], deps: Mapping[str, Sequence[str]], position: Mapping[str, int]
) -> dict[str, list[str]]:
    dependents: dict[str, list[str]] = {name: [] for name in nodes}
    for name in nodes:
        for dependency in dict.fromkeys(deps.get(name, ())):
            if dependency in position:
                dependents[dependency].append(name)
    return dependents
