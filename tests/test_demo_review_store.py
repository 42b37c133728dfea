"""The review database: ordering, durability across restarts, concurrent writers, CSV export."""

from __future__ import annotations

import csv
import multiprocessing
import sqlite3
import threading
from pathlib import Path

import pytest

from imaging_ad.app.review_store import NewItem, ReviewStore


def _item(name: str, score: float, sha: str = "m1") -> NewItem:
    return NewItem(
        image_path=f"/data/{name}",
        display_name=name,
        source="inspect",
        model_name="model",
        model_sha=sha,
        score=score,
        normalized_score=score / 10,
        threshold=5.0,
        overlay_path=None,
    )


def test_wal_mode_and_queue_order(tmp_path: Path) -> None:
    store = ReviewStore(tmp_path / "r.sqlite3")
    assert store.journal_mode() == "wal"
    ids = store.add_items([_item("low", 1.0), _item("high", 9.0), _item("mid", 5.0)])
    assert [i.display_name for i in store.queue()] == ["high", "mid", "low"]
    store.record_verdict(ids[1], "normal", "alice", "looks fine")
    # unreviewed first (by score), then reviewed
    assert [i.display_name for i in store.queue()] == ["mid", "low", "high"]
    assert store.next_unreviewed().display_name == "mid"
    assert store.next_unreviewed(after_id=ids[2]).display_name == "low"
    assert store.progress() == (1, 3)
    assert [i.display_name for i in store.queue(limit=2)] == ["mid", "low"]
    assert store.next_unreviewed(model_sha="other") is None
    high = store.item(ids[1])
    assert (high.verdict, high.reviewer, high.note, high.n_verdicts) == ("normal", "alice", "looks fine", 1)


def test_rescoring_keeps_verdicts_and_latest_verdict_wins(tmp_path: Path) -> None:
    store = ReviewStore(tmp_path / "r.sqlite3")
    item_id = store.add_item(_item("a", 3.0))
    store.record_verdict(item_id, "unsure", "alice")
    store.record_verdict(item_id, "anomalous", "bob", "opacity lower left")
    assert store.add_item(_item("a", 4.0)) == item_id  # same image, same model: same item
    item = store.item(item_id)
    assert (
        item.score == 4.0 and item.verdict == "anomalous" and item.reviewer == "bob" and item.n_verdicts == 2
    )
    assert store.add_item(_item("a", 4.0, sha="m2")) != item_id  # another model: another item
    assert [v.verdict for v in store.history(item_id)] == ["unsure", "anomalous"]


def test_bad_verdicts_are_refused(tmp_path: Path) -> None:
    store = ReviewStore(tmp_path / "r.sqlite3")
    item_id = store.add_item(_item("a", 3.0))
    with pytest.raises(ValueError, match="verdict"):
        store.record_verdict(item_id, "maybe", "alice")
    with pytest.raises(ValueError, match="reviewer"):
        store.record_verdict(item_id, "normal", "  ")
    with pytest.raises(ValueError, match="no review item"):
        store.record_verdict(item_id + 100, "normal", "alice")
    assert store.history() == []


def test_verdicts_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite3"
    store = ReviewStore(path)
    item_id = store.add_item(_item("a", 3.0))
    store.record_verdict(item_id, "anomalous", "alice", "note")
    del store
    reopened = ReviewStore(path)
    assert reopened.item(item_id).verdict == "anomalous"
    # and a plain sqlite3 reader sees the committed row (nothing pending in a connection)
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT verdict, reviewer FROM verdicts").fetchall() == [("anomalous", "alice")]


def _write_many(path: str, reviewer: str, item_ids: list[int], rounds: int) -> None:
    store = ReviewStore(path)
    for r in range(rounds):
        for item_id in item_ids:
            store.record_verdict(item_id, ("normal", "anomalous", "unsure")[r % 3], reviewer, f"round {r}")


def test_two_processes_write_at_once_and_nothing_is_lost(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite3"
    store = ReviewStore(path)
    ids = store.add_items([_item(f"img{i}", float(i)) for i in range(10)])
    context = multiprocessing.get_context("spawn")  # a fresh interpreter each, like two app processes
    workers = [
        context.Process(target=_write_many, args=(str(path), name, ids, 8)) for name in ("alice", "bob")
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    history = store.history()
    assert len(history) == 2 * 8 * 10
    assert {v.reviewer for v in history} == {"alice", "bob"}
    assert store.progress() == (10, 10)


def test_threads_write_at_once_and_nothing_is_lost(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite3"
    store = ReviewStore(path)
    ids = store.add_items([_item(f"img{i}", float(i)) for i in range(5)])
    errors: list[BaseException] = []

    def work(name: str) -> None:
        try:
            _write_many(str(path), name, ids, 10)
            store.add_items([_item(f"{name}-{i}", 1.0) for i in range(20)])  # item writes interleave too
        except BaseException as exc:  # noqa: BLE001  (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(f"r{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(store.history()) == 4 * 10 * 5
    assert len(store.queue()) == 5 + 4 * 20


def test_export_csv_latest_and_history(tmp_path: Path) -> None:
    store = ReviewStore(tmp_path / "r.sqlite3")
    a, b = store.add_items([_item("a", 9.0), _item("b, with comma", 1.0)])
    store.record_verdict(a, "unsure", "alice")
    store.record_verdict(a, "anomalous", "bob", 'says "yes"')
    latest = list(csv.DictReader(store.export_csv(tmp_path / "latest.csv").open()))
    assert [(r["display_name"], r["verdict"], r["reviewer"], r["n_verdicts"]) for r in latest] == [
        ("a", "anomalous", "bob", "2"),
        ("b, with comma", "", "", "0"),
    ]
    assert latest[0]["note"] == 'says "yes"'
    history = list(csv.DictReader(store.export_csv(tmp_path / "history.csv", history=True).open()))
    assert [(r["display_name"], r["verdict"]) for r in history] == [("a", "unsure"), ("a", "anomalous")]
