"""The engine in a process of its own, for servers: AsyncEngine's interface, no shared interpreter lock.

With the engine on a thread (leanmoe.infer.async_engine), the model thread must take Python's
interpreter lock back after every torch op, so the HTTP event loop's Python work stalls it: on
a 2-core CPU a batch-16 decode step ran 10-16% slower beside a thread busy 15% of the time
(bench/serve_contention.py). vLLM runs its engine core in a process for the same reason. Here
the child process loads the checkpoint and owns the LLM; the server's process keeps a front LLM
for tokenising and validating (`make_sequence`), which never steps.

    parent (event loop)  --("add", request) / ("abort", id) / ("stop",)-->  child: LLM.step() loop
    parent (reader thread) <--("out", [RequestOutput], counters) / ("fail", [(id, error)])--  child

One message per step carries every output of the step and the engine counters /metrics reads.
Requests are sent as (id, prompt ids, params, stream, arrival time); the child rebuilds the
Sequence with its own tokenizer, so detokenising and stop strings run there as in-process. When
the child dies, every waiting request gets EngineDeadError and /health turns 503, as when the
engine thread dies. The child ignores SIGINT (the parent stops it) and exits when the parent's
end of the pipe closes.

NOTE: a request is sent from the event loop; one larger than the pipe's buffer (a prompt of some
ten thousand tokens) blocks the loop until the child reads it, at most one engine step.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import sys
import threading
from typing import Any

from leanmoe.infer.async_engine import EngineDeadError, Relay
from leanmoe.infer.engine import LLM
from leanmoe.infer.metrics import COUNTER_KEYS, engine_counters
from leanmoe.infer.sequence import Sequence

__all__ = ["EngineProcess"]

log = logging.getLogger("leanmoe.infer")


class EngineProcess(Relay):
    """Usage (inside a running event loop): engine.start(); async for out in engine.generate(seq): ...

    llm: the front LLM (tokenizer, limits, `make_sequence`); its model is never run here, and its
    KV cache is released once the child is up. checkpoint: what the child loads, with llm's
    resolved EngineConfig so both sides agree on the limits. threads: torch's CPU threads in the
    child (None: torch's default there)."""

    def __init__(self, llm: LLM, checkpoint: str | os.PathLike, threads: int | None = None,
                 start_timeout: float = 600.0):
        super().__init__()
        self.llm = llm
        self.checkpoint = str(checkpoint)
        self.threads = threads
        self.start_timeout = start_timeout
        self._send_lock = threading.Lock()
        self._proc: Any = None
        self._conn: Any = None
        self._reader: threading.Thread | None = None
        self._counters: dict[str, float] = _zero_counters()
        self.error: str | None = None
        self.compile_status = "not started"  # the child's ModelRunner.compile_status once it is up

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the child and wait until its model is loaded (raises RuntimeError if it fails)."""
        if self.is_running:
            return
        ctx = mp.get_context("spawn")  # a fresh interpreter: no forked OpenMP or CUDA state
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_child_main, args=(child, self.checkpoint, self.llm.config, self.threads),
                           name="leanmoe-engine", daemon=True)
        proc.start()
        child.close()
        if not parent.poll(self.start_timeout):
            proc.kill()
            raise RuntimeError(f"the engine process did not load {self.checkpoint} within {self.start_timeout:.0f} s")
        try:
            kind, payload = parent.recv()
        except EOFError:
            proc.join(5)
            raise RuntimeError(f"the engine process exited while loading (exit code {proc.exitcode})") from None
        if kind != "ready":
            proc.join(5)
            raise RuntimeError(f"the engine process failed to start: {payload}")
        self._proc, self._conn, self._dead, self.error = proc, parent, False, None
        self.compile_status = payload
        self._counters = _zero_counters()
        self.llm.runner.cache = self.llm.runner.backend = None  # the front never steps: free its cache
        self._reader = threading.Thread(target=self._read, name="leanmoe-engine-reader", daemon=True)
        self._reader.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        if self._proc is None:
            return
        try:
            self._send(("stop", None))
        except EngineDeadError:
            pass
        self._proc.join(timeout)
        if self._proc.is_alive():
            log.warning("engine process did not stop within %.0f s: killing it", timeout)
            self._proc.kill()
            self._proc.join(5)
        if self._reader is not None:
            self._reader.join(5)
        self._conn.close()
        self._proc = None

    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.is_alive() and not self._dead

    def counters(self) -> dict[str, float]:
        """The engine state /metrics reports, as of the child's last step."""
        return self._counters

    # ------------------------------------------------------------------ requests
    def _accepting(self) -> bool:
        return self.is_running

    def _submit(self, seq: Sequence) -> None:
        self._send(("add", (seq.request_id, seq.prompt_token_ids, seq.params, seq.detokenizer is not None,
                            seq.arrival_time)))

    def _cancel(self, request_id: str) -> None:
        if self.is_running:
            try:
                self._send(("abort", request_id))
            except EngineDeadError:
                pass

    def _send(self, message: tuple) -> None:
        with self._send_lock:
            try:
                self._conn.send(message)
            except (OSError, EOFError, ValueError) as e:
                raise EngineDeadError(f"the inference engine stopped: {e}") from e

    # ------------------------------------------------------------------ the reader thread
    def _read(self) -> None:
        try:
            while True:
                kind, payload, *rest = self._conn.recv()
                if kind == "out":
                    self._counters = rest[0]
                    self._deliver([(o.request_id, o) for o in payload])
                elif kind == "fail":
                    self._deliver(payload)
                elif kind == "stopped":
                    break
        except (EOFError, OSError) as e:
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self._fail_all(EngineDeadError("the inference engine stopped"))


def _zero_counters() -> dict[str, float]:
    return dict.fromkeys(COUNTER_KEYS, 0)


# ---------------------------------------------------------------------- the child process
def _child_main(conn, checkpoint: str, config, threads: int | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent stops us
    try:
        import torch

        if threads is not None:
            torch.set_num_threads(threads)
        llm = LLM(checkpoint, config=config)
        # compile the decode step now, while the cache is empty, so that no request waits for it
        compiled = llm.runner.compile_decode(warmup=True) if llm.config.compile_decode else llm.runner.compile_status
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    if llm.config.compile_decode:
        print(f"leanmoe engine process: decode step {compiled}", file=sys.stderr, flush=True)
    conn.send(("ready", compiled))
    try:
        _child_loop(conn, llm)
    except (EOFError, OSError, KeyboardInterrupt):  # the parent went away
        pass


def _child_loop(conn, llm: LLM) -> None:
    def handle(kind: str, payload: Any) -> bool:
        """Apply one command; False on stop."""
        if kind == "add":
            rid, ids, params, stream, arrival = payload
            try:
                seq = llm.make_sequence(ids, params, rid, stream=stream)
                seq.arrival_time = arrival  # CLOCK_MONOTONIC: the same clock in both processes
                llm.add_sequence(seq)
            except Exception as e:  # noqa: BLE001 - a bad request must not stop the engine
                conn.send(("fail", [(rid, e)]))
        elif kind == "abort":
            llm.abort(payload)
        elif kind == "stop":
            return False
        return True

    while True:
        if not llm.has_unfinished() and not handle(*conn.recv()):  # idle: sleep until a command arrives
            break
        stop = False
        while conn.poll():
            if not handle(*conn.recv()):
                stop = True
                break
        if stop:
            break
        if not llm.has_unfinished():
            continue
        try:
            outputs = llm.step()
        except Exception as e:  # noqa: BLE001 - fail the running requests, keep serving
            log.exception("engine step failed")
            failed = [s.request_id for s in list(llm.scheduler.running) + list(llm.scheduler.waiting)]
            for rid in failed:
                llm.abort(rid)
            conn.send(("fail", [(rid, RuntimeError(f"engine step failed: {e}")) for rid in failed]))
            continue
        conn.send(("out", outputs, engine_counters(llm)))
    conn.send(("stopped", None))
