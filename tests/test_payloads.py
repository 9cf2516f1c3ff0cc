"""Typed payloads: every door (``Runtime.run``, a Worker's messages, ``enqueue`` with a
``Job``, the ``lifecycle schema`` command) validates and converts a job's arguments
with the same pydantic model, before any dependency is set up."""


import dataclasses
import enum
import inspect
import json
import math
import uuid
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from typing_extensions import TypedDict  # pydantic needs this one before Python 3.12

from lifecycle import DependencyError, Depends, Job, JobContext, PayloadError, Runtime, Worker, job
from lifecycle._cli import schema
from lifecycle._job import collected_errors
from lifecycle.queues import MemoryQueue


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Address(BaseModel):
    city: str
    zip: Annotated[str, Field(min_length=4)]


@dataclasses.dataclass
class Window:
    start: date
    days: int


class Options(TypedDict):
    urgent: bool


async def run_until_empty(worker: Worker, queue: MemoryQueue, limit: float = 20) -> None:
    """Run the worker until every message is done, then stop it gracefully."""
    with anyio.fail_after(limit):
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            while len(queue):
                await anyio.sleep(0.005)
            worker.stop()


# -- conversion ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_values_arrive_converted_in_the_job_its_dependencies_and_ctx_args() -> None:
    seen: dict[str, Any] = {}

    def current_user(user_id: int) -> int:  # by name, validated as the job's argument
        seen["dependency"] = user_id
        return user_id

    @job
    async def send(
        user_id: Annotated[int, Field(gt=0)],
        day: date,
        at: datetime,
        ref: uuid.UUID,
        amount: Decimal,
        color: Color,
        mode: Literal["fast", "slow"],
        address: Address,
        window: Window,
        options: Options,
        tags: set[str],
        scores: list[float],
        note: str | None,
        ctx: JobContext,
        user: Annotated[int, Depends(current_user)],
        retries: int = 2,
    ) -> None:
        seen.update(ctx.args)

    ref = uuid.uuid4()
    async with Runtime() as rt:
        await rt.run(
            send,
            user_id="7",
            day="2026-11-23",
            at="2026-11-23T10:00:00Z",
            ref=str(ref),
            amount="1.10",
            color="red",
            mode="fast",
            address={"city": "Paris", "zip": "75001"},
            window={"start": "2026-01-02", "days": "3"},
            options={"urgent": "yes"},
            tags=["a", "b", "a"],
            scores=[1, 2.5],
            note=None,
        )
    assert seen == {
        "dependency": 7,
        "user_id": 7,
        "day": date(2026, 11, 23),
        "at": datetime(2026, 11, 23, 10, tzinfo=UTC),
        "ref": ref,
        "amount": Decimal("1.10"),
        "color": Color.RED,
        "mode": "fast",
        "address": Address(city="Paris", zip="75001"),
        "window": Window(date(2026, 1, 2), 3),
        "options": {"urgent": True},
        "tags": {"a", "b"},
        "scores": [1.0, 2.5],
        "note": None,
        "retries": 2,
    }
    assert type(seen["scores"][0]) is float


@pytest.mark.anyio
async def test_positional_arguments_extras_and_defaults_keep_working() -> None:
    calls: list[tuple[Any, ...]] = []

    @job
    async def add(a: int, b: int, *, scale: float = 1, label: int = None, **rest: Any) -> None:  # type: ignore[assignment] # noqa: RUF013
        calls.append((a, b, scale, label, rest))

    marker = object()
    async with Runtime() as rt:
        await rt.run(add, "1", 2)  # the positional shortcut validates too
        await rt.run(add, 1, "2", scale="0.5", anything=marker)  # extras go unchecked, as they are
        # A default is not validated (as in Python and pydantic); an explicit None is.
        with pytest.raises(PayloadError, match="label: Input should be a valid integer"):
            await rt.run(add, 1, 2, label=None)
    assert calls == [(1, 2, 1, None, {}), (1, 2, 0.5, None, {"anything": marker})]


@pytest.mark.anyio
async def test_an_unchanged_list_is_handed_on_as_itself_a_converted_one_is_not() -> None:
    got: list[Any] = []

    def collector(events: list[str]) -> list[str]:
        return events

    @job
    async def collect(events: list[str], scores: list[float], same: Annotated[list[str], Depends(collector)]) -> None:
        events.append("body")
        got.extend([events, scores, same])

    events: list[str] = []
    scores = [1, 2.5]
    async with Runtime() as rt:
        await rt.run(collect, events, scores)
    assert got[0] is events and got[2] is events and events == ["body"]
    assert got[1] == [1.0, 2.5] and got[1] is not scores and type(got[1][0]) is float


@pytest.mark.anyio
async def test_bind_checks_like_run() -> None:
    @job
    async def double(n: int) -> int:
        return n * 2

    async with Runtime() as rt:
        bound = rt.bind(double)
        assert await bound("21") == 42
        with pytest.raises(PayloadError, match="n: Input should be a valid integer"):
            await bound(n=[1])


@pytest.mark.anyio
async def test_unannotated_any_and_unresolvable_annotations_are_passed_on_unchecked() -> None:
    got: list[Any] = []
    value = object()

    @job
    async def loose(a, b: Any, c: "NotDefinedAnywhere") -> None:  # type: ignore[no-untyped-def, name-defined] # noqa: F821
        got.extend([a, b, c])

    async with Runtime() as rt:
        await rt.run(loose, value, float("nan"), value)
    assert got[0] is value and math.isnan(got[1]) and got[2] is value


@pytest.mark.anyio
async def test_a_class_pydantic_does_not_know_is_checked_with_isinstance() -> None:
    class Client:
        pass

    @job
    async def use(client: Client) -> Client:
        return client

    client = Client()
    async with Runtime() as rt:
        assert await rt.run(use, client) is client
        with pytest.raises(PayloadError, match="client: Input should be an instance of"):
            await rt.run(use, "not a client")


# -- errors ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_bad_payload_lists_every_problem_and_sets_up_no_dependency() -> None:
    setups: list[str] = []

    async def session() -> Any:
        setups.append("session")
        yield "s"

    @job
    async def send_email(
        user_id: int, name: str, ratio: float, address: Address, s: Annotated[str, Depends(session)]
    ) -> None:
        setups.append("body")

    async with Runtime() as rt:
        with pytest.raises(PayloadError) as info:
            await rt.run(
                send_email, user_id="abc", name=5, ratio=float("nan"), address={"city": "X", "zip": "1"}, bogus=1
            )
    message = str(info.value)
    assert message.startswith("job 'send_email' (test_payloads:")
    assert "unexpected argument(s) 'bogus'" in message
    assert "user_id: Input should be a valid integer, unable to parse string as an integer, got 'abc'" in message
    assert "name: Input should be a valid string, got 5" in message
    assert "ratio: Input should be a finite number" in message
    assert "address.zip: String should have at least 4 characters, got '1'" in message
    errors = info.value.errors  # type: ignore[attr-defined]
    assert [(e["type"], e["loc"]) for e in errors] == [
        ("extra_forbidden", ("bogus",)),
        ("int_parsing", ("user_id",)),
        ("string_type", ("name",)),
        ("finite_number", ("ratio",)),
        ("string_too_short", ("address", "zip")),
    ]
    assert errors[1]["input"] == "abc" and "input" not in errors[0]
    assert info.value.job == "send_email"  # type: ignore[attr-defined]
    assert info.value.__cause__ is None and info.value.__suppress_context__ is False
    assert info.value.__context__ is None  # pydantic's text (every input value) is not attached
    assert setups == []


@pytest.mark.anyio
async def test_structural_problems_are_data_too() -> None:
    @job
    async def pair(a: int, b: int) -> None:
        pass

    async with Runtime() as rt:
        with pytest.raises(PayloadError) as many:
            await rt.run(pair, 1, 2, 3)
        with pytest.raises(PayloadError) as twice:
            await rt.run(pair, 1, a=2)
    assert [(e["type"], e["loc"]) for e in many.value.errors] == [("unexpected_positional_argument", (2,))]  # type: ignore[attr-defined]
    assert [(e["type"], e["loc"]) for e in twice.value.errors] == [  # type: ignore[attr-defined]
        ("multiple_argument_values", ("a",)),
        ("missing", ("b",)),
    ]


@pytest.mark.anyio
async def test_long_values_and_secret_fields_are_never_echoed() -> None:
    @job
    async def login(user_id: int, password: int, api_token: int, nested: Address) -> None:
        pass

    long = "x" * 41 + "TAIL"
    async with Runtime() as rt:
        with pytest.raises(PayloadError) as info:
            await rt.run(
                login, user_id=long, password="hunter2", api_token="s3cr3t", nested={"city": ["hidden"], "zip": "9999"}
            )
    message = str(info.value)
    for secret in ("TAIL", "hunter2", "s3cr3t", "hidden"):
        assert secret not in message and secret not in repr(info.value.errors)  # type: ignore[attr-defined]
    assert "password: Input should be a valid integer" in message
    assert all("input" not in e for e in info.value.errors)  # type: ignore[attr-defined]


# -- dependencies' by-name parameters --------------------------------------------------------


@pytest.mark.anyio
async def test_a_dependency_annotation_types_an_unannotated_job_argument() -> None:
    setups: list[str] = []

    def current_user(user_id: int) -> int:
        setups.append("current_user")
        return user_id

    @job
    async def greet(user_id, user: Annotated[int, Depends(current_user)]) -> Any:  # type: ignore[no-untyped-def]
        return user_id, user

    async with Runtime() as rt:
        assert await rt.run(greet, "5") == (5, 5)
        with pytest.raises(PayloadError, match="user_id: Input should be a valid integer"):
            await rt.run(greet, "five")
    assert setups == ["current_user"]
    assert greet.payload_schema()["properties"]["user_id"]["type"] == "integer"


def test_disagreeing_annotations_of_one_argument_are_a_graph_error() -> None:
    def by_int(user_id: int) -> int:
        return user_id

    def by_str(user_id: str) -> str:
        return user_id

    with pytest.raises(DependencyError) as info:

        @job
        async def one(user_id: str, u: Annotated[int, Depends(by_int)]) -> None:
            pass

    assert "job 'one'" in str(info.value) and "parameter 'user_id'" in str(info.value)
    assert "annotated str by the job but int by dependency test_payloads:" in str(info.value)
    with pytest.raises(DependencyError, match=r"by dependency .*by_int but str by dependency .*by_str"):

        @job
        async def two(user_id, a: Annotated[int, Depends(by_int)], b: Annotated[str, Depends(by_str)]) -> None:  # type: ignore[no-untyped-def]
            pass

    # A constraint on the same type agrees (the constrained one wins).
    @job
    async def three(user_id: Annotated[int, Field(gt=0)], a: Annotated[int, Depends(by_int)]) -> None:
        pass

    with pytest.raises(PayloadError, match="greater than 0"):
        three.bind_payload((0,), {})


def test_graph_errors_from_payload_types_are_collected_by_check() -> None:
    def by_int(user_id: int) -> int:
        return user_id

    errors: list[Any] = []
    token = collected_errors.set(errors)
    try:

        @job
        async def clash(user_id: str, u: Annotated[int, Depends(by_int)]) -> None:
            pass

    finally:
        collected_errors.reset(token)
    assert errors == [(clash, clash.error)] and "parameter 'user_id'" in str(clash.error)


def test_a_type_pydantic_cannot_build_names_the_parameter() -> None:
    with pytest.raises(DependencyError, match=r"job 'broken'.*parameter 'items': pydantic cannot validate"):

        @job(name="broken")
        async def f(ok: int, items: list["Missing"]) -> None:  # type: ignore[name-defined] # noqa: F821
            pass


# -- queues -------------------------------------------------------------------------


@pytest.mark.anyio
async def test_enqueue_a_job_validates_and_round_trips_models_dates_and_uuids() -> None:
    got: list[Any] = []

    @job
    async def ship(address: Address, day: date, ref: uuid.UUID, color: Color, amounts: tuple[Decimal, ...]) -> None:
        got.append((address, day, ref, color, amounts))

    ref = uuid.uuid4()
    queue = MemoryQueue()
    await queue.enqueue(
        ship,
        {"address": Address(city="Oslo", zip="0150"), "day": date(2026, 5, 1), "ref": ref, "color": Color.BLUE,
         "amounts": (Decimal("1.5"),)},
    )  # fmt: skip
    assert queue._ready[0].payload == {
        "address": {"city": "Oslo", "zip": "0150"},
        "day": "2026-05-01",
        "ref": str(ref),
        "color": "blue",
        "amounts": ["1.5"],
    }
    await run_until_empty(Worker(queue, [ship]), queue)
    assert got == [(Address(city="Oslo", zip="0150"), date(2026, 5, 1), ref, Color.BLUE, (Decimal("1.5"),))]


@pytest.mark.anyio
async def test_enqueue_refuses_what_the_worker_would_refuse() -> None:
    @job
    async def send(user_id: int, extra: Any = None, address: Address | None = None) -> None:
        pass

    queue = MemoryQueue()
    with pytest.raises(PayloadError, match="user_id: Input should be a valid integer"):
        await queue.enqueue(send, {"user_id": "abc"})
    with pytest.raises(PayloadError, match="missing argument"):
        await queue.enqueue(send, {})
    with pytest.raises(PayloadError, match="must be a mapping"):
        await queue.enqueue(send, [("user_id", 1)])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="job 'send'.*cannot be sent as JSON"):
        await queue.enqueue(send, {"user_id": 1, "extra": object()})
    with pytest.raises(ValueError, match="parameter 'extra': NaN"):
        await queue.enqueue(send, {"user_id": 1, "extra": [1.0, float("inf")]})
    assert len(queue) == 0
    # By name the payload cannot be checked by the producer: the worker dead-letters it.
    await queue.enqueue("send", {"user_id": "abc"})
    await run_until_empty(Worker(queue, [send]), queue)
    (dead,) = await queue.dead_letters()
    assert dead["reason"] == "invalid_payload"
    assert "user_id: Input should be a valid integer, unable to parse string as an integer, got 'abc'" in dead["error"]


def test_the_worker_path_is_bind_payload_of_a_json_object() -> None:
    # The Worker, Celery and the CLI call these two entry points; their signatures stay.
    assert list(inspect.signature(Job.bind_payload).parameters) == ["self", "args", "kwargs"]
    assert list(inspect.signature(Job.dump_payload).parameters) == ["self", "payload"]


# -- schema -------------------------------------------------------------------------------


def test_payload_schema_is_the_signature() -> None:
    class Client:
        pass

    @job
    async def send_email(
        user_id: Annotated[int, Field(gt=0, description="who")],
        address: Address,
        client: Client | None = None,
        mode: Literal["a", "b"] = "a",
        when: date = date(2026, 1, 1),
    ) -> None:
        """Send one email.

        Args:
            user_id: the recipient.
        """

    found = send_email.payload_schema()
    assert found["title"] == "send_email" and found["description"] == "Send one email."
    assert found["required"] == ["user_id", "address"] and found["additionalProperties"] is False
    props = found["properties"]
    assert props["user_id"] == {"type": "integer", "exclusiveMinimum": 0, "description": "who", "title": "User Id"}
    assert props["address"] == {"$ref": "#/$defs/Address"} and "Address" in found["$defs"]
    assert props["mode"]["enum"] == ["a", "b"] and props["mode"]["default"] == "a"
    assert props["when"]["default"] == "2026-01-01"
    assert "checked with isinstance" in json.dumps(props["client"])

    @job
    async def open_ended(a, **rest: Any) -> None:  # type: ignore[no-untyped-def]
        pass

    assert open_ended.payload_schema()["additionalProperties"] is True
    assert open_ended.payload_schema()["properties"]["a"] == {"title": "A"}


def test_schema_command_prints_a_job_or_each_job_of_a_worker(tmp_path: Path) -> None:
    jobs = tmp_path / "schema_jobs.py"
    jobs.write_text(
        "from lifecycle import Worker, job\n"
        "from lifecycle.queues import MemoryQueue\n"
        "@job\nasync def send(user_id: int, note: str = '') -> None: ...\n"
        "@job\nasync def other(flag: bool) -> None: ...\n"
        "worker = Worker(MemoryQueue(), [send, other])\n"
    )
    runner = CliRunner()
    one = runner.invoke(schema, [f"{jobs}:send", "--log-level", "warning"])
    assert one.exit_code == 0, one.output
    assert json.loads(one.output)["properties"]["user_id"]["type"] == "integer"
    every = runner.invoke(schema, [f"{jobs}:worker", "--indent", "0"])
    assert every.exit_code == 0 and set(json.loads(every.output)) == {"send", "other"}
    ambiguous = runner.invoke(schema, [str(jobs)])
    assert ambiguous.exit_code == 2 and "name one" in ambiguous.output
    broken = tmp_path / "broken_jobs.py"
    broken.write_text("from lifecycle import job\n@job\nasync def bad(x: list['Nope']) -> None: ...\n")
    failed = runner.invoke(schema, [str(broken)])
    assert failed.exit_code == 2 and "parameter 'x'" in failed.output


# -- property: every door accepts exactly what pydantic accepts ------------------------------


class Point(BaseModel):
    x: int
    y: int


FIELD_TYPES: dict[str, Any] = {
    "int": int,
    "str": str,
    "float": float,
    "bool": bool,
    "date": date,
    "literal": Literal["a", "b"],
    "list_int": list[int],
    "opt_int": int | None,
    "model": Point,
    "constrained": Annotated[int, Field(ge=0, le=10)],
}
ORACLES = {
    key: TypeAdapter(t) if key == "model" else TypeAdapter(t, config=ConfigDict(allow_inf_nan=False))
    for key, t in FIELD_TYPES.items()
}
VALID: dict[str, st.SearchStrategy[Any]] = {
    "int": st.integers(-1000, 1000) | st.integers(-9, 9).map(str),
    "str": st.text(max_size=5),
    "float": st.floats(allow_nan=False, allow_infinity=False, width=32) | st.integers(-5, 5),
    "bool": st.booleans() | st.sampled_from(["true", "no", 0, 1]),
    "date": st.dates().map(str),
    "literal": st.sampled_from(["a", "b"]),
    "list_int": st.lists(st.integers(-5, 5), max_size=3),
    "opt_int": st.none() | st.integers(-5, 5),
    "model": st.fixed_dictionaries({"x": st.integers(-5, 5), "y": st.integers(-5, 5)}),
    "constrained": st.integers(-2, 12),
}
ANYTHING = (
    st.none()
    | st.booleans()
    | st.integers(-3, 3)
    | st.floats()
    | st.text(max_size=4)
    | st.sampled_from(["2026-11-23", "3", "1.5", "a"])
    | st.lists(st.integers(-3, 3) | st.text(max_size=2), max_size=2)
    | st.fixed_dictionaries({"x": st.text(max_size=2) | st.integers(-2, 2)})
)
NO_DEFAULT = object()


@dataclasses.dataclass(frozen=True)
class Case:
    fields: tuple[tuple[str, str, bool], ...]  # (name, type key, has a default)
    payload: dict[str, Any]


@st.composite
def cases(draw: st.DrawFn) -> Case:
    count = draw(st.integers(1, 4))
    fields = tuple((f"f{i}", draw(st.sampled_from(sorted(FIELD_TYPES))), draw(st.booleans())) for i in range(count))
    payload: dict[str, Any] = {}
    for name, key, has_default in fields:
        if has_default and draw(st.booleans()):
            continue  # left to its default
        if not has_default and draw(st.integers(0, 9)) == 0:
            continue  # missing
        payload[name] = draw(VALID[key] | ANYTHING)
    if draw(st.integers(0, 9)) == 0:
        payload["unknown"] = 1
    return Case(fields, payload)


def oracle(case: Case) -> dict[str, Any] | None:
    """What the job must receive, per field with pydantic alone; None: must be refused."""
    names = {name: key for name, key, _ in case.fields}
    if set(case.payload) - set(names):
        return None
    out: dict[str, Any] = {}
    for name, key, has_default in case.fields:
        if name not in case.payload:
            if not has_default:
                return None
            out[name] = "DEFAULT"
            continue
        try:
            out[name] = ORACLES[key].validate_python(case.payload[name])
        except ValidationError:
            return None
    return out


def make_job(case: Case, setups: list[str], received: list[dict[str, Any]]) -> Job[..., Any]:
    async def resource(ctx: JobContext) -> Any:
        setups.append(ctx.name)
        yield None

    async def body(**kwargs: Any) -> None:
        kwargs.pop("r")
        received.append(kwargs)

    params = [
        inspect.Parameter(
            name, inspect.Parameter.KEYWORD_ONLY, annotation=FIELD_TYPES[key], default="DEFAULT" if has else NO_DEFAULT
        )
        for name, key, has in case.fields
    ]
    params = [p.replace(default=inspect.Parameter.empty) if p.default is NO_DEFAULT else p for p in params]
    params.append(inspect.Parameter("r", inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[Any, Depends(resource)]))
    body.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return job(name="generated")(body)


def json_safe(payload: dict[str, Any]) -> bool:
    try:
        json.dumps(payload, allow_nan=False)
    except ValueError:
        return False
    return True


def check_case(case: Case, backend: str) -> None:
    expected = oracle(case)
    setups: list[str] = []
    received: list[dict[str, Any]] = []
    generated = make_job(case, setups, received)

    async def main() -> None:
        # Door 1: Runtime.run with Python values.
        async with Runtime() as rt:
            try:
                await rt.run(generated, **case.payload)
            except PayloadError:
                assert expected is None, f"refused a payload pydantic accepts: {case.payload!r}"
            else:
                assert expected is not None, f"accepted a payload pydantic refuses: {case.payload!r}"
        # Door 2: enqueue(Job, ...) validates at the producer.
        queue = MemoryQueue()
        try:
            await queue.enqueue(generated, case.payload)
        except PayloadError:
            assert expected is None
        else:
            assert expected is not None
        # Door 3: a message enqueued by name reaches the worker unchecked.
        if json_safe(case.payload):
            await queue.enqueue("generated", case.payload)
        await run_until_empty(Worker(queue, [generated]), queue)
        dead = await queue.dead_letters()
        assert all(d["reason"] == "invalid_payload" for d in dead), dead
        if expected is not None:
            assert not dead

    anyio.run(main, backend=backend)
    runs = len(received)
    assert len(setups) == runs  # no dependency was set up for a refused payload
    if expected is None:
        assert runs == 0
    else:
        assert runs >= 2 and all(r == expected for r in received), (received, expected)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@given(case=cases())
def test_every_door_runs_the_job_exactly_when_pydantic_accepts_the_payload(backend: str, case: Case) -> None:
    check_case(case, backend)
