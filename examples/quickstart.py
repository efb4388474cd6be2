"""The README quickstart: double numbers, keep multiples of 3, collect them."""

import asyncio

import streamflow as sf


async def double(x: int) -> int:
    return 2 * x


async def main() -> None:
    results: list[int] = []
    flow = sf.Flow("demo")
    nums = flow.source("numbers", sf.iterate(range(1000)))  # any iterable or async iterable
    doubled = nums.map("double", double, capacity=16)  # async def or plain def
    kept = doubled.filter("keep", lambda x: x % 3 == 0)
    kept.sink("out", sf.collect(results))  # or any async callable
    await flow.run()
    assert results == [2 * i for i in range(1000) if (2 * i) % 3 == 0]
    print(flow.describe())
    for name, m in flow.metrics().items():
        print(f"{name:8} in={m.items_in:5} out={m.items_out:5} busy={m.busy:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
