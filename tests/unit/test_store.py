"""Both stores through one interface: numbering, the queue, batches, clearing."""

from __future__ import annotations

import gc
import random
import sqlite3
import sys

import pytest

import stores.tallies as tallies_module
from coin_ids import malformed_reason, stored_id, stored_ids
from store import (
    DONE,
    FAILED,
    INVALID,
    QUEUED,
    STATUSES,
    BatchClosed,
    BatchEntries,
    BatchNotFound,
    CoinRecord,
    Outcome,
    StoreError,
    SubmissionPlan,
    SubmitResult,
    all_new,
    plan_each_entry,
    plan_submission,
)
from stores.memory import MemoryStore
from stores.sqlite import SqliteStore
from stores.tallies import Tallies
from support import open_test_store

STATUS_KEYS = ("queued", "running", "done", "invalid", "failed")


def done(store, since: int = 0, batch_id: str | None = None) -> list:
    """The done records, in the order of the store's index."""
    return [store.record(coin_id) for coin_id in store.listed_ids(since, batch_id)]


def run_all(store, exchanges_of=lambda coin: [f"{coin}-ex"]) -> list[str]:
    """Claim and finish every queued coin as done; returns them in claim order."""
    order = []
    while (claim := store.claim_next()) is not None:
        order.append(claim.coin_id)
        assert store.finish(claim, Outcome.done(exchanges_of(claim.coin_id)))
    return order


def test_every_entry_takes_a_number_and_a_coin_keeps_its_first(store):
    first = store.submit(["a", "b", "nope", "c"])
    second = store.submit(["b", "d", "d", "bad/id"])

    assert first.task_runs == {"a": 1, "b": 2, "nope": 3, "c": 4}
    assert first.queued == ["a", "b", "nope", "c"]
    assert second.task_runs == {"b": 2, "d": 6, "bad/id": 8}
    assert second.queued == ["d"]
    assert second.duplicates == ["b", "d"]
    assert second.invalid == ["bad/id"]
    assert store.submit(["e"]).task_runs == {"e": 9}
    assert store.submit(["g", "a", "h"]).task_runs == {"g": 10, "a": 1, "h": 12}
    assert {coin_id: store.record(coin_id).task_run for coin_id in ["a", "b", "nope", "c", "d", "e", "g", "h"]} == {
        "a": 1, "b": 2, "nope": 3, "c": 4, "d": 6, "e": 9, "g": 10, "h": 12}
    assert [claim.coin_id for claim in iter(store.claim_next, None)] == ["a", "b", "nope", "c", "d", "e", "g", "h"]


def test_queue_runs_in_task_run_order(store):
    store.submit(["c", "a"])
    store.submit(["b"])
    assert run_all(store) == ["c", "a", "b"]
    assert [(r.id, r.task_run, r.exchanges) for r in done(store)] == [
        ("c", 1, ("c-ex",)), ("a", 2, ("a-ex",)), ("b", 3, ("b-ex",))
    ]


def test_done_records_since_and_out_of_order_finishes(store):
    store.submit(["a", "b", "c"])
    claims = [store.claim_next() for _ in range(3)]
    for claim in reversed(claims):
        store.finish(claim, Outcome.done(["x", "x", "a"]))
    assert [r.task_run for r in done(store)] == [1, 2, 3]
    assert [r.id for r in done(store, since=1)] == ["b", "c"]
    assert done(store, since=3) == []
    assert store.record("a").exchanges == ("a", "x")


def test_failed_coin_is_queued_again_under_its_number(store):
    store.submit(["a", "b"])
    claim = store.claim_next()
    store.finish(claim, Outcome.failed("HTTP 503 (gave up after 5 attempts)"))
    assert store.record("a").status == FAILED
    assert store.record("a").error == "HTTP 503 (gave up after 5 attempts)"

    again = store.submit(["a"])

    assert again.queued == ["a"] and again.task_runs == {"a": 1} and again.duplicates == []
    assert store.record("a").status == QUEUED
    assert store.claim_next().coin_id == "a"


def test_invalid_and_done_coins_are_duplicates(store):
    store.submit(["a", "b"])
    store.finish(store.claim_next(), Outcome.invalid("not a CoinGecko coin ID"))
    store.finish(store.claim_next(), Outcome.done([]))
    result = store.submit(["a", "b"])
    assert result.duplicates == ["a", "b"] and result.queued == []


def test_malformed_ids():
    assert malformed_reason("bitcoin") is None
    assert malformed_reason("0-5x-long-algorand-token") is None
    assert malformed_reason("bücoin") is None
    assert malformed_reason("x" * 200) is None
    assert malformed_reason("x" * 201) == "longer than 200 characters"
    for bad in ["a b", "a\tb", "a\u00a0b", "a/b", "a\\b", "a?b", "a#b", "a%20b", "a\x00b", "a\x7fb", "a\u200bb"]:
        assert malformed_reason(bad) is not None, bad


def plan_fields(plan: SubmissionPlan) -> tuple:
    entries = plan.entries
    return (plan.result, plan.new_ids, plan.new_runs, plan.new_invalid, plan.refreshed, plan.retried,
            entries.coin_ids, entries.task_runs, bytes(entries.kinds), plan.next_task_run)


def test_a_list_of_new_ids_is_numbered_in_bulk_exactly_as_entry_by_entry():
    ids = [f"coin-{i}" for i in range(1_000)] + ["x" * 200, "b"]
    bulk = plan_submission("b", ids, 41, {})
    each = SubmissionPlan(result=SubmitResult(batch="b"), next_task_run=41 + len(ids))
    plan_each_entry(each, ids, 41, {}.get, refresh=False)

    assert all_new(ids, {})
    assert plan_fields(bulk) == plan_fields(each)
    assert bulk.result.task_runs["coin-0"] == 41 and bulk.next_task_run == 41 + len(ids)
    assert bulk.entries.coin_ids is not bulk.new_ids and bulk.result.queued is not bulk.new_ids


def tracked_objects() -> int:
    """Objects the collector watches; two collections, for a tuple is let go once its members are."""
    gc.collect()
    gc.collect()
    return len(gc.get_objects())


def test_the_memory_stores_records_leave_the_collectors_watch():
    """CPython stops tracking an exact tuple of atoms, never a CoinRecord: 100,000 records kept as
    CoinRecords were walked by every older-generation collection."""
    memory = MemoryStore()
    memory.submit(["warm-up"])
    before = tracked_objects()
    memory.submit([f"coin-{i}" for i in range(5_000)])
    for _ in range(1_000):
        memory.finish(memory.claim_next(), Outcome.done(["binance", "uniswap-v3"]))
    memory.submit(["a/b", "coin-7"])

    assert tracked_objects() - before < 50
    assert memory.record("coin-0") == CoinRecord("coin-0", 2, DONE, ("binance", "uniswap-v3"), None,
                                                 memory.record("coin-0").fetched_at, 2, None, True)
    assert memory.record("coin-4999") == CoinRecord("coin-4999", 5001, QUEUED)
    assert memory.records(["coin-4999", "nope", "a/b"]) == [
        CoinRecord("coin-4999", 5001, QUEUED),
        CoinRecord("a/b", 5002, INVALID, error="malformed ID: contains '/'; it is never sent to CoinGecko")]


def test_a_post_of_new_ids_makes_nothing_for_the_collector_to_walk():
    memory = MemoryStore()
    memory.submit(["warm-up"])
    ids = [f"coin-{i}" for i in range(5_000)]
    gc.disable()
    try:
        gc.collect()
        before = gc.get_count()[0]
        memory.submit(ids)
        made = gc.get_count()[0] - before
    finally:
        gc.enable()

    assert made < 50
    assert [claim.coin_id for claim in iter(memory.claim_next, None)] == ["warm-up", *ids]


@pytest.mark.parametrize(
    ("odd", "queued", "duplicates", "invalid", "odd_run"),
    [("a b", [], [], ["a b"], 15), ("a/b", [], [], ["a/b"], 15), ("a\x00b", [], [], ["a\x00b"], 15),
     ("x" * 201, [], [], ["x" * 201], 15), ("bücoin", ["bücoin"], [], [], 15), ("coin-3", [], ["coin-3"], [], 13),
     ("known", [], ["known"], [], 7)],
    ids=["space", "slash", "nul", "long", "unicode", "repeated", "known"],
)
def test_a_list_with_one_malformed_repeated_or_known_id_is_planned_entry_by_entry(
        odd, queued, duplicates, invalid, odd_run):
    known = {"known": CoinRecord("known", 7, DONE, ())}
    ids = [f"coin-{i}" for i in range(5)] + [odd]

    assert not all_new(ids, known)
    result = plan_submission("b", ids, 10, known).result
    assert (result.queued, result.duplicates, result.invalid) == (ids[:5] + queued, duplicates, invalid)
    assert result.task_runs == {f"coin-{i}": 10 + i for i in range(5)} | {odd: odd_run}


def test_malformed_entries_are_never_queued(store):
    result = store.submit(["ok", "a/b", "y" * 5000])
    assert result.invalid == ["a/b", "y" * 210 + "…"]
    assert result.task_runs == {"ok": 1, "a/b": 2, "y" * 210 + "…": 3}
    assert run_all(store) == ["ok"]
    assert store.record("a/b") == CoinRecord(
        "a/b", 2, INVALID, error="malformed ID: contains '/'; it is never sent to CoinGecko"
    )


def test_malformed_ids_with_a_tab_a_line_break_or_a_backslash_are_stored_as_they_came(store):
    ids = ["a\tb", "c\nd", "e\\f", "g\r\\N", "ok"]
    batch = store.submit(ids).batch
    for number, coin_id in enumerate(ids[:4], start=1):
        record = store.record(coin_id)
        assert (record.id, record.task_run, record.status) == (coin_id, number, INVALID), coin_id
        assert record.error.startswith("malformed ID: contains ")
    assert store.batch(batch).counts == {"submitted": 5, "queued": 1, "running": 0, "done": 0, "invalid": 4,
                                         "failed": 0, "duplicates": 0}
    assert run_all(store) == ["ok"]


def test_unknown_or_closed_batch_changes_nothing(store):
    opened = store.submit(["a"], close=True)
    version = store.listing_version()
    with pytest.raises(BatchNotFound):
        store.submit(["b"], batch_id="nope")
    with pytest.raises(BatchClosed):
        store.submit(["c"], batch_id=opened.batch)
    assert store.record("b") is None and store.record("c") is None
    assert store.listing_version() == version
    assert store.submit(["d"]).task_runs == {"d": 2}


def test_batch_counts_add_up_at_every_step(store):
    first = store.submit(["a", "b", "a", "bad/x"])
    store.submit(["c", "b"], batch_id=first.batch)
    store.submit(["z"])

    def counts():
        summary = store.batch(first.batch)
        c = summary.counts
        assert c["submitted"] == sum(c[k] for k in ("queued", "running", "done", "invalid", "failed", "duplicates"))
        return {k: v for k, v in c.items() if v}, summary.complete

    assert counts() == ({"submitted": 6, "queued": 3, "invalid": 1, "duplicates": 2}, False)
    claim = store.claim_next()
    assert counts() == ({"submitted": 6, "queued": 2, "running": 1, "invalid": 1, "duplicates": 2}, False)
    store.finish(claim, Outcome.done([]))
    store.finish(store.claim_next(), Outcome.failed("boom"))
    store.submit([], batch_id=first.batch, close=True)
    assert counts() == ({"submitted": 6, "queued": 1, "done": 1, "failed": 1, "invalid": 1, "duplicates": 2}, False)
    assert store.batch(first.batch).last_queued_task_run == 5
    store.finish(store.claim_next(), Outcome.invalid("unknown"))
    assert counts() == ({"submitted": 6, "done": 1, "failed": 1, "invalid": 2, "duplicates": 2}, True)


def test_batch_filter_lists_a_batchs_done_coins(store):
    first = store.submit(["a", "b"])
    second = store.submit(["b", "c"])
    run_all(store)
    assert [r.id for r in done(store, batch_id=first.batch)] == ["a", "b"]
    assert [r.id for r in done(store, batch_id=second.batch)] == ["b", "c"]
    assert [r.id for r in done(store, since=2, batch_id=second.batch)] == ["c"]
    with pytest.raises(BatchNotFound):
        store.listed_ids(batch_id="nope")


def test_delete_batch_cancels_only_its_unwanted_queued_and_running_coins(store):
    first = store.submit(["a", "b", "c", "d"])
    store.submit(["c"])
    running = store.claim_next()
    assert running.coin_id == "a"

    assert store.delete_batch(first.batch) == ["a", "b", "d"]

    assert store.batch(first.batch) is None
    assert store.record("a") is None and store.record("b") is None and store.record("d") is None
    assert not store.claim_alive(running)
    assert not store.finish(running, Outcome.done([]))
    assert store.record("a") is None
    assert run_all(store) == ["c"]
    with pytest.raises(BatchNotFound):
        store.delete_batch(first.batch)


def test_clear_forgets_everything_and_drops_claims_in_flight(store):
    store.submit(["a", "b"])
    claim = store.claim_next()

    assert store.clear() == 2

    assert store.finish(claim, Outcome.done(["x"])) is False
    assert store.record("a") is None and done(store) == [] and store.batches() == []
    assert store.status_counts() == dict.fromkeys(["queued", "running", "done", "invalid", "failed"], 0)
    assert store.submit(["c"]).task_runs == {"c": 1}
    store.release(claim)
    assert run_all(store) == ["c"]


def test_release_puts_a_coin_back_in_order(store):
    store.submit(["a", "b"])
    claim = store.claim_next()
    store.release(claim)
    assert store.record("a").status == QUEUED
    assert run_all(store) == ["a", "b"]


def test_listed_ids_and_generation(store):
    first_generation = store.generation()
    store.submit(["a", "b", "c"])
    claims = [store.claim_next() for _ in range(3)]
    store.finish(claims[2], Outcome.done([]))
    store.finish(claims[0], Outcome.done([]))
    store.finish(claims[1], Outcome.failed("boom"))
    assert store.listed_ids() == ["a", "c"] and store.listed_ids(1) == ["c"] and store.listed_ids(3) == []
    assert store.generation() == first_generation
    store.clear()
    assert store.listed_ids() == [] and store.generation() != first_generation


def test_listing_changes_name_each_taskrun_listed_or_listed_again(store):
    store.submit(["a", "b", "c", "d"])
    changed, cursor = store.listing_changes(None)
    assert changed is None
    claims = {claim.coin_id: claim for claim in iter(store.claim_next, None)}
    store.finish(claims["c"], Outcome.done(["x"]))
    store.finish(claims["a"], Outcome.done([]))
    store.finish(claims["b"], Outcome.failed("boom"))
    changed, cursor = store.listing_changes(cursor)
    assert sorted(changed) == [1, 3]
    assert store.listing_changes(cursor) == ([], cursor)
    store.submit(["c"], refresh=True)  # queued again, still listed as it was: no change yet
    assert store.listing_changes(cursor) == ([], cursor)
    store.finish(store.claim_next(), Outcome.done(["y"]))
    changed, cursor = store.listing_changes(cursor)
    assert changed == [3] and store.listing_changes(cursor) == ([], cursor)
    assert store.listed_between(0, 100) == ([1, 3], ["a", "c"])
    assert store.listed_between(2, 3) == ([], []) and store.listed_between(3, 4) == ([3], ["c"])


def test_the_listing_log_says_when_it_no_longer_reaches_back(monkeypatch):
    monkeypatch.setattr(tallies_module, "LISTING_LOG_KEPT", 4)
    store = MemoryStore()
    _, start = store.listing_changes(None)
    store.submit([f"coin-{i}" for i in range(10)])
    run_all(store)
    changed, cursor = store.listing_changes(start)
    assert changed is None and cursor == start + 10
    store.submit(["coin-0"], refresh=True)
    run_all(store)
    assert store.listing_changes(cursor) == ([1], cursor + 1)


def test_listing_version_moves_when_the_listing_can_change(store):
    versions = [store.listing_version()]
    store.submit(["a"])
    versions.append(store.listing_version())
    claim = store.claim_next()
    assert store.listing_version() == versions[-1]
    store.finish(claim, Outcome.done([]))
    versions.append(store.listing_version())
    store.clear()
    versions.append(store.listing_version())
    assert len(set(versions)) == 4


def test_counts_and_queue_position(store):
    store.submit(["a", "b", "c"])
    store.finish(store.claim_next(), Outcome.done([]))
    assert store.status_counts() == {"queued": 2, "running": 0, "done": 1, "invalid": 0, "failed": 0}
    assert store.queued_up_to(2) == 1
    assert store.queued_up_to(3) == 2


# -- SQLite only ------------------------------------------------------------------------------


def test_sqlite_reopens_with_everything_and_requeues_running(tmp_path):
    path = str(tmp_path / "coins.db")
    store = SqliteStore(path)
    batch = store.submit(["a", "b", "c"], close=True).batch
    store.finish(store.claim_next(), Outcome.done(["x"]))
    store.claim_next()
    store.close()

    store = SqliteStore(path)
    assert store.record("a").status == DONE and store.record("a").exchanges == ("x",)
    assert store.record("b").status == QUEUED
    assert store.batch(batch).closed
    assert run_all(store) == ["b", "c"]
    assert store.submit(["d"]).task_runs == {"d": 4}
    store.close()


def test_sqlite_refuses_a_second_owner(tmp_path):
    path = str(tmp_path / "coins.db")
    first = SqliteStore(path)
    with pytest.raises(StoreError, match="another process"):
        SqliteStore(path)
    first.close()
    SqliteStore(path).close()


def test_sqlite_refuses_a_file_from_a_newer_release(tmp_path):
    path = str(tmp_path / "coins.db")
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(StoreError, match="schema version 99"):
        SqliteStore(path)


def test_sqlite_writes_a_submission_as_one_row_and_reads_its_entries_back(tmp_path):
    """A submission's entries are one row (schema 5): three submissions into a batch are three rows,
    and a reopened file counts, lists and deletes by the entries those rows hold."""
    path = str(tmp_path / "coins.db")
    store = SqliteStore(path)
    batch = store.submit(["a", "b", "a", "bad id"]).batch
    store.submit(["c", "b"], batch_id=batch)
    store.submit([f"x{i}" for i in range(1000)], batch_id=batch, close=True)
    other = store.submit(["c", "d"]).batch
    store.finish(store.claim_next(), Outcome.done(["x"]))
    store.close()
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT batch_id, first, length(kinds) FROM batch_parts ORDER BY batch_id = ?, first",
                            (other,)).fetchall()
    assert rows == [(batch, 1, 4), (batch, 5, 2), (batch, 7, 1000), (other, 1, 2)]

    store = SqliteStore(path)
    counts = store.batch(batch).counts
    assert (counts["submitted"], counts["duplicates"], counts["invalid"], counts["done"], counts["queued"]) == (
        1006, 2, 1, 1, 1002)
    assert store.listed_ids(batch_id=batch) == ["a"] and store.listed_ids(batch_id=other) == []
    cancelled = store.delete_batch(batch)
    assert cancelled == ["b", *(f"x{i}" for i in range(1000))]  # "c" stays: the other batch refers to it
    assert store.record("c").status == QUEUED and store.record("b") is None
    store.close()


def test_a_schema_4_sqlite_file_moves_its_entries_to_one_part_each(tmp_path):
    """Entries written a row each (schema 4) keep their order and kinds: the batch counts as it did,
    takes more entries after them, and is deleted with them."""
    from stores import sqlite as sqlite_store

    path = str(tmp_path / "coins.db")
    with sqlite3.connect(path) as conn:
        for step in sqlite_store.MIGRATIONS[:4]:
            conn.executescript(step)
        conn.executescript("""
            INSERT INTO coins (id, task_run, status, exchanges) VALUES ('a', 1, 'done', '["x"]');
            INSERT INTO coins (id, task_run, status) VALUES ('b', 2, 'queued');
            INSERT INTO coins (id, task_run, status, error) VALUES ('bad id', 4, 'invalid', 'malformed');
            INSERT INTO batches (id, created, position) VALUES ('b1', 1, 1);
            INSERT INTO batch_entries VALUES ('b1', 1, 'a', 1, 'coin'), ('b1', 2, 'b', 2, 'coin'),
                ('b1', 3, 'a', 1, 'duplicate'), ('b1', 4, 'bad id', 4, 'malformed');
            UPDATE counters SET value = 5 WHERE name = 'next_task_run';
            UPDATE counters SET value = 2 WHERE name = 'next_batch_position';
            PRAGMA user_version = 4;
        """)
    conn.close()

    store = SqliteStore(path)
    counts = store.batch("b1").counts
    assert (counts["submitted"], counts["duplicates"], counts["invalid"], counts["done"], counts["queued"]) == (
        4, 1, 1, 1, 1)
    assert store.submit(["c"], batch_id="b1").task_runs == {"c": 5}
    assert store.batch("b1").counts["submitted"] == 5
    assert store.delete_batch("b1") == ["b", "c"]
    assert store._conn.execute("SELECT count(*) FROM batch_parts").fetchone()[0] == 0
    assert store._conn.execute("PRAGMA user_version").fetchone()[0] == sqlite_store.SCHEMA_VERSION
    store.close()


def test_sqlite_uses_wal(tmp_path):
    store = SqliteStore(str(tmp_path / "coins.db"))
    assert store._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()



# -- counts kept as the data changes ------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_kept_counts_agree_with_a_recount_after_every_change(kind, request, tmp_path):
    """Random submissions (refreshes too), claims, outcomes, releases, deferrals, deletions: after each, the memory
    store's and the database's counts equal a recount from their records, and each other."""
    rng = random.Random(11)
    stores = [MemoryStore(), open_test_store(kind, request, tmp_path)]
    universe = [f"c{i}" for i in range(40)] + ["bad/id"]
    claims: list[list] = [[], []]
    batch_ids: list[str] = []
    owned: dict[str, list[str]] = {}

    def recount(store) -> tuple[dict, list[int]]:
        records = [r for r in (store.record(stored) for stored in universe) if r is not None]
        counts = dict.fromkeys(("queued", "running", "done", "invalid", "failed"), 0)
        for record in records:
            counts[record.status] += 1
        queued = sorted(r.task_run for r in records if r.status == QUEUED)
        return counts, queued

    for step in range(400):
        action = rng.choice(["submit", "claim", "claim", "finish", "release", "defer", "delete"])
        if action == "submit" or not batch_ids:
            ids = rng.choices(universe, k=rng.randint(1, 6))
            refresh = rng.random() < 0.25
            results = [store.submit(ids, refresh=refresh) for store in stores]
            assert (results[0].queued, results[0].task_runs) == (results[1].queued, results[1].task_runs)
            batch_ids.append((results[0].batch, results[1].batch))
            owned[results[0].batch] = owned[results[1].batch] = results[0].queued
        elif action == "claim":
            for store, held in zip(stores, claims, strict=True):
                claim = store.claim_next()
                if claim is not None:
                    held.append(claim)
        elif action in ("finish", "release", "defer") and claims[0]:
            index = rng.randrange(len(claims[0]))
            outcome = rng.choice([Outcome.done(["x", "y"]), Outcome.failed("boom"), Outcome.invalid("no")])
            for store, held in zip(stores, claims, strict=True):
                claim = held.pop(index)
                if action == "finish":
                    store.finish(claim, outcome)
                elif action == "release":
                    store.release(claim)
                else:
                    store.defer(claim, 0.0, frozenset())
        elif action == "delete":
            pair = batch_ids.pop(rng.randrange(len(batch_ids)))
            assert stores[0].delete_batch(pair[0]) == stores[1].delete_batch(pair[1])
        answers = []
        for store in stores:
            counts, queued = recount(store)
            assert store.status_counts() == counts, (step, action)
            for run in (0, 5, 20, 60, 10**6):
                assert store.queued_up_to(run) == sum(1 for q in queued if q <= run), (step, run)
            for summary in store.batches():
                runs = [r.task_run for r in map(store.record, owned[summary.id]) if r and r.status == QUEUED]
                assert summary.last_queued_task_run == max(runs, default=None), (step, action)
            summaries = [(s.counts, s.last_queued_task_run, s.closed) for s in store.batches()]
            for counted, _, _ in summaries:
                assert counted["submitted"] == sum(counted[k] for k in STATUS_KEYS + ("duplicates",))
            answers.append((counts, summaries, store.listed_ids()))
        assert answers[0] == answers[1], (step, action)
    for store in stores:
        store.close()


def test_latest_listed_coins_come_highest_taskrun_first(store):
    store.submit(["a", "b", "c", "d"])
    run_all(store)
    assert store.latest_listed(2) == ["d", "c"]
    assert store.latest_listed(10) == ["d", "c", "b", "a"]


def test_status_counts_come_in_the_same_order_on_every_store(store):
    """The /healthz body shows them as they come: the same order whatever changed last."""
    store.submit(["a", "b", "c/d"])
    claim = store.claim_next()
    store.finish(claim, Outcome.failed("boom"))
    assert list(store.status_counts()) == list(STATUSES)
    assert store.status_counts() == {QUEUED: 1, "running": 0, DONE: 0, INVALID: 1, FAILED: 1}


def test_sorted_runs_keep_order_and_widen_past_four_bytes():
    from stores.tallies import SortedRuns

    runs = SortedRuns()
    runs.add_all([9, 3, 7])
    runs.add(5)
    runs.add(2**40)
    runs.add_all([1, 2**33])
    runs.remove(7)
    assert list(runs.runs) == [1, 3, 5, 9, 2**33, 2**40] and runs.runs.typecode == "q"
    assert 2**40 in runs and 7 not in runs and runs.up_to(9) == 4 and runs.after(5) == [9, 2**33, 2**40]


def test_coins_on_the_same_exchanges_share_one_list_in_memory():
    store = MemoryStore()
    store.submit([f"coin-{i}" for i in range(6)])
    run_all(store, lambda coin: ["uniswap", "binance"] if coin < "coin-3" else ["pancakeswap"])
    records = [store.record(f"coin-{i}") for i in range(6)]
    assert records[0].exchanges == ("binance", "uniswap") and records[5].exchanges == ("pancakeswap",)
    assert records[0].exchanges is records[1].exchanges is records[2].exchanges
    assert records[3].exchanges is records[4].exchanges is records[5].exchanges


def test_exchange_lists_no_record_uses_are_forgotten():
    store = MemoryStore()
    store.submit(["only"])
    run_all(store)
    for round_ in range(3000):
        store.submit(["only"], refresh=True)
        run_all(store, lambda coin, r=round_: [f"ex-{r}"])
    assert store.record("only").exchanges == ("ex-2999",)
    assert len(store._exchange_lists) <= 2 * 1 + 1024 + 1


def test_a_coin_held_by_two_batches_moves_both_batches_counts():
    tallies = Tallies()
    submissions = {"one": [("a", 1), ("b", 2)], "two": [("a", 1), ("c", 3)]}
    for batch_id, coins in submissions.items():
        tallies.batch_added(batch_id)
        entries = BatchEntries()
        for coin_id, task_run in coins:
            entries.append(coin_id, task_run, "coin")
        tallies.submission_added(batch_id, entries)
    tallies.coin_changed("a", 1, QUEUED, DONE)
    tallies.coin_changed("c", 3, QUEUED, DONE)

    assert {batch_id: (tallies.batch_counts(batch_id).counts[QUEUED], tallies.batch_counts(batch_id).counts[DONE])
            for batch_id in submissions} == {"one": (1, 1), "two": (0, 2)}


@pytest.mark.parametrize("odd", ["x" * 211, "x" * 210, "nul\x00", "lone\ud800", "a b", "bücoin", "known"])
def test_stored_ids_are_each_ids_stored_id_with_or_without_the_one_pass_check(odd):
    ids = [f"coin-{i}" for i in range(50)] + [odd, "coin-3"]
    assert stored_ids(ids) == {stored_id(coin_id) for coin_id in ids}
    assert stored_ids(ids[:50]) == set(ids[:50])


def test_a_drained_memory_queue_keeps_no_table_as_large_as_its_longest():
    """A dict emptied by pops keeps its table: after 50,000 coins the queue's would stay megabytes."""
    store = MemoryStore()
    store.submit([f"coin-{i}" for i in range(50_000)])
    run_all(store)
    assert len(store._queue) == 0
    assert sys.getsizeof(store._queue._coins) < 1_000
