"""Showing a job's compiled dependency graph: a tree, Mermaid or Graphviz DOT, and the
one-paragraph summaries of ``lifecycle list``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .._analysis import EMPTY, Kind, Provider
from .._job import Job
from .._plan import Input, Plan, Step, WorkerNode

KIND_NAMES = {
    Kind.FUNCTION: "sync function",
    Kind.COROUTINE: "async function",
    Kind.GENERATOR: "sync generator",
    Kind.ASYNC_GENERATOR: "async generator",
}


@dataclass
class Node:
    key: str
    label: str
    detail: str
    edge: str  # the parameter that asks for it
    children: list[Node] = field(default_factory=list)
    repeat: bool = False  # shown in full elsewhere (per-job cache / worker scope)


def _describe(provider: Provider, scope: str) -> str:
    return f"{scope} scope, {KIND_NAMES[provider.kind]}" + (", in a thread" if provider.threaded else "")


def build_tree(plan: Plan) -> Node:
    seen: set[str] = set()

    def worker_node(node: WorkerNode, edge: str) -> Node:
        key = f"w:{node.provider.label}"
        out = Node(key, node.provider.label, _describe(node.provider, "worker"), edge, repeat=key in seen)
        if not out.repeat:
            seen.add(key)
            out.children = [worker_node(found.worker, found.param) for found in plan.inputs(node) if found.worker]
        return out

    def step_node(step: Step, edge: str) -> Node:
        if step.worker is not None:
            return worker_node(step.worker, edge)
        key = f"s:{step.slot}"
        out = Node(key, step.provider.label, _describe(step.provider, "job"), edge, repeat=key in seen)
        if not out.repeat:
            seen.add(key)
            out.children = children(plan.inputs(step))
        return out

    def children(inputs: list[Input]) -> list[Node]:
        found = []
        for each in inputs:
            if each.step is not None:
                found.append(step_node(each.step, each.param))
            elif each.argument is not None:
                found.append(Node(f"a:{each.argument}", each.argument, "job argument", each.param))
            elif each.context:
                found.append(Node("ctx", "JobContext", "injected", each.param))
        return found

    root = Node("job", plan.job_name, f"job {plan.job_label}", "")
    root.children = [step_node(step, "dependencies=[...]") for step in plan.roots()]
    root.children += children(plan.inputs())
    return root


def render_tree(root: Node) -> str:
    lines = [f"{root.label}  ({root.detail})"]

    def walk(node: Node, prefix: str, last: bool) -> None:
        branch = "└── " if last else "├── "
        edge = f"{node.edge}: " if node.edge and node.edge != node.label else ""
        note = "  (shared, shown above)" if node.repeat else ""
        lines.append(f"{prefix}{branch}{edge}{node.label}  [{node.detail}]{note}")
        for i, child in enumerate(node.children):
            walk(child, prefix + ("    " if last else "│   "), i == len(node.children) - 1)

    for i, child in enumerate(root.children):
        walk(child, "", i == len(root.children) - 1)
    return "\n".join(lines)


def _edges(root: Node) -> tuple[dict[str, Node], list[tuple[str, str, str]]]:
    nodes: dict[str, Node] = {}
    edges: list[tuple[str, str, str]] = []

    def walk(node: Node) -> None:
        nodes.setdefault(node.key, node)
        for child in node.children:
            edges.append((node.key, child.key, child.edge))
            if not child.repeat:
                walk(child)

    walk(root)
    return nodes, edges


def render_mermaid(root: Node) -> str:
    nodes, edges = _edges(root)
    ids = {key: f"n{i}" for i, key in enumerate(nodes)}
    lines = ["graph TD"]
    for key, node in nodes.items():
        text = f"{node.label}<br/><small>{node.detail}</small>".replace('"', "'")
        lines.append(f'    {ids[key]}["{text}"]')
    for parent, child, edge in edges:
        lines.append(f"    {ids[parent]} -->|{edge}| {ids[child]}" if edge else f"    {ids[parent]} --> {ids[child]}")
    return "\n".join(lines)


def render_dot(root: Node) -> str:
    nodes, edges = _edges(root)
    ids = {key: f"n{i}" for i, key in enumerate(nodes)}
    lines = ["digraph lifecycle {", "    rankdir=TB;", "    node [shape=box, fontname=monospace];"]
    for key, node in nodes.items():
        text = f"{node.label}\\n{node.detail}".replace('"', '\\"')
        lines.append(f'    {ids[key]} [label="{text}"];')
    for parent, child, edge in edges:
        lines.append(f'    {ids[parent]} -> {ids[child]} [label="{edge}"];')
    lines.append("}")
    return "\n".join(lines)


def summary(name: str, job: Job[..., Any], plan: Plan | None) -> str:
    options = []
    for param in job.params:
        ann = getattr(param.annotation, "__name__", None) or (
            "" if param.annotation is EMPTY else str(param.annotation)
        )
        text = f"{param.name}: {ann}" if ann else param.name
        options.append(text + ("" if param.default is EMPTY else f" = {param.default!r}"))
    lines = [f"{job.name}  ({name}; retries={job.retries}, timeout={job.timeout})"]
    lines.append(f"    arguments: {', '.join(options) or 'none'}")
    if plan is not None:
        deps = [f"{step.provider.label} [{'worker' if step.worker is not None else 'job'}]" for step in plan.steps]
        lines.append(f"    dependencies: {', '.join(deps) or 'none'}")
    doc = (job.fn.__doc__ or "").strip().splitlines()
    if doc:
        lines.append(f"    {doc[0]}")
    return "\n".join(lines)
