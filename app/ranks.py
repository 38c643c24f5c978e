"""The app on several ranks (context parallelism: ``torchrun --nproc-per-node N -m app.main``): rank 0 serves the UI
and every other rank follows it.

An engine under context parallelism needs every rank to make the same calls in the same order, but only rank 0
hears the UI. So rank 0's engine is a ``LeaderEngine``: each call that runs the model or chooses its cache
(``MIRRORED``, and building an engine) is first announced to the other ranks in one broadcast
(``ContextGroup.share``: the call's name and arguments, with each cache replaced by an id and each callback by
None), then run on rank 0. ``follow`` runs each announced call, in the same order, on the rank's own engine. The
announcement and the call happen under the engine's lock, so the order the followers see is the order rank 0 ran.
Everything else (the UI's callbacks, ``stats``, the tokenizer, settings) is rank 0's alone. A call that fails on
rank 0 fails the same way on the others (same code, same inputs): they note it and wait for the next order.

Not available this way, and refused with a message by the engine and the library: saving, loading and evicting
books (a rank holds only its share of a cache) and the passages under an answer.
"""

from __future__ import annotations

import gc
import sys
import weakref
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from duo_qserve.cache import DuoKVCache
from duo_qserve.distributed import ContextGroup
from duo_qserve.engine import DocumentInfo, Engine, EngineSettings

MIRRORED = ("new_cache", "use", "ingest", "ask", "warm_up", "reset")


@dataclass(frozen=True)
class CacheRef:
    """A cache in an order: the followers' caches are their own objects, known by the id rank 0 gave."""

    id: int


@dataclass(frozen=True)
class Order:
    op: str  # an Engine method of MIRRORED, "engine" (build one from settings) or "stop"
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    cache_id: int | None = None  # the id of the cache a "new_cache" makes
    freed: tuple[int, ...] = ()  # caches rank 0 let go of since the last order: the followers drop theirs


class LeaderEngine:
    """Rank 0's engine: ``MIRRORED`` calls are announced to the followers before they run; every other attribute
    is the engine's own."""

    def __init__(self, engine: Engine, group: ContextGroup):
        self._engine, self._group = engine, group
        self._cache_ids: weakref.WeakKeyDictionary[DuoKVCache, int] = weakref.WeakKeyDictionary()
        self._freed: deque[int] = deque()  # appended by the garbage collector, from any thread
        self._next_id = 0

    @classmethod
    def build(cls, group: ContextGroup, settings: EngineSettings) -> LeaderEngine:
        """Announce, then build, the engine for ``settings`` (the app's ``make_engine`` under torchrun)."""
        group.share(Order("engine", (settings,)))
        return cls(Engine.from_settings(settings, group), group)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def _announce(self, op: str, args: tuple, kwargs: dict, cache_id: int | None = None) -> None:
        freed = []
        while self._freed:
            freed.append(self._freed.popleft())
        args = tuple(self._portable(a) for a in args)
        kwargs = {k: self._portable(v) for k, v in kwargs.items()}
        self._group.share(Order(op, args, kwargs, cache_id, tuple(freed)))

    def _portable(self, value: Any) -> Any:
        if isinstance(value, DuoKVCache):
            if value not in self._cache_ids:
                raise RuntimeError(
                    "this cache was not made through new_cache: the other ranks have no copy of it"
                )
            return CacheRef(self._cache_ids[value])
        return None if callable(value) else value  # progress callbacks report on rank 0 only

    def new_cache(self, document_tokens: int) -> DuoKVCache:
        with self._engine.lock:
            cache_id, self._next_id = self._next_id, self._next_id + 1
            self._announce("new_cache", (document_tokens,), {}, cache_id)
            cache = self._engine.new_cache(document_tokens)
            self._cache_ids[cache] = cache_id
            weakref.finalize(cache, self._freed.append, cache_id)
            return cache

    def use(self, cache: DuoKVCache, document: DocumentInfo | None) -> None:
        self._run("use", cache, document)

    def ingest(self, *args: Any, **kwargs: Any) -> DocumentInfo:
        return self._run("ingest", *args, **kwargs)

    def warm_up(self, *args: Any, **kwargs: Any) -> float:
        return self._run("warm_up", *args, **kwargs)

    def reset(self) -> None:
        self._run("reset")

    def _run(self, op: str, *args: Any, **kwargs: Any) -> Any:
        with self._engine.lock:
            self._announce(op, args, kwargs)
            return getattr(self._engine, op)(*args, **kwargs)

    def ask(self, *args: Any, **kwargs: Any) -> Iterator[str]:
        """``Engine.ask``, announced when the stream starts (inside its job), not when it is made: a call the
        app makes in between then comes after it on every rank too."""

        def stream() -> Iterator[str]:
            with self._engine.job():
                self._announce("ask", args, kwargs)
                yield from self._engine.ask(*args, **kwargs)

        return stream()

    def answer(self, question: str, **kwargs: Any) -> str:
        """``Engine.answer`` through the announced ``ask`` (the engine's own would skip the announcement)."""
        return "".join(self.ask(question, **kwargs))


def stop(group: ContextGroup) -> None:
    """Tell the followers to return from ``follow`` (rank 0, when the app ends). After a Ctrl-C, which reaches
    every rank, they may have stopped already: then there is no one to tell."""
    try:
        group.share(Order("stop"))
    except RuntimeError:  # a follower's end closed the connection
        pass


def follow(group: ContextGroup) -> None:
    """Run rank 0's orders on this rank's own engine until it says stop (every rank but 0). When rank 0 is gone
    without a stop (killed, or its end got there first), exits with one line (``SystemExit``), not a traceback."""
    engine: Engine | None = None
    caches: dict[int, DuoKVCache] = {}
    while True:
        try:
            order: Order = group.share()
        except RuntimeError:  # the connection this rank waits on closed: rank 0 is gone
            raise SystemExit(
                f"rank {group.rank}: stopped: rank 0 ended or failed (its connection closed)"
            ) from None
        for cache_id in order.freed:
            caches.pop(cache_id, None)
        if order.op == "stop":
            return
        if order.op == "engine":  # the old one goes first: the new one may plan its cache from free memory
            engine = None
            caches.clear()
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        args = tuple(caches[a.id] if isinstance(a, CacheRef) else a for a in order.args)
        kwargs = {k: caches[v.id] if isinstance(v, CacheRef) else v for k, v in order.kwargs.items()}
        try:
            if order.op == "engine":
                engine = Engine.from_settings(*args, group)
                continue
            result = getattr(engine, order.op)(*args, **kwargs)
            if order.op == "ask":
                for _ in result:
                    pass
            elif order.op == "new_cache":
                caches[order.cache_id] = result
        except Exception as e:  # rank 0 met the same error and tells the user
            print(f"rank {group.rank}: {order.op} failed as on rank 0: {e}", file=sys.stderr, flush=True)
