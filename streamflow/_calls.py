"""How a stage calls its function: on the loop, awaited, or on a worker thread."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterable, Callable
from typing import Any

from ._devices import Worker

__all__ = ["Invoker", "is_async"]


def is_async(fn: Any) -> bool:
    """Whether calling ``fn`` returns a coroutine (functions, methods, callable objects)."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - callable objects
    )


class Invoker:
    """Calls one function the way its stage asks: ``await invoker(arg)``.

    ``materialize`` turns an iterable or async iterable result into a list (flat_map), on
    the worker thread when the function runs there. ``wrap`` (for a worker) turns the
    function into what runs on the worker thread, such as a GPU placement's call.
    """

    __slots__ = ("_call", "fn", "is_async")

    def __init__(
        self,
        fn: Callable[[Any], Any],
        *,
        worker: Worker | None,
        materialize: bool = False,
        wrap: Callable[[Callable[[Any], Any]], Callable[[Any], Any]] | None = None,
    ) -> None:
        self.fn = fn
        self.is_async = is_async(fn)
        if inspect.isasyncgenfunction(fn):
            self._call = self._async_gen
        elif self.is_async:
            self._call = self._awaited_list if materialize else self._awaited
        else:
            target = _listing(fn) if materialize else fn
            if worker is not None:
                self._call = _on_worker(worker, wrap(target) if wrap else target, materialize)
            else:
                self._call = self._on_loop_list if materialize else self._on_loop

    async def __call__(self, arg: Any) -> Any:
        return await self._call(arg)

    async def _awaited(self, arg: Any) -> Any:
        return await self.fn(arg)

    async def _awaited_list(self, arg: Any) -> list[Any]:
        return await _to_list(await self.fn(arg))

    async def _async_gen(self, arg: Any) -> list[Any]:
        return [x async for x in self.fn(arg)]

    async def _on_loop(self, arg: Any) -> Any:
        result = self.fn(arg)
        if inspect.isawaitable(result):
            result = await result
        return result

    async def _on_loop_list(self, arg: Any) -> list[Any]:
        result = self.fn(arg)
        if inspect.isawaitable(result):
            result = await result
        return await _to_list(result)


def _listing(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def call(arg: Any) -> Any:
        result = fn(arg)
        return result if isinstance(result, AsyncIterable) else _check_iterable(result)

    return call


def _check_iterable(result: Any) -> list[Any]:
    if isinstance(result, str | bytes) or not hasattr(result, "__iter__"):
        raise TypeError(
            f"flat_map function must return an iterable or async iterable, "
            f"got {type(result).__name__}"
        )
    return list(result)


async def _to_list(result: Any) -> list[Any]:
    if isinstance(result, list):
        return result
    if isinstance(result, AsyncIterable):
        return [x async for x in result]
    return _check_iterable(result)


def _on_worker(worker: Worker, fn: Callable[[Any], Any], materialize: bool) -> Any:
    if materialize:

        async def call_list(arg: Any) -> Any:
            return await _to_list(await worker.run(fn, arg))

        return call_list

    async def call(arg: Any) -> Any:
        return await worker.run(fn, arg)

    return call
