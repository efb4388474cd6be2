"""Error policies: fail names the stage and item; skip, retry and dead-letter lose nothing else."""

import pytest
from structlog.testing import capture_logs

import streamflow as sf
import streamflow.testing
from streamflow.testing import Flaky, MemorySource

pytestmark = pytest.mark.asyncio


def _reject_7(x: int) -> int:
    if x == 7:
        raise ValueError("seven is bad")
    return x


def _reject_1(x: int) -> int:
    if x == 1:
        raise RuntimeError("one")
    return x


async def test_fail_stops_the_flow_and_names_stage_and_item() -> None:
    flow = sf.Flow("f")
    flow.source("n", range(100)).map("check", _reject_7).sink("o", sf.collect())
    with capture_logs() as logs, pytest.raises(sf.StageError) as info:
        await flow.run()
    err = info.value
    assert (err.flow, err.stage, err.item) == ("f", "check", "7")
    assert isinstance(err.cause, ValueError)
    assert "stage 'check' of flow 'f' failed on item 7: ValueError: seven is bad" in str(err)
    assert any(e["event"] == "stage.error" and e["stage"] == "check" for e in logs)
    assert next(e for e in logs if e["event"] == "flow.stop")["reason"] == "failed"


async def test_tensors_and_batches_of_them_are_named_by_shape_never_by_value() -> None:
    import torch

    def boom(x: object) -> object:
        raise ValueError("no")

    for value, expected in (
        (torch.full((2, 3), 7.5), "Tensor(shape=[2, 3], dtype=torch.float32)"),
        (
            [torch.full((4,), 7.5)] * 5,
            "list of 5, the first Tensor(shape=[4], dtype=torch.float32)",
        ),
        (
            (torch.full((1, 4), 7.5), 3),
            "(Tensor(shape=[1, 4], dtype=torch.float32), 3)",
        ),
    ):
        flow = sf.Flow("f")
        flow.source("n", [value]).map("m", boom).sink("o", sf.collect())
        with pytest.raises(sf.StageError) as info:
            await flow.run()
        assert info.value.item == expected
        assert "7.5" not in str(info.value)


async def test_error_names_the_source_metadata() -> None:
    flow = sf.Flow("f")
    flow.source("s", MemorySource(range(10))).map("check", _reject_7).sink("o", sf.collect())
    with pytest.raises(sf.StageError, match=r"meta \{'offset': 7\}"):
        await flow.run()


async def test_skip_counts_logs_and_goes_on() -> None:
    out: list[int] = []
    source = MemorySource(range(20))
    flow = sf.Flow("f")
    flow.source("s", source).map("check", _reject_7, errors="skip").sink("o", sf.collect(out))
    with capture_logs() as logs:
        await flow.run()
    assert out == [x for x in range(20) if x != 7]
    m = flow.metrics()["check"]
    assert (m.errors, m.skipped, m.items_in, m.items_out) == (1, 1, 20, 19)
    assert source.acked[7] == sf.Outcome.SKIPPED
    assert all(source.acked[i] == sf.Outcome.DELIVERED for i in range(20) if i != 7)
    warning = next(e for e in logs if e["event"] == "stage.error")
    assert warning["log_level"] == "warning" and warning["item"] == "7"


async def test_retry_recovers_with_backoff() -> None:
    out: list[int] = []
    flaky = Flaky(lambda x: x * 10, failures=2)
    flow = sf.Flow("f")
    flow.source("n", range(5)).map("flaky", flaky, errors=sf.Retry(attempts=3, backoff=0.001)).sink(
        "o", sf.collect(out)
    )
    await flow.run()
    assert out == [0, 10, 20, 30, 40]
    m = flow.metrics()["flaky"]
    assert (m.errors, m.retries, m.skipped) == (10, 10, 0)


async def test_retry_exhausted_then_fail_or_skip() -> None:
    flow = sf.Flow("f")
    flow.source("n", range(3)).map(
        "flaky", Flaky(abs, failures=5), errors=sf.Retry(attempts=2, backoff=0)
    ).sink("o", sf.collect())
    with pytest.raises(sf.StageError, match="injected failure 2 of 5"):
        await flow.run()

    out: list[int] = []
    flow = sf.Flow("g")
    flow.source("n", range(3)).map(
        "one", _reject_1, errors=sf.Retry(attempts=2, backoff=0, then="skip")
    ).sink("o", sf.collect(out))
    await flow.run()
    assert out == [0, 2]
    assert flow.metrics()["one"].errors == 2


async def test_retry_only_listed_exceptions() -> None:
    flow = sf.Flow("f")
    flow.source("n", range(3)).map(
        "flaky", Flaky(abs, failures=1, error=KeyError), errors=sf.Retry(5, 0, on=(OSError,))
    ).sink("o", sf.collect())
    with pytest.raises(sf.StageError) as info:
        await flow.run()
    assert flow.metrics()["flaky"].retries == 0
    assert isinstance(info.value.cause, KeyError)


async def test_dead_letter_gets_item_and_reason() -> None:
    dead: list[sf.FailedItem] = []
    out: list[int] = []
    source = MemorySource(range(10))
    flow = sf.Flow("f")
    flow.source("s", source).map("check", _reject_7, errors=sf.DeadLetter(sf.collect(dead))).sink(
        "o", sf.collect(out)
    )
    await flow.run()
    assert out == [x for x in range(10) if x != 7]
    assert len(dead) == 1
    failed = dead[0]
    assert (failed.stage, failed.item, failed.meta, failed.attempts) == (
        "check",
        7,
        {"offset": 7},
        1,
    )
    assert isinstance(failed.error, ValueError)
    assert source.acked[7] == sf.Outcome.DEAD_LETTERED


async def test_failing_sink_follows_its_policy() -> None:
    sink = sf.testing.MemorySink(fail_on=lambda x: x % 4 == 0)
    flow = sf.Flow("f")
    flow.source("n", range(12)).sink("o", sink, errors="skip")
    await flow.run()
    assert sink.items == [x for x in range(12) if x % 4]
    assert flow.metrics()["o"].skipped == 3


async def test_setup_failure_names_the_stage() -> None:
    class Broken(sf.Stage[int, int]):
        async def setup(self) -> None:
            raise OSError("no model file")

        async def process(self, item: int) -> int:
            return item

    flow = sf.Flow("f")
    flow.source("n", range(3)).map("model", Broken()).sink("o", sf.collect())
    with pytest.raises(
        sf.StageError, match="stage 'model' .* failed in setup: OSError: no model"
    ) as err:
        await flow.run()
    assert err.value.phase == "setup"
    assert err.value.item is None


async def test_overflow_error_fails_naming_the_full_stage() -> None:
    import asyncio

    async def slow(x: int) -> int:
        await asyncio.sleep(0.01)
        return x

    flow = sf.Flow("f")
    flow.source("n", range(100)).map("slow", slow, capacity=2, overflow="error").sink(
        "o", sf.collect()
    )
    with pytest.raises(sf.StageError, match="stage 'slow' .*ChannelFull"):
        await flow.run()


async def test_error_in_the_users_block_propagates_unchanged() -> None:
    flow = sf.Flow("f")
    flow.source("n", MemorySource(range(3), forever=True)).sink("o", sf.collect())
    with pytest.raises(ZeroDivisionError):
        async with flow.start():
            1 / 0  # noqa: B018


def _halve_evens(xs: list[int]) -> list[int]:
    """Odd elements fail; the others are halved (a stage on a batch)."""
    out, errors = [], {}
    for i, x in enumerate(xs):
        if x % 2:
            errors[i] = ValueError(f"{x} is odd")
        else:
            out.append(x // 2)
    if errors:
        raise sf.PartialFailure(out, errors)
    return out


async def test_partial_failure_skips_only_the_failed_members_of_a_batch() -> None:
    out: list[int] = []
    source = MemorySource([0, 2, 3, 4, 6, 7, 8, 10, 12])
    flow = sf.Flow("f")
    flow.source("s", source).batch("b", 3, 1.0).map("halve", _halve_evens, errors="skip").unbatch(
        "u"
    ).sink("o", sf.collect(out))
    with capture_logs() as logs:
        await flow.run()
    assert out == [0, 1, 2, 3, 4, 5, 6]
    m = flow.metrics()["halve"]
    assert (m.items_in, m.items_out, m.errors, m.skipped) == (3, 3, 2, 2)
    assert source.acked[2] == source.acked[5] == sf.Outcome.SKIPPED  # the 3 and the 7
    assert all(source.acked[i] == sf.Outcome.DELIVERED for i in (0, 1, 3, 4, 6, 7, 8))
    warnings = [e for e in logs if e["event"] == "stage.error"]
    assert [(w["item"], w["index"], w["meta"]) for w in warnings] == [
        ("3", 2, {"offset": 2}),
        ("7", 2, {"offset": 5}),
    ]


async def test_partial_failure_dead_letters_each_failed_element() -> None:
    dead: list[sf.FailedItem] = []
    out: list[list[int]] = []
    source = MemorySource([[1, 2], [4, 5, 7]])  # each item already a list: one ack per list
    flow = sf.Flow("f")
    flow.source("s", source).map(
        "halve", _halve_evens, errors=sf.Retry(2, 0, then=sf.DeadLetter(sf.collect(dead)))
    ).sink("o", sf.collect(out))
    await flow.run()
    assert out == [[1], [2]]
    assert [(d.stage, d.item, d.meta, str(d.error)) for d in dead] == [
        ("halve", 1, {"offset": 0}, "1 is odd"),
        ("halve", 5, {"offset": 1}, "5 is odd"),
        ("halve", 7, {"offset": 1}, "7 is odd"),
    ]
    assert flow.metrics()["halve"].retries == 0  # the good elements already ran
    both = sf.Outcome.DELIVERED | sf.Outcome.DEAD_LETTERED
    assert source.acked == {0: both, 1: both}


async def test_partial_failure_with_fail_names_the_element() -> None:
    flow = sf.Flow("f")
    flow.source("s", [[2, 4, 9]]).map("halve", _halve_evens).sink("o", sf.collect())
    with pytest.raises(sf.StageError) as info:
        await flow.run()
    assert (info.value.stage, info.value.item) == ("halve", "9")
    assert str(info.value.cause) == "9 is odd"


async def test_partial_failure_of_every_element_emits_nothing() -> None:
    out: list[list[int]] = []
    source = MemorySource([[1, 3], [2]])
    flow = sf.Flow("f")
    flow.source("s", source).map("halve", _halve_evens, errors="skip").sink("o", sf.collect(out))
    await flow.run()
    assert out == [[1]]
    assert source.acked == {0: sf.Outcome.SKIPPED, 1: sf.Outcome.DELIVERED}


async def test_partial_failure_misused_fails_clearly() -> None:
    def bad_index(xs: list[int]) -> list[int]:
        raise sf.PartialFailure([], {5: ValueError("x")})

    def not_a_list(x: int) -> int:
        raise sf.PartialFailure([], {0: ValueError("x")})

    for fn, text in (
        (bad_index, r"names \[5\], the list has 2 elements"),
        (not_a_list, "an item of type int, not a list"),
    ):
        flow = sf.Flow("f")
        flow.source("s", [[1, 2]] if fn is bad_index else [1]).map("m", fn, errors="skip").sink(
            "o", sf.collect()
        )
        with pytest.raises(sf.StageError, match=text):
            await flow.run()
    with pytest.raises(ValueError, match="at least one"):
        sf.PartialFailure([], {})


async def test_partial_failure_in_a_sink_and_in_concurrent_stages() -> None:
    """A batched sink, a flat_map and a map with concurrency > 1 (on a worker thread) take
    partial failures the same way: the failed elements meet the policy, the rest go on."""
    written: list[int] = []

    async def write_evens(xs: list[int]) -> None:
        errors = {i: ValueError(f"{x} is odd") for i, x in enumerate(xs) if x % 2}
        written.extend(x for x in xs if not x % 2)
        if errors:
            raise sf.PartialFailure(None, errors)

    source = MemorySource(range(10))
    flow = sf.Flow("sink")
    flow.source("s", source).batch("b", 5, 1.0).sink("write", write_evens, errors="skip")
    await flow.run()
    assert written == [0, 2, 4, 6, 8]
    assert flow.metrics()["write"].skipped == 5
    assert all(source.acked[i] == sf.Outcome.SKIPPED for i in (1, 3, 5, 7, 9))
    assert all(source.acked[i] == sf.Outcome.DELIVERED for i in (0, 2, 4, 6, 8))

    out: list[int] = []
    flow = sf.Flow("flat")
    flow.source("s", [[2, 3], [4, 6, 7]]).flat_map("halve", _halve_evens, errors="skip").sink(
        "o", sf.collect(out)
    )
    await flow.run()
    assert out == [1, 2, 3]

    lists: list[list[int]] = []
    flow = sf.Flow("concurrent")
    flow.source("s", [[2, 3], [4, 5], [6, 8]]).map(
        "halve", _halve_evens, errors="skip", device="cpu:0", concurrency=2
    ).sink("o", sf.collect(lists))
    await flow.run()
    assert lists == [[1], [2], [3, 4]]
    assert flow.metrics()["halve"].skipped == 2
