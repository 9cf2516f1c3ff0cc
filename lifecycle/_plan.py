"""Compiling a job's dependency graph into a flat plan.

A plan is data: the depth-first setup order with every argument already resolved to a
slot, a job argument, the JobContext or a worker-scoped node, and every graph error is
found here. ``_codegen`` turns a plan into the function that runs the job (so nothing
inspects a signature per job); the CLI reads it through ``Plan.inputs`` and
``Plan.roots``. This module imports neither: the pipeline runs one way,
analysis -> plan -> code."""

from __future__ import annotations

import enum
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from ._analysis import EMPTY, Param, Provider, Source, analyse, label
from ._errors import DependencyError
from ._markers import Depends


class Arg(enum.IntEnum):
    """Where one argument of a call comes from. A source is a pair (tag, ref)."""

    SLOT = 0  # ref: index of a value set up earlier in this job
    PAYLOAD = 1  # ref: name of a job argument
    CONTEXT = 2  # ref: unused
    CONST = 3  # ref: the value (a default needed to keep positional-only arguments in place)
    WORKER = 4  # ref: a WorkerNode (only inside worker nodes)


ArgSource = tuple[Arg, Any]


class Arguments:
    """Where each argument of one call comes from; ``_codegen`` spells the call out."""

    __slots__ = ("keyword", "positional")

    def __init__(self, positional: tuple[ArgSource, ...] = (), keyword: tuple[tuple[str, ArgSource], ...] = ()) -> None:
        self.positional = positional
        self.keyword = keyword

    def named(self) -> list[tuple[str, ArgSource]]:
        """Every source with a name for it: the parameter's, or ``arg0``... when positional."""
        return [(f"arg{index}", source) for index, source in enumerate(self.positional)] + list(self.keyword)


@dataclass(eq=False, slots=True)
class WorkerNode:
    """A worker-scoped provider; its arguments can only be other worker nodes."""

    provider: Provider
    key: Hashable
    arguments: Arguments


@dataclass(frozen=True, slots=True)
class Step:
    """Set up one job-scoped value (or fetch one worker-scoped value) into ``slot``."""

    provider: Provider
    slot: int
    arguments: Arguments
    worker: WorkerNode | None = None


class Input(NamedTuple):
    """One argument of a call, as the CLI draws it: exactly one of ``step``,
    ``worker``, ``argument`` and ``context`` is set (a constant default is left out)."""

    param: str  # the parameter's name, ``arg0``... for a positional-only one
    step: Step | None = None  # a value set up earlier in the job (or a worker-scoped fetch)
    worker: WorkerNode | None = None  # another worker-scoped value (inside a worker node)
    argument: str | None = None  # a job argument, by name
    context: bool = False  # the JobContext


@dataclass(frozen=True, slots=True)
class Plan:
    """One job's compiled graph (data only; ``_codegen.compile_runners`` makes its code).

    Args:
        job_name: the job's name.
        job_label: the job function's ``module:qualname``.
        body: the job function.
        body_arguments: where each of the body's arguments comes from.
        steps: the setups in order; ``steps[i].slot == i``.
        exits: the job-scoped generators, in setup order (torn down in reverse).
        guarded: some teardown can suspend, so it needs shielding and a bound.
        needs_context: some provider or the body takes the JobContext.
    """

    job_name: str
    job_label: str
    body: Provider
    body_arguments: Arguments
    steps: tuple[Step, ...]
    exits: tuple[Provider, ...]
    guarded: bool
    needs_context: bool

    def inputs(self, of: Step | WorkerNode | None = None) -> list[Input]:
        """The arguments of a step, of a worker node, or (``None``) of the job body."""
        arguments = self.body_arguments if of is None else of.arguments
        found = []
        for name, (tag, ref) in arguments.named():
            if tag == Arg.SLOT:
                found.append(Input(name, step=self.steps[ref]))
            elif tag == Arg.WORKER:
                found.append(Input(name, worker=ref))
            elif tag == Arg.PAYLOAD:
                found.append(Input(name, argument=ref))
            elif tag == Arg.CONTEXT:
                found.append(Input(name, context=True))
        return found

    def roots(self) -> list[Step]:
        """The steps nobody injects: ``dependencies=[...]`` of the job or the runtime."""
        referenced = {
            ref
            for arguments in (self.body_arguments, *(step.arguments for step in self.steps))
            for _, (tag, ref) in arguments.named()
            if tag == Arg.SLOT
        }
        return [step for step in self.steps if step.slot not in referenced]


def cache_key(call: Callable[..., Any]) -> Hashable:
    """The per-job cache identity of a provider: the callable itself when hashable."""
    try:
        hash(call)
    except TypeError:
        return ("unhashable", id(call))
    return call


class _Builder:
    def __init__(self, job_name: str, job_label: str, overrides: Mapping[Any, Any], payload: frozenset[str]) -> None:
        self.job_name = job_name
        self.job_label = job_label
        self.overrides = overrides
        self.payload = payload
        self.steps: list[Step] = []
        self.cached: dict[Hashable, int] = {}
        self.workers: dict[Hashable, WorkerNode] = {}
        self.worker_slots: dict[Hashable, int] = {}

    # -- messages -------------------------------------------------------------------
    def where(self, path: Sequence[str], param: str | None = None) -> str:
        text = f"job {self.job_name!r} ({self.job_label})"
        if len(path) > 1:
            text += ", dependency " + " -> ".join(path[1:])
        if param is not None:
            text += f", parameter {param!r}"
        return text

    def resolve(self, call: Callable[..., Any], path: Sequence[str], param: str) -> Provider:
        replacement = self.overrides.get(call, call) if _hashable(call) else call
        try:
            return analyse(replacement)
        except DependencyError as exc:
            raise DependencyError(f"{self.where(path, param)}: {exc}") from exc

    def no_cycle(self, provider: Provider, path: Sequence[str], keys: tuple[Hashable, ...]) -> Hashable:
        """The provider's cache key, after checking it is not already on the path."""
        key = cache_key(provider.call)
        if key in keys:
            cycle = " -> ".join((*path, provider.label)[keys.index(key) :])
            raise DependencyError(f"dependency cycle in job {self.job_name!r} ({self.job_label}): {cycle}")
        return key

    # -- job scope --------------------------------------------------------------------
    def depend(self, marker: Depends, path: tuple[str, ...], keys: tuple[Hashable, ...], param: str) -> ArgSource:
        assert marker.dependency is not None
        provider = self.resolve(marker.dependency, path, param)
        key = self.no_cycle(provider, path, keys)
        if provider.scope == "worker":
            slot = self.worker_slots.get(key)
            if slot is None:
                node = self.worker(provider, (*path, provider.label), (*keys, key))
                slot = self.worker_slots[key] = len(self.steps)
                self.steps.append(Step(provider, slot, Arguments(), node))
            return (Arg.SLOT, slot)
        if marker.use_cache and key in self.cached:
            return (Arg.SLOT, self.cached[key])
        args = self.arguments(provider.params, (*path, provider.label), (*keys, key))
        slot = len(self.steps)
        self.steps.append(Step(provider, slot, args))
        if marker.use_cache:
            self.cached[key] = slot
        return (Arg.SLOT, slot)

    def arguments(self, params: Sequence[Param], path: tuple[str, ...], keys: tuple[Hashable, ...]) -> Arguments:
        positional: list[ArgSource] = []
        keyword: list[tuple[str, ArgSource]] = []
        pending_defaults: list[ArgSource] = []
        for p in params:
            source: ArgSource | None
            if p.source is Source.DEPENDS:
                assert p.depends is not None
                source = self.depend(p.depends, path, keys, p.name)
            elif p.source is Source.CONTEXT:
                source = (Arg.CONTEXT, None)
            elif p.name in self.payload:
                source = (Arg.PAYLOAD, p.name)
            elif p.default is not EMPTY:
                source = None
            else:
                raise DependencyError(
                    f"{self.where(path, p.name)}: cannot be filled: it is not a Depends(...), not "
                    f"annotated JobContext, has no default, and job {self.job_name!r} has no "
                    f"argument named {p.name!r}"
                )
            if p.positional_only:
                if source is None:
                    pending_defaults.append((Arg.CONST, p.default))
                else:
                    positional.extend(pending_defaults)
                    pending_defaults.clear()
                    positional.append(source)
            elif source is not None:
                keyword.append((p.name, source))
        return Arguments(tuple(positional), tuple(keyword))

    # -- worker scope -----------------------------------------------------------------
    def worker(self, provider: Provider, path: tuple[str, ...], keys: tuple[Hashable, ...]) -> WorkerNode:
        key = keys[-1]
        node = self.workers.get(key)
        if node is not None:
            return node
        positional: list[ArgSource] = []
        keyword: list[tuple[str, ArgSource]] = []
        for p in provider.params:
            source: ArgSource | None = None
            if p.source is Source.DEPENDS:
                assert p.depends is not None
                sub = self.resolve(p.depends.dependency, path, p.name)  # type: ignore[arg-type]
                sub_key = self.no_cycle(sub, path, keys)
                if sub.scope != "worker":
                    raise DependencyError(
                        f"{self.where(path, p.name)}: worker-scoped {provider.label} cannot depend "
                        f"on job-scoped {sub.label}; make it @dependency(scope='worker') or move "
                        "the dependency to job scope"
                    )
                source = (Arg.WORKER, self.worker(sub, (*path, sub.label), (*keys, sub_key)))
            elif p.source is Source.CONTEXT:
                raise DependencyError(
                    f"{self.where(path, p.name)}: worker-scoped {provider.label} cannot take the "
                    "JobContext; it outlives every job"
                )
            elif p.default is EMPTY:
                raise DependencyError(
                    f"{self.where(path, p.name)}: worker-scoped {provider.label} cannot take job "
                    "arguments (it is created once for all jobs); give the parameter a default "
                    "or make it a Depends(...)"
                )
            if p.positional_only:
                positional.append(source if source is not None else (Arg.CONST, p.default))
            elif source is not None:
                keyword.append((p.name, source))
        node = WorkerNode(provider, key, Arguments(tuple(positional), tuple(keyword)))
        self.workers[key] = node
        return node


def _hashable(call: Any) -> bool:
    try:
        hash(call)
    except TypeError:
        return False
    return True


def compile_plan(
    job_name: str,
    body: Provider,
    payload: frozenset[str],
    extra: Sequence[Depends],
    overrides: Mapping[Any, Any],
) -> Plan:
    """Build the plan for one job. ``extra`` are the value-less dependencies
    (``Runtime(dependencies=...)`` first, then ``@job(dependencies=...)``)."""
    job_label = label(body.call)
    builder = _Builder(job_name, job_label, overrides, payload)
    root = (job_label,)
    keys = (cache_key(body.call),)
    for index, marker in enumerate(extra):
        if not isinstance(marker, Depends):
            raise DependencyError(
                f"job {job_name!r} ({job_label}): dependencies[{index}] must be Depends(...), got {marker!r}"
            )
        if marker.dependency is None:
            raise DependencyError(
                f"job {job_name!r} ({job_label}): dependencies[{index}] is Depends() without a callable"
            )
        builder.depend(marker, root, keys, f"dependencies[{index}]")
    body_arguments = builder.arguments(body.params, root, keys)
    steps = tuple(builder.steps)
    exits = tuple(step.provider for step in steps if step.worker is None and step.provider.is_generator)
    guarded = any(step.worker is None and step.provider.teardown_suspends for step in steps)
    needs_context = any(
        tag == Arg.CONTEXT
        for arguments in (body_arguments, *(step.arguments for step in steps))
        for tag, _ in (*arguments.positional, *(source for _, source in arguments.keyword))
    )
    return Plan(job_name, job_label, body, body_arguments, steps, exits, guarded, needs_context)
