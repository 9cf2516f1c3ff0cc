"""Graph validation at decoration time and payload validation before any setup."""

import inspect
from typing import Annotated, Any

import pytest

from lifecycle import (
    DependencyError,
    Depends,
    JobContext,
    LifecycleError,
    PayloadError,
    Runtime,
    dependency,
    job,
)


def test_cycle_is_reported_with_its_path_at_decoration() -> None:
    def a(x: Any = None) -> None:
        pass

    def b(y=Depends(a)) -> None:
        pass

    def c(z=Depends(b)) -> None:
        pass

    # Close the loop a -> c -> b -> a after the fact (a def cannot name what follows it).
    a.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter("x", inspect.Parameter.KEYWORD_ONLY, default=Depends(c))]
    )
    with pytest.raises(DependencyError) as info:

        @job
        async def cyclic(v=Depends(a)) -> None:
            pass

    message = str(info.value)
    assert "cycle" in message and "'cyclic'" in message
    prefix = "test_graph_errors:test_cycle_is_reported_with_its_path_at_decoration.<locals>."
    assert message.endswith(": " + " -> ".join(prefix + name for name in "acba"))


def test_unresolvable_parameter_names_job_dependency_and_parameter() -> None:
    def current_user(user_id: int) -> str:
        return str(user_id)

    with pytest.raises(DependencyError) as info:

        @job
        async def send(email: str, u=Depends(current_user)) -> None:
            pass

    message = str(info.value)
    assert "job 'send'" in message
    assert (
        "test_graph_errors:test_unresolvable_parameter_names_job_dependency_and_parameter.<locals>.current_user"
        in message
    )
    assert "parameter 'user_id'" in message


def test_worker_scope_depending_on_job_scope_is_rejected() -> None:
    def per_job() -> int:
        return 1

    @dependency(scope="worker")
    def pool(x=Depends(per_job)) -> int:
        return x

    with pytest.raises(DependencyError, match=r"worker-scoped .*pool cannot depend on job-scoped .*per_job") as info:

        @job
        async def uses(p=Depends(pool)) -> None:
            pass

    assert "parameter 'x'" in str(info.value) and "job 'uses'" in str(info.value)


def test_worker_scope_taking_job_context_or_job_arguments_is_rejected() -> None:
    @dependency(scope="worker")
    def with_ctx(ctx: JobContext) -> int:
        return 1

    @dependency(scope="worker")
    def with_arg(user_id: int) -> int:
        return user_id

    with pytest.raises(DependencyError, match=r"with_ctx cannot take the JobContext"):

        @job
        async def a(user_id: int, p=Depends(with_ctx)) -> None:
            pass

    with pytest.raises(DependencyError, match=r"parameter 'user_id'.*with_arg cannot take job arguments"):

        @job
        async def b(user_id: int, p=Depends(with_arg)) -> None:
            pass


def test_worker_scope_nested_violation_is_found_deep_in_the_tree() -> None:
    def per_job() -> int:
        return 1

    @dependency(scope="worker")
    def inner(x=Depends(per_job)) -> int:
        return x

    @dependency(scope="worker")
    def outer(i=Depends(inner)) -> int:
        return i

    with pytest.raises(DependencyError, match=r"outer -> .*inner, parameter 'x'"):

        @job
        async def uses(p=Depends(outer)) -> None:
            pass


def test_both_annotated_and_default_depends_is_rejected() -> None:
    def dep() -> int:
        return 1

    with pytest.raises(DependencyError, match="parameter 'x'.*both"):

        @job
        async def j(x: Annotated[int, Depends(dep)] = Depends(dep)) -> None:
            pass


def test_bare_depends_without_callable_annotation_is_rejected() -> None:
    with pytest.raises(DependencyError, match="parameter 'x'.*callable type annotation"):

        @job
        async def j(x=Depends()) -> None:
            pass


def test_generator_job_and_var_positional_job_are_rejected() -> None:
    with pytest.raises(DependencyError, match="generator"):

        @job
        async def gen() -> Any:
            yield 1

    with pytest.raises(DependencyError, match=r"'\*args'"):

        @job
        async def star(*args: Any) -> None:
            pass


def test_invalid_job_options() -> None:
    async def f() -> None:
        pass

    with pytest.raises(ValueError, match="retries"):
        job(retries=-1)(f)
    with pytest.raises(ValueError, match="timeout"):
        job(timeout=0)(f)
    with pytest.raises(DependencyError, match=r"dependencies\[0\]"):
        job(dependencies=[lambda: None])(f)  # type: ignore[list-item]
    with pytest.raises(DependencyError, match="dependencies"):
        Runtime(dependencies=[Depends()])


def test_string_annotation_that_cannot_be_resolved_is_reported() -> None:
    def f(x: "Annotated[Missing, Depends(g)]") -> None:  # type: ignore[name-defined] # noqa: F821
        pass

    with pytest.raises(DependencyError, match="parameter 'x'.*cannot resolve annotation"):
        job(f)


def test_all_errors_derive_from_lifecycle_error() -> None:
    for cls in (DependencyError, PayloadError):
        assert issubclass(cls, LifecycleError)


@pytest.mark.anyio
async def test_payload_errors_name_everything_and_run_no_dependency() -> None:
    setups: list[str] = []

    async def dep() -> Any:
        setups.append("dep")
        yield 1

    @job
    async def send(user_id: int, subject: str, d=Depends(dep), urgent: bool = False) -> None:
        pass

    async with Runtime() as rt:
        with pytest.raises(PayloadError) as info:
            await rt.run(send, subject="hi", bogus=1, other=2)
        message = str(info.value)
        assert "job 'send'" in message and "test_graph_errors:" in message
        assert "unexpected argument(s) 'bogus', 'other'" in message
        assert "missing argument(s) 'user_id'" in message
        with pytest.raises(PayloadError, match="multiple values for argument 'user_id'"):
            await rt.run(send, 1, "s", user_id=2)
        with pytest.raises(PayloadError, match="takes 3 positional"):
            await rt.run(send, 1, "s", True, 4)
        # A dependency parameter is not a job argument.
        with pytest.raises(PayloadError, match="unexpected argument"):
            await rt.run(send, 1, "s", d=3)
    assert setups == []


@pytest.mark.anyio
async def test_run_on_a_closed_runtime_is_an_error() -> None:
    async def f() -> None:
        pass

    rt = Runtime()
    with pytest.raises(LifecycleError, match="not open"):
        await rt.run(f)
    async with rt:
        with pytest.raises(LifecycleError, match="already open"):
            await rt.__aenter__()


def test_override_graph_errors_are_reported_when_the_plan_is_compiled() -> None:
    def original() -> int:
        return 1

    def replacement(unknown: int) -> int:
        return unknown

    @job
    async def uses(x=Depends(original)) -> None:
        pass

    rt = Runtime(dependency_overrides={original: replacement})
    with pytest.raises(DependencyError, match=r"replacement, parameter 'unknown'"):
        rt.plan(uses)


def test_cycle_among_worker_scoped_dependencies_is_reported() -> None:
    @dependency(scope="worker")
    def first(x: Any = None) -> None:
        pass

    @dependency(scope="worker")
    def second(y=Depends(first)) -> None:
        pass

    first.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter("x", inspect.Parameter.KEYWORD_ONLY, default=Depends(second))]
    )
    with pytest.raises(DependencyError, match=r"dependency cycle in job 'uses'.*first -> .*second -> .*first$"):

        @job
        async def uses(v=Depends(first)) -> None:
            pass
