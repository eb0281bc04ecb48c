"""When one rank fails, every rank ends with that rank's error, in bounded time.

A collective cannot be interrupted from Python, so the ranks share a message board: the job's
key-value store (the one torch.distributed rendezvoused through; under torchrun the agent hosts it).

- The rank where an error is raised during parallel work claims the board (compare-and-set: the
  first claim wins), waits up to `ACK_WAIT_S` until every other rank has read it (so the message
  survives even when this process hosts the store and is about to exit), and raises its own error.
  Its process then ends: the CLI exits non-zero, and torchrun's agent stops the other workers too.
- Every other rank runs a watcher thread during parallel work that polls the board every `POLL_S`.
  On a claim it acknowledges it and aborts its NCCL communicators, which makes a pending collective
  raise at once. A gloo collective cannot be aborted: it raises when the failed process exits (its
  connections close), or at the process group's timeout.
- A rank whose collective then raises, or which fails second, raises `RankFailedError` carrying
  the claimed message, e.g. "rank 1: RuntimeError: CUDA out of memory ...".

A failed job stays failed: its process groups are mid-collective, so a later call raises at once
instead of hanging.
"""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Callable

from ...core.errors import RankFailedError

POLL_S = 0.1
ACK_WAIT_S = 5.0


class FailureWatch:
    """One rank's view of the board. `scope()` wraps parallel work."""

    def __init__(self, store, prefix: str, rank: int, world: int, abort: Callable[[], None]):
        self.store, self.rank, self.world, self.abort = store, rank, world, abort
        self.key, self.acks = f"{prefix}/failed", f"{prefix}/acks"
        self.failed: str | None = None  # the job's error, once known
        self._active = False

    @contextlib.contextmanager
    def scope(self):
        if self.failed is not None:
            raise RankFailedError(f"{self.failed} (an earlier call of this parallel pipeline failed and left its "
                                  "process groups unusable: start the job again)")
        if self._active:  # nested (a decode inside generate): the outer scope watches
            yield
            return
        self._active, stop = True, threading.Event()
        watcher = threading.Thread(target=self._watch, args=(stop,), daemon=True, name="cvfast-failure-watch")
        watcher.start()
        try:
            yield
        except Exception as exc:
            stop.set()
            watcher.join()
            error = self._settle(exc)
            if error is None:
                raise
            raise error from exc
        finally:
            stop.set()
            watcher.join()
            self._active = False

    def _watch(self, stop: threading.Event) -> None:
        try:
            while not stop.wait(POLL_S):
                if self.store.check([self.key]):
                    self.failed = self.store.get(self.key).decode()
                    self.store.add(self.acks, 1)
                    self.abort()
                    return
        except Exception:  # the store is gone (its host ended): the pending collective reports that
            return

    def _settle(self, exc: Exception) -> Exception | None:
        """The error to raise for `exc`: None (raise `exc` itself) when this rank claimed the board
        first, else a RankFailedError with the claimant's message."""
        if self.failed is None:  # the watcher saw no claim: claim now
            mine = f"rank {self.rank}: {type(exc).__name__}: {exc}"
            try:
                first = self.store.compare_set(self.key, "", mine).decode()
            except Exception:  # no store to tell the others through: the error as it is
                self.failed = mine
                return None
            self.failed = first
            if first == mine:
                self._wait_for_acks()
                return None
            self.store.add(self.acks, 1)
        return RankFailedError(self.failed)

    def _wait_for_acks(self) -> None:
        deadline = time.monotonic() + ACK_WAIT_S
        with contextlib.suppress(Exception):
            while self.store.add(self.acks, 0) < self.world - 1 and time.monotonic() < deadline:
                time.sleep(POLL_S / 5)
