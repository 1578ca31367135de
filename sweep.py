"""Sweeps: the whole market mapped through the exchanges' tickers rather than coin by coin.

A coin costs at least one call of its own; an exchange's ticker pages name every coin traded there
(as ``coin_id``, and as ``target_coin_id`` unless the target is fiat), 100 tickers a page. When
enough coins wait, reading every exchange and turning the map round costs a fraction of the calls.
The sweeper decides when that pays, claims the waiting coins, reads the exchanges one by one (each
read kept in the store, so a restart goes on where it stopped), gives every claimed coin its
record, and proves the map every time: a random sample is fetched coin by coin, the per-coin answer
is the reference, and a sweep whose sample disagrees too often stops sweeps until a restart.

It runs on a thread of its own beside the per-coin threads, which go on taking coins queued after
the sweep began; both share the client's one rate limiter and credit count.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

from coingecko_answers import PAGE_SIZE
from coingecko_client import (
    Cancelled,
    CoinFetchError,
    CoinGeckoClient,
    CoinGeckoError,
    CoinNotFound,
    CreditsExhausted,
    Stopped,
    UpstreamUnavailable,
)
from credits import iso
from store import EXCHANGES_SOURCE, Claim, Outcome, Store, StoreError, SweepProgress

log = logging.getLogger(__name__)

# Fewer waiting coins than this never start a sweep by cost alone (COINS_SWEEP_AT may say otherwise):
# a handful of coins is always answered coin by coin, whatever the estimate.
SWEEP_FLOOR = 1000
# Before any sweep, one is expected to cost this many calls an exchange listed.
CALLS_PER_EXCHANGE = 2
# A sample in which more than this share of coins differ from their own pages: the map is not trusted.
DISTRUST_SHARE = 0.10
IDLE_POLL = 5.0
# How often a sweep's leader looks again at the exchanges others (or a second pass) still hold.
SHARED_POLL = 1.0
EXCHANGES_LIST_TTL = 600.0
CLAIMED_AT_MOST = 1_000_000
# How long stopping may spend putting a sweep's coins back; a durable store puts back the rest at start.
RELEASE_BUDGET = 3.0


class _Abandoned(Exception):
    """The sweep cannot go on: the reason goes to the log and to /healthz, its coins back to the queue."""


class Sweeper:
    """Owns the sweep thread's work: deciding, reading, recording, verifying, and the state /healthz shows."""

    def __init__(
        self,
        store: Store,
        client: CoinGeckoClient,
        *,
        sweep_at: int | None = None,
        verify: int = 20,
        cache_seconds: float = 120.0,
        pause: Callable[[str, float | None, str], None] | None = None,
        paused: Callable[[], bool] = lambda: False,
        wake: Callable[[], None] = lambda: None,
        progress_interval: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.client = client
        self.sweep_at = sweep_at
        self.verify = verify
        self.cache_seconds = cache_seconds
        self._pause = pause or (lambda reason, seconds, kind: None)
        self._paused = paused
        self._wake_workers = wake
        self.progress_interval = progress_interval
        self._clock = clock
        self._wall_clock = wall_clock
        self._rng = rng or random.Random()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._quiet = threading.Event()  # clear while a sweep may be about to claim the waiting coins
        self._quiet.set()
        self._state_lock = threading.Lock()
        self._running: dict | None = None
        self._last: dict | None = None
        self._distrust: str | None = None
        self._exchanges_listed: tuple[float, list[str]] | None = None
        self._logged_at = 0.0
        self.passes_read = 0  # exchange passes this process read, in sweeps it led or helped

    # -- life cycle ---------------------------------------------------------------------------

    def run(self) -> None:
        """The sweep thread: wait for coins, sweep when it pays, until ``stop``."""
        while not self._stop.is_set():
            try:
                progress = self.store.sweep_progress()
                if progress is not None and not self.store.lead_sweep():
                    self._quiet.set()
                    self._help(progress)
                elif progress is not None or self.is_due():
                    self.sweep(progress)
                    continue
            except (StoreError, UpstreamUnavailable) as exc:
                self._quiet.set()
                log.warning("sweep: %s; trying again shortly", exc)
                self._stop.wait(IDLE_POLL)
                continue
            except Stopped:
                return
            except Exception:
                self._quiet.set()
                if self._stop.is_set():
                    return
                log.exception("sweep thread error; going on shortly")
                self._stop.wait(IDLE_POLL)
                continue
            self._quiet.set()
            self._wake.wait(IDLE_POLL)
            self._wake.clear()

    def notify(self) -> None:
        """Coins were queued: look again. When enough wait for a sweep to be possible, the per-coin threads
        hold off (``wait_quiet``) until the sweeper has decided and claimed, so that the coins waiting now
        go to the sweep rather than to whichever thread woke first."""
        if self._might_sweep():
            self._quiet.clear()
        self._wake.set()

    def wait_quiet(self, timeout: float) -> bool:
        return self._quiet.wait(timeout)

    def _might_sweep(self) -> bool:
        if self._distrust is not None or self.sweep_at == 0 or self._running is not None:
            return False
        floor = SWEEP_FLOOR if self.sweep_at is None else self.sweep_at
        try:
            return self.store.status_counts()["queued"] >= floor
        except StoreError:
            return False

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._quiet.set()

    # -- what /healthz and the status page show ---------------------------------------------------

    def state(self) -> dict | None:
        """The sweep under way (exchanges done and total, calls, ETA), else the last one's verification;
        None before any."""
        with self._state_lock:
            if self._running is not None:
                state = dict(self._running, running=True)
                done, total = state["done"], state["total"]
                state["exchanges"] = {"done": done, "total": total}
                state["eta"] = self._eta(state)
            elif self._last is not None:
                state = dict(self._last, running=False)
            else:
                state = None
            if self._distrust is not None:
                state = dict(state or {}, running=False, stopped=self._distrust)
            return state

    def _eta(self, state: dict) -> float | None:
        if self._paused():
            return None
        left = state["total"] - state["done"]
        per_exchange = state["calls"] / state["done"] if state["done"] else CALLS_PER_EXCHANGE
        rate = self.client.measured_rate() or 1.0 / self.client.limiter.interval
        return round(left * per_exchange / rate, 1)

    # -- deciding ---------------------------------------------------------------------------

    def is_due(self) -> bool:
        """Whether the coins waiting now would cost more coin by coin (at least a call each) than a sweep,
        or (``COINS_SWEEP_AT``) whether that many wait."""
        if self._distrust is not None or self.sweep_at == 0:
            return False
        waiting = self.store.status_counts()["queued"]
        if self.sweep_at is not None:
            return waiting >= self.sweep_at
        return waiting >= SWEEP_FLOOR and waiting > self.expected_calls()

    def expected_calls(self) -> int:
        """What a sweep is expected to cost: the last one's calls, or before any, twice the exchanges
        listed (read once, for one call)."""
        last = self.store.last_sweep_calls()
        if last is not None:
            return last
        return CALLS_PER_EXCHANGE * len(self._exchange_ids()) + 1

    def _exchange_ids(self) -> list[str]:
        """``/exchanges/list``, read again once the copy is older than ``EXCHANGES_LIST_TTL``: the estimate
        and the sweep that follows it share one call."""
        listed = self._exchanges_listed
        if listed is None or self._clock() - listed[0] > EXCHANGES_LIST_TTL:
            listed = self._exchanges_listed = (self._clock(), self.client.exchange_ids())
        return listed[1]

    # -- sweeping ---------------------------------------------------------------------------

    def sweep(self, progress: SweepProgress | None = None) -> None:
        """One sweep, led by this process: claim the waiting coins, read every exchange not read yet (with
        any process sharing the store), record, verify."""
        generation = self.store.generation()
        if progress is None:
            exchanges = self._exchange_ids()
            progress = SweepProgress(self._wall_clock(), exchanges)
            if not self.store.begin_sweep(exchanges, progress.started):
                self._quiet.set()
                return
            claims = self._claim_waiting()
            if not claims:
                self.store.end_sweep(None)
                return
        else:
            claims = self._claim_waiting()
            log.info("sweep: going on from %d of %d exchanges read (kept before the restart, or by a process "
                     "that stopped)", sum(1 for state in progress.states.values() if state["done"]),
                     len(progress.exchanges))
        try:
            progress = self._read_exchanges(progress, generation)
            calls = self._record(progress, claims, generation)
            self.store.end_sweep(calls)
        except (Stopped, Cancelled) as exc:
            self._let_go(claims, f"sweep stopped: {exc}")
            if isinstance(exc, Cancelled):
                self.store.end_sweep(None)
        except _Abandoned as exc:
            self._distrust = str(exc)
            log.error("sweep abandoned: %s; its coins go back to the queue, fetched coin by coin, and the "
                      "service sweeps no more until restarted", exc)
            self._let_go(claims, None)
            self.store.end_sweep(None)
        finally:
            with self._state_lock:
                self._running = None

    def _claim_waiting(self) -> list[Claim]:
        try:
            claims = self.store.claim_waiting(CLAIMED_AT_MOST)
        finally:
            self._quiet.set()
        if claims:
            log.info("sweep: mapping %d waiting coin(s) through the exchanges", len(claims))
        return claims

    def _let_go(self, claims: list[Claim], why: str | None) -> None:
        """Put the sweep's unfinished coins back in the queue (within a budget when stopping)."""
        deadline = self._clock() + RELEASE_BUDGET
        for claim in claims:
            if why is not None and self._clock() > deadline:
                break
            try:
                self.store.release(claim)
            except StoreError:
                break
        if why:
            log.info("%s; its coins are back in the queue", why)
        self._wake_workers()

    def _read_exchanges(self, progress: SweepProgress, generation: int) -> SweepProgress:
        """Read every exchange of the sweep not read yet, here or by processes sharing the store; one
        whose pages drifted is read again once CoinGecko's cache has turned, its coins the union of both
        passes. Returns the sweep as the store keeps it once every exchange is read."""
        self._show(progress)
        while True:
            self._read_taken(progress, generation)
            progress = self.store.sweep_progress()
            if progress is None:
                raise Cancelled("the sweep was ended")
            pending = [progress.states.get(exchange_id) for exchange_id in progress.exchanges]
            pending = [state for state in pending if state is None or not state["done"]]
            if not pending:
                return progress
            self._show(progress)
            now = self._wall_clock()
            second_passes = [state["again_at"] - now for state in pending if state and state["again_at"] > now]
            if self._stop.wait(min([SHARED_POLL, *second_passes])):
                raise Stopped("the service is stopping")
            self._check_alive(generation)

    def _read_taken(self, progress: SweepProgress, generation: int) -> None:
        """Read exchanges as long as one is free to take (see ``Store.take_exchange``)."""
        while (taken := self.store.take_exchange(progress, self._wall_clock())) is not None:
            exchange_id, state = taken
            state = progress.states[exchange_id] = state or new_exchange_state()
            try:
                self._read_pass(exchange_id, state, progress, generation)
            finally:
                self.store.let_go_exchange(exchange_id)
            self.passes_read += 1

    def _help(self, progress: SweepProgress) -> None:
        """Read exchanges of a sweep another process leads (on a shared store) while any is free to take;
        the leader records its coins."""
        generation, before = self.store.generation(), self.passes_read
        try:
            self._read_taken(progress, generation)
        except Cancelled:
            pass
        except _Abandoned as exc:
            log.warning("sweep: %s; left to the process leading the sweep", exc)
        finally:
            with self._state_lock:
                self._running = None
        if self.passes_read > before:
            log.info("sweep: read %d exchange pass(es) of the sweep another process leads",
                     self.passes_read - before)

    def _read_pass(self, exchange_id: str, state: dict, progress: SweepProgress, generation: int) -> None:
        """Read the pages of one pass over ``exchange_id`` from where ``state`` stands, keeping it after
        every page, so that a restart fetches again only the page that was in flight."""
        seen = {tuple(key) for key in state["seen"]}
        while True:
            page = state["pages"] + 1
            if page > self.client.max_pages:
                raise _Abandoned(f"exchange {exchange_id} has more than {self.client.max_pages} pages of tickers")
            answer = self._page(exchange_id, page, generation)
            if answer is None:
                state.update(done=True, skipped=True, calls=state["calls"] + 1)
                self._keep(progress, exchange_id, state)
                return
            keys, count, calls = answer
            for key, named in keys:
                if key in seen:
                    state["drifted"] = True
                    continue
                seen.add(key)
                for coin_id in named:
                    state["coins"][coin_id] = state["coins"].get(coin_id, 0) + 1
            state.update(pages=page, calls=state["calls"] + calls, seen=[list(key) for key in seen])
            if count < PAGE_SIZE:
                break
            self._keep(progress, exchange_id, state)
        if state["pass"] == 1 and state["drifted"]:
            log.info("sweep: exchange %s drifted between its pages; read again in %.0fs",
                     exchange_id, self.cache_seconds)
            again = new_exchange_state() | {"pass": 2, "calls": state["calls"], "earlier": state["coins"],
                                            "again_at": self._wall_clock() + self.cache_seconds}
            state.clear()
            state.update(again)
        else:
            earlier = state.get("earlier") or {}
            state["coins"] = {coin_id: max(earlier.get(coin_id, 0), state["coins"].get(coin_id, 0))
                              for coin_id in earlier.keys() | state["coins"].keys()}
            state["done"] = True
        self._keep(progress, exchange_id, state)

    def _page(self, exchange_id: str, page: int, generation: int):
        """One page of an exchange (see ``CoinGeckoClient.exchange_page``), through outages and one more
        try after a failure; None when the exchange's tickers answer 404 (it is skipped and counted)."""
        failures = 0
        while True:
            self._check_alive(generation)
            try:
                return self.client.exchange_page(exchange_id, page)
            except CoinNotFound:
                return None
            except UpstreamUnavailable as exc:
                self._wait_out(exc)
            except CoinFetchError as exc:
                failures += 1
                if failures == 2:
                    raise _Abandoned(f"exchange {exchange_id} could not be read ({exc})") from exc
                log.warning("sweep: exchange %s page %d failed (%s); trying it once more", exchange_id, page, exc)

    def _alive(self, generation: int) -> bool:
        return self.store.generation() == generation and not self._stop.is_set()

    def _check_alive(self, generation: int) -> None:
        """Raise Stopped when the service stops (the sweep is kept, to go on at the next start), Cancelled
        when DELETE /coins cleared the store."""
        if self._stop.is_set():
            raise Stopped("the service is stopping")
        if self.store.generation() != generation:
            raise Cancelled("DELETE /coins")

    def _wait_out(self, exc: UpstreamUnavailable) -> None:
        """An outage, a refused key or spent credits: pause the worker, as the per-coin threads do, and wait."""
        kind = "credits" if isinstance(exc, CreditsExhausted) else "upstream"
        self._pause(str(exc), getattr(exc, "seconds", None), kind)
        while self._paused() and not self._stop.is_set():
            self._stop.wait(1.0)

    def _keep(self, progress: SweepProgress, exchange_id: str, state: dict) -> None:
        self.store.keep_exchange_state(exchange_id, state)
        self._show(progress)

    def _show(self, progress: SweepProgress) -> None:
        done = sum(1 for state in progress.states.values() if state["done"])
        calls = 1 + sum(state["calls"] for state in progress.states.values())
        skipped = sum(1 for state in progress.states.values() if state.get("skipped"))
        with self._state_lock:
            self._running = {"done": done, "total": len(progress.exchanges), "calls": calls, "skipped": skipped,
                             "started": iso(datetime.fromtimestamp(progress.started, UTC))}
        if self._clock() - self._logged_at >= self.progress_interval:
            self._logged_at = self._clock()
            eta = (self.state() or {}).get("eta")
            log.info("sweep: %d of %d exchanges read, %d calls, %d skipped (404), ETA %s", done,
                     len(progress.exchanges), calls, skipped, "paused" if eta is None else f"{eta:.0f}s")

    # -- recording and proving --------------------------------------------------------------

    def _record(self, progress: SweepProgress, claims: list[Claim], generation: int) -> int:
        """Every claimed coin's record from the map; a random sample fetched coin by coin first, whose
        own answer stands where the two differ. Returns the sweep's calls, the sample's included."""
        self._check_alive(generation)
        coins, tickers, calls, skipped = swept_map(progress)
        outcomes = {claim.coin_id: self._outcome(claim.coin_id, coins, tickers) for claim in claims}
        swept = [claim for claim in claims if outcomes[claim.coin_id].source == EXCHANGES_SOURCE]
        sample = self._rng.sample(swept, min(self.verify, len(swept)))
        sampled = {claim.coin_id for claim in sample}
        for claim in claims:
            if claim.coin_id not in sampled:
                self.store.finish(claim, outcomes[claim.coin_id])
        log.info("sweep: %d coin(s) recorded from %d exchanges (%d skipped) in %d calls",
                 len(claims) - len(sample), len(progress.exchanges), skipped, calls)
        differed = []
        for claim in sample:
            own = self._fetch_own(claim)
            if own is None:
                self.store.finish(claim, outcomes[claim.coin_id])
                continue
            calls += own[1]
            if set(own[0].exchanges) != set(outcomes[claim.coin_id].exchanges):
                differed.append(claim.coin_id)
                self.store.finish(claim, own[0])
            else:
                self.store.finish(claim, outcomes[claim.coin_id])
        others = [claim.coin_id for claim in swept if claim.coin_id not in sampled]
        self._judge(calls, len(progress.exchanges), skipped, sample, differed, others)
        return calls

    def _outcome(self, coin_id: str, coins: dict[str, set[str]], tickers: dict[str, int]) -> Outcome:
        if self.client.is_listed(coin_id) is False:
            return Outcome.invalid("not a CoinGecko coin ID (absent from coins/list)")
        return Outcome.done(coins.get(coin_id, ()), tickers.get(coin_id, 0), None, True, EXCHANGES_SOURCE)

    def _fetch_own(self, claim: Claim) -> tuple[Outcome, int] | None:
        """``claim``'s coin from its own pages (the reference), and the calls that took; None if it
        cannot be had now (it keeps the sweep's record)."""
        calls_before = self.client.calls_by_this_thread()
        try:
            retrieval = self.client.fetch_exchanges(claim.coin_id, lambda: self.store.claim_alive(claim))
        except (Stopped, UpstreamUnavailable):
            raise
        except (CoinGeckoError, Cancelled) as exc:
            log.info("sweep: coin %s could not be checked (%s)", claim.coin_id, exc)
            return None
        outcome = Outcome.done(retrieval.exchanges, len(retrieval.tickers), retrieval.total, retrieval.consistent)
        return outcome, self.client.calls_by_this_thread() - calls_before

    def _judge(self, calls: int, exchanges: int, skipped: int, sample: list[Claim], differed: list[str],
               others: list[str]) -> None:
        checked, agreed = len(sample), len(sample) - len(differed)
        trusted = len(differed) <= DISTRUST_SHARE * checked
        with self._state_lock:
            self._last = {"agreed": agreed, "checked": checked, "differed": sorted(differed), "trusted": trusted,
                          "calls": calls, "exchanges": exchanges, "skipped": skipped, "coins": len(others) + checked,
                          "ended": iso(datetime.fromtimestamp(self._wall_clock(), UTC))}
            self._last["verification"] = {key: self._last[key] for key in ("agreed", "checked", "differed")}
        log.info("sweep verified: %d/%d sampled coins agree with their own pages%s", agreed, checked,
                 f" (differed: {', '.join(sorted(differed)[:20])})" if differed else "")
        if not trusted:
            self._distrust = (f"the last sweep's sample disagreed with the coins' own pages for {len(differed)} of "
                              f"{checked} coins (more than {DISTRUST_SHARE:.0%}): sweeps are stopped until a restart "
                              "and the sweep's other coins are fetched again coin by coin")
            log.error("sweep not trusted: %s", self._distrust)
            queued = self.store.refresh_coins(others)
            log.info("sweep: %d coin(s) queued to be fetched coin by coin", queued)
            self._wake_workers()


def new_exchange_state() -> dict:
    """An exchange not read yet, as the store keeps it."""
    return {"pass": 1, "pages": 0, "calls": 0, "coins": {}, "seen": [], "drifted": False, "done": False,
            "skipped": False, "earlier": None, "again_at": 0.0}


def swept_map(progress: SweepProgress) -> tuple[dict[str, set[str]], dict[str, int], int, int]:
    """The map the exchanges read so far give: each coin's exchanges and tickers; and the sweep's calls
    (the list's included) and exchanges skipped."""
    coins: dict[str, set[str]] = {}
    tickers: dict[str, int] = {}
    for exchange_id, state in progress.states.items():
        if not state["done"]:
            continue
        for coin_id, count in state["coins"].items():
            coins.setdefault(coin_id, set()).add(exchange_id)
            tickers[coin_id] = tickers.get(coin_id, 0) + count
    calls = 1 + sum(state["calls"] for state in progress.states.values())
    skipped = sum(1 for state in progress.states.values() if state.get("skipped"))
    return coins, tickers, calls, skipped
