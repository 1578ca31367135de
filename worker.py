"""The background worker: threads that take queued coins in taskRun order and retrieve them.

The queue itself lives in the store (so that an SQLite store can resume it after
a restart); the worker owns the threads, the wake-up signal and the pause.
Each thread takes one coin at a time and fetches all of its pages, so a coin
is stored whole or not at all; ``concurrency`` threads share the client's one
rate limiter.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

from coingecko_client import (
    Cancelled,
    CoinGeckoClient,
    CoinGeckoError,
    CoinNotFound,
    CreditsExhausted,
    Retrieval,
    Stopped,
    UpstreamUnavailable,
)
from credits import iso
from rate_limit import Pause
from store import DONE, FAILED, Claim, Outcome, Store, StoreError
from sweep import Sweeper

log = logging.getLogger(__name__)

MAX_PAUSE_SECONDS = 300.0
# A store that cannot be written (a full disk, a database gone) is tried again this often.
STORE_RETRY_SECONDS = 2.0
# On a store other processes fill too (PostgreSQL), an idle thread looks at the queue this often.
SHARED_QUEUE_POLL = 1.0
# Why the worker waits: the upstream refused it or cannot be reached, the credits are spent, the store
# cannot be written, or (the client's own pause) a 429. A closed set: it labels the pause in /metrics.
PAUSE_KINDS = ("upstream", "credits", "store", "rate_limit")


def counted(n: int, noun: str) -> str:
    """``1 page``, ``2 pages``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


class _Drifted(Exception):
    """A coin's first pass was inconsistent (page drift): it waits for CoinGecko's cache, then goes again."""

    def __init__(self, retrieval: Retrieval) -> None:
        super().__init__()
        self.retrieval = retrieval


class Worker:
    def __init__(
        self,
        store: Store,
        client: CoinGeckoClient,
        *,
        concurrency: int = 1,
        pause_seconds: float = 15.0,
        cache_seconds: float = 120.0,
        refresh_after: float | None = None,
        sweep_at: int | None = None,
        sweep_verify: int = 20,
        sweep_rng: random.Random | None = None,
        progress_interval: float = 30.0,
        setup: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.client = client
        self.concurrency = concurrency
        self.pause_seconds = pause_seconds
        self.cache_seconds = cache_seconds
        self.refresh_after = refresh_after
        self._setup = setup
        self._ready = threading.Event()
        self.progress_interval = progress_interval
        self._clock = clock
        self._wall_clock = wall_clock
        self._stop = threading.Event()
        self._wake = threading.Condition()
        self._signals = 0
        self._pause_lock = threading.Lock()
        self._paused_until = 0.0
        self._pause_reason: str | None = None
        self._pause_kind = "upstream"
        self._stranded: list[Claim] = []
        self._successes_at_pause = 0
        self._pauses_in_a_row = 0
        self._threads: list[threading.Thread] = []
        self._idle_at: list[int | None] = [None] * concurrency
        self._stats_lock = threading.Lock()
        self._finished = 0
        self._calls_for_finished = 0
        self._in_flight_lock = threading.Lock()
        self._in_flight: dict[int, Claim] = {}
        self.sweeper = None if sweep_at == 0 else Sweeper(
            store, client, sweep_at=sweep_at, verify=sweep_verify, cache_seconds=cache_seconds,
            pause=lambda reason, seconds, kind: self._pause(reason, seconds, kind),
            paused=lambda: self.pause() is not None, wake=self._wake_threads,
            progress_interval=progress_interval, clock=clock,
            wall_clock=wall_clock, rng=sweep_rng)

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._threads = [
            threading.Thread(target=self._run, args=(i,), name=f"coin-worker-{i + 1}", daemon=True)
            for i in range(self.concurrency)
        ]
        self._threads.append(threading.Thread(target=self._report_progress, name="coin-progress", daemon=True))
        if self.sweeper is not None:
            self._threads.append(threading.Thread(target=self._sweep, name="coin-sweep", daemon=True))
        for thread in self._threads:
            thread.start()
        log.info("worker started: %d thread(s)", self.concurrency)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop taking coins; a coin still in flight after ``timeout`` is put back in the queue."""
        self._stop.set()
        if self.sweeper is not None:
            self.sweeper.stop()
        self.client.close()
        with self._wake:
            self._wake.notify_all()
        deadline = self._clock() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - self._clock()))
        with self._in_flight_lock:
            stranded = list(self._in_flight.values())
            self._in_flight.clear()
        for claim in stranded:
            self.store.release(claim)
            log.info("coin %s: put back in the queue (the service is stopping)", claim.coin_id)

    def notify(self) -> None:
        """Wake idle threads: coins were queued."""
        if self.sweeper is not None:
            self.sweeper.notify()
        self._wake_threads()

    def _wake_threads(self) -> None:
        with self._wake:
            self._signals += 1
            self._wake.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every thread has found the queue empty since the last ``notify``."""
        with self._wake:
            return self._wake.wait_for(lambda: all(seen == self._signals for seen in self._idle_at), timeout)

    # -- state ------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return bool(self._threads) and all(t.is_alive() for t in self._threads) and not self._stop.is_set()

    def pause_reason(self) -> str | None:
        """Why the worker is paused: set by a refused key, a wrong URL, an outage, spent credits or a store
        that cannot be written; an upstream pause is cleared once any upstream call is answered 200 (the key
        is accepted, the upstream is back), a store's once a write goes through."""
        with self._pause_lock:
            upstream_back = self._pause_kind != "store" and self.client.successes > self._successes_at_pause
        if upstream_back:
            self._resume()
        with self._pause_lock:
            return self._pause_reason

    def pause(self) -> tuple[str, Pause] | None:
        """(kind, pause) while the worker waits: its own pause, else the client's after a 429; else None."""
        reason = self.pause_reason()
        if reason is not None:
            with self._pause_lock:
                remaining = max(0.0, self._paused_until - self._clock())
                kind = self._pause_kind
            return kind, Pause(reason, self._wall_clock() + remaining)
        rate_pause = self.client.rate_pause()
        return None if rate_pause is None else ("rate_limit", rate_pause)

    def upstream(self) -> dict:
        """What the worker's client has spent and may spend: its call counts (``calls``), the rate limit
        it keeps to (``per_minute``) and the month's credits (``credits``)."""
        return {"calls": self.client.stats(), "per_minute": self.client.limiter.per_minute,
                "credits": self.client.credits.state()}

    def listed_coins(self) -> list[str]:
        """Every coin ID of CoinGecko's list, in its order (one call, or none while the cached copy is fresh)."""
        return self.client.listed_ids()

    def did_you_mean(self, coin_id: str) -> list[str]:
        """Listed coin IDs close to ``coin_id`` (its symbol, or a close spelling), for an invalid record."""
        return self.client.suggestions(coin_id)

    def watch_calls(self, on_call: Callable) -> None:
        """Have ``on_call`` told of each upstream call, unless the client already reports to someone."""
        if self.client.on_call is None:
            self.client.on_call = on_call

    def state(self) -> dict:
        """The worker's state for /healthz and the status page; a pause says why, of what kind and until when."""
        pause = self.pause()
        if not self.alive:
            name = "stopped"
        elif pause:
            name = "paused"
        else:
            name = "running"
        state = {"state": name, "threads": self.concurrency}
        if pause is not None:
            kind, (reason, until) = pause[0], (pause[1].reason, pause[1].until)
            state.update(reason=reason, pause=kind, until=iso(datetime.fromtimestamp(until, UTC)),
                         seconds=round(max(0.0, until - self._wall_clock()), 1))
        return state

    def sweep_state(self) -> dict | None:
        """The sweep under way, or the last one's verification (see ``Sweeper.state``); None before any."""
        return None if self.sweeper is None else self.sweeper.state()

    def calls_per_coin(self) -> float:
        with self._stats_lock:
            return self._calls_for_finished / self._finished if self._finished else 1.0

    def calls_per_second(self) -> float:
        """The call rate measured over the last minute, or the configured pace until there is one."""
        return self.client.measured_rate() or 1.0 / self.client.limiter.interval

    def eta_seconds(self, coins_ahead: int) -> float | None:
        """Seconds until ``coins_ahead`` more coins are finished at the measured pace; None while paused
        (a pause has its own end, shown with its reason)."""
        if self.pause() is not None:
            return None
        return round(coins_ahead * self.calls_per_coin() / self.calls_per_second(), 1)

    # -- the work ---------------------------------------------------------------------------

    def _run(self, index: int) -> None:
        self._set_up_or_wait(index)
        while not self._stop.is_set():
            try:
                if self._wait_while_paused() or not self._release_stranded():
                    continue
                if self.sweeper is not None and not self.sweeper.wait_quiet(1.0):
                    continue
                with self._wake:
                    seen = self._signals
                    self._idle_at[index] = None
                if not self.process_next() and not self.refresh_stale():
                    self._idle_until_signalled(index, seen)
            except StoreError as exc:
                self._pause(f"the store cannot be used ({exc}); the worker tries again", STORE_RETRY_SECONDS,
                            kind="store")
            except Exception:
                if self._stop.is_set():
                    return
                log.exception("worker thread error; going on in a second")
                self._stop.wait(1.0)

    def _sweep(self) -> None:
        """The sweep thread: once set up (the first thread's ``/key``), the sweeper's own loop."""
        while not self._ready.wait(0.5):
            if self._stop.is_set():
                return
        self.sweeper.run()

    def _set_up_or_wait(self, index: int) -> None:
        """The first thread runs the setup (a pro key's ``/key``) before any coin; the others wait for it."""
        if index != 0:
            while not self._ready.wait(0.5) and not self._stop.is_set():
                pass
            return
        try:
            if self._setup is not None:
                self._setup()
        except Stopped:
            pass
        except Exception:
            log.exception("setup failed; going on with the defaults")
        finally:
            self._ready.set()

    def _idle_until_signalled(self, index: int, seen: int) -> None:
        """Mark this thread idle and sleep until ``notify`` (or ``stop``) after signal ``seen``,
        or until a deferred coin may be taken, or (on a shared store) until it is time to look again."""
        waits = [self.store.seconds_until_ready()]
        if self.store.shared:
            waits.append(SHARED_QUEUE_POLL)
        if self.refresh_after is not None:
            waits.append(self.store.seconds_until_stale(self.refresh_after))
        wait = min((w for w in waits if w is not None), default=None)
        with self._wake:
            self._idle_at[index] = seen
            self._wake.notify_all()
            self._wake.wait_for(lambda: self._signals != seen or self._stop.is_set(), wait)

    def _wait_while_paused(self) -> bool:
        """Sleep out a pause; True if the thread slept (and should look again)."""
        with self._pause_lock:
            remaining = self._paused_until - self._clock()
        if remaining <= 0:
            return False
        self._stop.wait(remaining)
        return True

    def process_next(self) -> bool:
        """Retrieve the next queued coin and record its outcome; False if the queue is empty."""
        claim = self.store.claim_next()
        self._resume(store=True)
        if claim is None:
            return False
        key = threading.get_ident()
        with self._in_flight_lock:
            self._in_flight[key] = claim
        try:
            self._process(claim)
        except StoreError as exc:
            self._give_back(claim, exc)
        finally:
            with self._in_flight_lock:
                self._in_flight.pop(key, None)
        return True

    def _give_back(self, claim: Claim, exc: StoreError) -> None:
        """A store write for ``claim`` failed: the coin goes back to the queue (once the store takes that
        write; until then it is kept here and tried again) and the worker pauses with the reason."""
        try:
            self.store.release(claim)
        except StoreError:
            with self._in_flight_lock:
                self._stranded.append(claim)
        self._pause(f"the store cannot be written ({exc}); coin {claim.coin_id} goes back to the queue",
                    STORE_RETRY_SECONDS, kind="store")

    def _release_stranded(self) -> bool:
        """Put back the coins whose release the store refused; False while it still refuses."""
        with self._in_flight_lock:
            stranded, self._stranded = self._stranded, []
        for index, claim in enumerate(stranded):
            try:
                self.store.release(claim)
            except StoreError as exc:
                with self._in_flight_lock:
                    self._stranded.extend(stranded[index:])
                self._pause(f"the store cannot be written ({exc}); coin {claim.coin_id} waits to go back "
                            "to the queue", STORE_RETRY_SECONDS, kind="store")
                return False
            log.info("coin %s: back in the queue (the store takes writes again)", claim.coin_id)
        if stranded:
            self._resume(store=True)
        return True

    def _process(self, claim: Claim) -> None:
        started = self._clock()
        calls_before = self.client.calls_by_this_thread()
        try:
            outcome, pages = self._retrieve(claim)
        except UpstreamUnavailable as exc:
            self.store.release(claim)
            if isinstance(exc, CreditsExhausted):
                self._pause(str(exc), exc.seconds, kind="credits")
            else:
                self._pause(str(exc))
            return
        except _Drifted as drifted:
            self._resume()
            self._defer(claim, drifted.retrieval)
            return
        except Stopped:
            self.store.release(claim)
            return
        except Cancelled as exc:
            log.info("%s: stopped fetching", exc)
            return
        if outcome.status != FAILED:
            self._resume()
        calls = self.client.calls_by_this_thread() - calls_before
        if not self._record(claim, outcome):
            log.info("coin %s: dropped, it was cancelled while it was fetched", claim.coin_id)
            return
        with self._stats_lock:
            self._finished += 1
            self._calls_for_finished += calls
        seconds = self._clock() - started
        if outcome.status == DONE:
            log.info("coin %s done: %s, %s, %s, %.1fs", claim.coin_id, counted(len(outcome.exchanges), "exchange"),
                     counted(pages, "page"), counted(calls, "call"), seconds)
        else:
            log.info("coin %s %s: %s (%s, %.1fs)", claim.coin_id, outcome.status, outcome.error, counted(calls, "call"),
                     seconds)

    def _record(self, claim: Claim, outcome: Outcome) -> bool:
        """Store the outcome. A store that is away raises (the coin goes back to the queue); a record the
        store refuses for what it holds fails the coin, so that it is never fetched again and again."""
        try:
            finished = self.store.finish(claim, outcome)
        except StoreError:
            raise
        except Exception as exc:
            log.exception("coin %s: the store refused its record", claim.coin_id)
            finished = self.store.finish(claim, Outcome.failed(f"internal error: the record could not be stored "
                                                                f"({type(exc).__name__})"))
        self._resume(store=True)
        return finished

    def refresh_stale(self) -> bool:
        """With ``refresh_after``, queue the oldest done record past that age; True if one was queued.

        Called only when the queue is empty, so new submissions always go first."""
        if self.refresh_after is None:
            return False
        coin_id = self.store.refresh_oldest(self.refresh_after)
        if coin_id is not None:
            log.info("coin %s: fetched again, its record being over REFRESH_AFTER (%.0fs) old",
                     coin_id, self.refresh_after)
        return coin_id is not None

    def _retrieve(self, claim: Claim) -> tuple[Outcome, int]:
        """The outcome of one coin; every error but a pause or a stop is the coin's outcome."""
        try:
            if self.client.is_listed(claim.coin_id) is False:
                return Outcome.invalid("not a CoinGecko coin ID (absent from coins/list)"), 0
            retrieval = self.client.fetch_exchanges(claim.coin_id, lambda: self.store.claim_alive(claim))
            return self._judge(claim, retrieval), retrieval.pages
        except CoinNotFound:
            return Outcome.invalid("not a CoinGecko coin ID (tickers answered 404)"), 0
        except (UpstreamUnavailable, Stopped, Cancelled, _Drifted):
            raise
        except CoinGeckoError as exc:
            return Outcome.failed(str(exc)), 0
        except Exception as exc:
            log.exception("coin %s: unexpected error", claim.coin_id)
            return Outcome.failed(f"internal error: {type(exc).__name__}"), 0

    def _judge(self, claim: Claim, retrieval: Retrieval) -> Outcome:
        """A pass's outcome under the page-drift rule: a consistent first pass is done; an inconsistent
        one goes again once; a second pass is done with the union of both."""
        first = claim.first_pass
        if first is None:
            if not retrieval.consistent:
                raise _Drifted(retrieval)
            return Outcome.done(retrieval.exchanges, len(retrieval.tickers), retrieval.total, True)
        union = first | retrieval.tickers
        complete = retrieval.consistent or retrieval.tickers == first
        return Outcome.done({identifier for identifier, _, _ in union}, len(union), retrieval.total, complete)

    def _defer(self, claim: Claim, retrieval: Retrieval) -> None:
        if self.store.defer(claim, self.cache_seconds, retrieval.tickers):
            log.info("coin %s: page drift (%d distinct tickers of %s, over %d pages); its pages are fetched "
                     "again in %.0fs, once CoinGecko's cache has turned", claim.coin_id, len(retrieval.tickers),
                     retrieval.total, retrieval.pages, self.cache_seconds)

    def _pause(self, reason: str, seconds: float | None = None, kind: str = "upstream") -> None:
        """Stop taking coins for a while: ``seconds``, or a backoff that doubles with each pause in a row,
        up to five minutes."""
        with self._pause_lock:
            self._pauses_in_a_row += 1
            if seconds is None:
                seconds = min(MAX_PAUSE_SECONDS, self.pause_seconds * 2 ** (self._pauses_in_a_row - 1))
            self._paused_until = self._clock() + seconds
            self._pause_reason = reason
            self._pause_kind = kind
            self._successes_at_pause = self.client.successes
        log.error("worker paused for %.0fs: %s; the queue is kept", seconds, reason)

    def _resume(self, store: bool = False) -> None:
        """End an upstream pause (a coin was retrieved: the upstream accepts us again), or with ``store``
        a store's (a write went through)."""
        with self._pause_lock:
            if self._pause_reason is None or store != (self._pause_kind == "store"):
                return
            self._pause_reason = None
            self._pauses_in_a_row = 0
        log.info("%s again: worker resumed", "the store takes writes" if store else "upstream answering")

    def _report_progress(self) -> None:
        """Log where the work stands every ``progress_interval``; a store that is away skips a report."""
        while not self._stop.wait(self.progress_interval):
            try:
                self._log_progress()
            except Exception as exc:
                log.warning("progress report skipped: %s", exc)

    def _log_progress(self) -> None:
        counts = self.store.status_counts()
        remaining = counts["queued"] + counts["running"]
        if remaining:
            eta = self.eta_seconds(remaining)
            log.info(
                "progress: %d done, %d remaining, %d calls in the last minute, %s",
                counts["done"], remaining, self.client.stats()["calls_last_minute"],
                "paused, no ETA" if eta is None else f"ETA {eta:.0f}s",
            )
