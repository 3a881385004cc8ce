"""The engine on a background thread, for servers: asyncio code submits and awaits, one thread steps.

The engine thread owns the LLM: it is the only one that schedules, runs the model or touches cache
blocks. Requests reach it through a thread-safe command queue (add / abort); outputs go back to
each request's asyncio.Queue through `call_soon_threadsafe`, once per step for the whole batch.
When nothing is running the thread sleeps on the command queue. A request whose consumer stops
listening (a client disconnected, a task was cancelled) is aborted, which frees its blocks
before the next step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from typing import Any

from leanmoe.infer.engine import LLM, RequestOutput
from leanmoe.infer.sequence import Sequence

__all__ = ["AsyncEngine", "EngineDeadError", "Relay", "deliver"]

log = logging.getLogger("leanmoe.infer")


class EngineDeadError(RuntimeError):
    """The engine (its thread, or its process) is not running."""


class Relay:
    """The asyncio side an engine shares with its clients: `generate` registers a queue per
    request, which the engine's thread fills through `_deliver`. Subclasses say whether they take
    requests (`_accepting`) and how a request reaches the engine (`_submit`, `_cancel`)."""

    def __init__(self) -> None:
        self._listeners: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        # registration of a listener and the dead engine's last broadcast exclude each other, so
        # no request can register after that broadcast and wait forever
        self._lock = threading.Lock()
        self._dead = False

    def _accepting(self) -> bool:
        raise NotImplementedError

    def _submit(self, seq: Sequence) -> None:
        raise NotImplementedError

    def _cancel(self, request_id: str) -> None:
        raise NotImplementedError

    async def generate(self, seq: Sequence) -> AsyncIterator[RequestOutput]:
        """Submit a sequence (from `LLM.make_sequence`) and yield its outputs until it finishes.
        Leaving the loop early (break, cancellation, disconnect) aborts the request."""
        rid = seq.request_id
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if not self._accepting():
                raise EngineDeadError("the inference engine is not running")
            if rid in self._listeners:
                raise ValueError(f"request id {rid!r} is already in use")
            self._listeners[rid] = (asyncio.get_running_loop(), q)
        finished = False
        try:
            self._submit(seq)
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._listeners.pop(rid, None)
            if not finished:
                self._cancel(rid)

    def _deliver(self, items: list[tuple[str, Any]]) -> None:
        deliver(self._listeners, items)

    def _fail_all(self, error: BaseException) -> None:
        """The engine is gone: no new listener may register, and each waiting one gets `error`."""
        with self._lock:
            self._dead = True
            waiting = list(self._listeners)
        self._deliver([(rid, error) for rid in waiting])


class AsyncEngine(Relay):
    """Usage (inside a running event loop): engine.start();
    async for out in engine.generate(llm.make_sequence(prompt, params, stream=True)): ..."""

    def __init__(self, llm: LLM):
        super().__init__()
        self.llm = llm
        self._commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: BaseException | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping = False
        self._dead = False
        self._thread = threading.Thread(target=self._run, name="leanmoe-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        if self._thread is None:
            return
        self._stopping = True
        self._commands.put(("stop", None))
        self._thread.join(timeout)
        if self._thread.is_alive():  # a step still running: keep the handle, so start() cannot add a second thread
            log.warning("engine thread did not stop within %.0f s", timeout)
            return
        self._thread = None

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def counters(self) -> dict[str, float]:
        """The engine state /metrics reports (leanmoe.infer.metrics.engine_counters)."""
        from leanmoe.infer.metrics import engine_counters

        return engine_counters(self.llm)

    # ------------------------------------------------------------------ requests
    def _accepting(self) -> bool:
        return not self._dead and self.is_running

    def _submit(self, seq: Sequence) -> None:
        self._commands.put(("add", seq))

    def _cancel(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    # ------------------------------------------------------------------ the engine thread
    def _handle(self, cmd: str, arg: Any) -> None:
        if cmd == "add":
            try:
                self.llm.add_sequence(arg)
            except Exception as e:  # a bad request must not stop the engine
                self._deliver([(arg.request_id, e)])
        elif cmd == "abort":
            self.llm.abort(arg)
        elif cmd == "stop":
            self._stopping = True

    def _run(self) -> None:
        llm = self.llm
        try:
            while not self._stopping:
                if not llm.has_unfinished():
                    self._handle(*self._commands.get())  # idle: sleep until a command arrives
                while True:
                    try:
                        self._handle(*self._commands.get_nowait())
                    except queue.Empty:
                        break
                if self._stopping or not llm.has_unfinished():
                    continue
                try:
                    outputs = llm.step()
                except Exception as e:  # fail the running requests, keep serving
                    log.exception("engine step failed")
                    failed = [s.request_id for s in list(llm.scheduler.running) + list(llm.scheduler.waiting)]
                    for rid in failed:
                        llm.abort(rid)
                    self._deliver([(rid, RuntimeError(f"engine step failed: {e}")) for rid in failed])
                    continue
                self._deliver([(o.request_id, o) for o in outputs])
        except BaseException as e:  # pragma: no cover - defensive: never leave a client hanging
            self.error = e
            log.exception("engine thread died")
        finally:
            self._fail_all(EngineDeadError("the inference engine stopped"))


def deliver(listeners: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]],
            items: list[tuple[str, Any]]) -> None:
    """Hand (request id, output or error) pairs to their listeners' queues, from any thread: one
    `call_soon_threadsafe` per event loop for the whole batch. Unknown ids are dropped."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = {}
    for rid, item in items:
        listener = listeners.get(rid)
        if listener is not None:
            by_loop.setdefault(listener[0], []).append((listener[1], item))
    for loop, pairs in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, pairs)
        except RuntimeError:  # the loop closed under us
            pass


def _put_all(pairs: list[tuple[asyncio.Queue, Any]]) -> None:
    for q, item in pairs:
        q.put_nowait(item)
