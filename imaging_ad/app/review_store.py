"""Review verdicts in SQLite: the queue of scored images and what reviewers said about them.

Two tables. ``items``: one row per (image, model) that was scored, with its score and overlay.
``verdicts``: append-only, one row per decision (normal / anomalous / unsure, reviewer, note, time);
an image's current verdict is its latest row, and the history stays for audit. Appending instead of
updating is what lets two reviewers work at once without overwriting each other.

Durability and concurrency: WAL journal (readers never block the writer), ``synchronous=FULL`` (a
committed verdict survives a crash or power cut), one short ``BEGIN IMMEDIATE`` transaction per write
(the write lock is taken up front, so two writers queue instead of deadlocking on an upgrade), and a
``busy_timeout`` so a writer waits for the other instead of failing. A connection per call keeps the
store safe to use from Gradio's worker threads and from several processes.
"""

from __future__ import annotations

import csv
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from imaging_ad.io.safe_text import csv_cell

VERDICTS = ("normal", "anomalous", "unsure")
SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 10_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    image_path TEXT NOT NULL,          -- absolute path of the image as scored
    display_name TEXT NOT NULL,        -- what to show (the uploaded file name, the path in the batch)
    source TEXT NOT NULL,              -- 'inspect' or 'batch:<id>'
    model_name TEXT NOT NULL,
    model_sha TEXT NOT NULL,           -- the model file's own fingerprint (its description's SHA-256)
    score REAL NOT NULL,
    normalized_score REAL NOT NULL,
    threshold REAL NOT NULL,           -- raw image threshold the model was calibrated to
    overlay_path TEXT,
    width INTEGER,
    height INTEGER,
    created_at TEXT NOT NULL,
    UNIQUE (image_path, model_sha)
);
CREATE INDEX IF NOT EXISTS items_score ON items (score DESC);
CREATE TABLE IF NOT EXISTS verdicts (
    id INTEGER PRIMARY KEY,
    item_id INTEGER NOT NULL REFERENCES items(id) ON DELETE CASCADE,
    verdict TEXT NOT NULL CHECK (verdict IN ('normal', 'anomalous', 'unsure')),
    reviewer TEXT NOT NULL,
    note TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS verdicts_item ON verdicts (item_id, id);
"""

# latest verdict per item: the verdict row with the highest id
_LATEST = """
SELECT i.*, v.verdict, v.reviewer, v.note, v.created_at AS reviewed_at,
       (SELECT COUNT(*) FROM verdicts c WHERE c.item_id = i.id) AS n_verdicts
FROM items i
LEFT JOIN verdicts v ON v.id = (SELECT MAX(id) FROM verdicts w WHERE w.item_id = i.id)
"""


@dataclass(frozen=True)
class NewItem:
    image_path: str
    display_name: str
    source: str
    model_name: str
    model_sha: str
    score: float
    normalized_score: float
    threshold: float
    overlay_path: str | None = None
    width: int | None = None
    height: int | None = None


@dataclass(frozen=True)
class QueueItem:
    id: int
    image_path: str
    display_name: str
    source: str
    model_name: str
    model_sha: str
    score: float
    normalized_score: float
    threshold: float
    overlay_path: str | None
    width: int | None
    height: int | None
    created_at: str
    verdict: str | None  # latest verdict, None while unreviewed
    reviewer: str | None
    note: str | None
    reviewed_at: str | None
    n_verdicts: int

    @property
    def reviewed(self) -> bool:
        return self.verdict is not None


@dataclass(frozen=True)
class Verdict:
    id: int
    item_id: int
    verdict: str
    reviewer: str
    note: str
    created_at: str


def _escaped(row: dict) -> dict:
    """Names, notes and reviewers are typed or uploaded by people: no cell may run as a spreadsheet
    formula when the export is opened (OWASP CSV injection; numbers stay numbers)."""
    return {key: csv_cell(value) for key, value in row.items()}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class ReviewStore:
    """The review database at ``path`` (created with its folder on first use)."""

    def __init__(self, path: str | os.PathLike, busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> None:
        self.path = Path(path)
        self.busy_timeout_ms = busy_timeout_ms
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")  # persistent: stored in the file once set
            with self._write(db):
                # statement by statement: executescript() would COMMIT the open transaction first
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )
            version = int(db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0])
        if version != SCHEMA_VERSION:
            raise RuntimeError(
                f"{self.path}: review database schema {version}, this version reads {SCHEMA_VERSION}"
            )

    # -- connections and transactions ---------------------------------------------------------------

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # isolation_level=None: no implicit transactions; _write opens them explicitly
        db = sqlite3.connect(self.path, timeout=self.busy_timeout_ms / 1000, isolation_level=None)
        try:
            db.row_factory = sqlite3.Row
            db.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_ms)}")
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("PRAGMA synchronous=FULL")
            yield db
        finally:
            db.close()

    @contextmanager
    def _write(self, db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def journal_mode(self) -> str:
        with self._connect() as db:
            return db.execute("PRAGMA journal_mode").fetchone()[0]

    # -- items ------------------------------------------------------------------------------------

    def add_items(self, items: Iterable[NewItem]) -> list[int]:
        """Insert scored images in one transaction; an image already scored by the same model gets its
        new score (its verdicts are kept). Returns the item ids, in order."""
        ids = []
        created = _now()
        with self._connect() as db, self._write(db):
            for item in items:
                row = db.execute(
                    """INSERT INTO items (image_path, display_name, source, model_name, model_sha, score,
                           normalized_score, threshold, overlay_path, width, height, created_at)
                       VALUES (:image_path, :display_name, :source, :model_name, :model_sha, :score,
                           :normalized_score, :threshold, :overlay_path, :width, :height, :created_at)
                       ON CONFLICT (image_path, model_sha) DO UPDATE SET
                           display_name=excluded.display_name, source=excluded.source,
                           model_name=excluded.model_name, score=excluded.score,
                           normalized_score=excluded.normalized_score, threshold=excluded.threshold,
                           overlay_path=excluded.overlay_path, width=excluded.width, height=excluded.height
                       RETURNING id""",
                    asdict(item) | {"created_at": created},
                ).fetchone()
                ids.append(int(row[0]))
        return ids

    def add_item(self, item: NewItem) -> int:
        return self.add_items([item])[0]

    def item(self, item_id: int) -> QueueItem | None:
        with self._connect() as db:
            row = db.execute(_LATEST + " WHERE i.id = ?", (item_id,)).fetchone()
        return QueueItem(**dict(row)) if row else None

    def queue(
        self, model_sha: str | None = None, source: str | None = None, limit: int | None = None
    ) -> list[QueueItem]:
        """Items with their latest verdict: unreviewed first, then by score, highest first."""
        where, params = self._filters(model_sha, source)
        query = _LATEST + where + " ORDER BY (v.verdict IS NOT NULL), i.score DESC, i.id"
        if limit is not None:
            query += f" LIMIT {int(limit)}"
        with self._connect() as db:
            rows = db.execute(query, params).fetchall()
        return [QueueItem(**dict(r)) for r in rows]

    def next_unreviewed(self, model_sha: str | None = None, after_id: int | None = None) -> QueueItem | None:
        """The highest-scoring unreviewed item (other than ``after_id``), or None when all are done."""
        where, params = self._filters(model_sha, None)
        clause = " AND " if where else " WHERE "
        query = _LATEST + where + clause + "v.id IS NULL AND i.id != ? ORDER BY i.score DESC, i.id LIMIT 1"
        with self._connect() as db:
            row = db.execute(query, [*params, -1 if after_id is None else after_id]).fetchone()
        return QueueItem(**dict(row)) if row else None

    def progress(self, model_sha: str | None = None, source: str | None = None) -> tuple[int, int]:
        """(items with at least one verdict, all items)."""
        where, params = self._filters(model_sha, source)
        with self._connect() as db:
            row = db.execute(
                "SELECT COUNT(*), SUM(EXISTS (SELECT 1 FROM verdicts v WHERE v.item_id = i.id)) FROM items i"
                + where,
                params,
            ).fetchone()
        return int(row[1] or 0), int(row[0])

    @staticmethod
    def _filters(model_sha: str | None, source: str | None) -> tuple[str, list[str]]:
        clauses, params = [], []
        if model_sha:
            clauses.append("i.model_sha = ?")
            params.append(model_sha)
        if source:
            clauses.append("i.source = ?")
            params.append(source)
        return (" WHERE " + " AND ".join(clauses) if clauses else ""), params

    # -- verdicts ---------------------------------------------------------------------------------

    def record_verdict(self, item_id: int, verdict: str, reviewer: str, note: str = "") -> int:
        """Append a verdict for ``item_id``; returns its id. Committed (and synced) on return."""
        if verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {verdict!r}")
        reviewer = (reviewer or "").strip()
        if not reviewer:
            raise ValueError("enter a reviewer name before recording a verdict")
        with self._connect() as db, self._write(db):
            if db.execute("SELECT 1 FROM items WHERE id = ?", (item_id,)).fetchone() is None:
                raise ValueError(f"no review item with id {item_id}")
            cursor = db.execute(
                "INSERT INTO verdicts (item_id, verdict, reviewer, note, created_at) VALUES (?, ?, ?, ?, ?)",
                (item_id, verdict, reviewer[:200], (note or "").strip()[:5000], _now()),
            )
            return int(cursor.lastrowid)

    def history(self, item_id: int | None = None) -> list[Verdict]:
        """Every verdict (of one item, or of all), oldest first."""
        query = "SELECT id, item_id, verdict, reviewer, note, created_at FROM verdicts"
        params: Sequence[int] = ()
        if item_id is not None:
            query += " WHERE item_id = ?"
            params = (item_id,)
        with self._connect() as db:
            rows = db.execute(query + " ORDER BY id", params).fetchall()
        return [Verdict(**dict(r)) for r in rows]

    def labelled(self, model_sha: str | None = None) -> list[QueueItem]:
        """Items whose latest verdict is normal or anomalous (unsure ones tell nothing), by score."""
        return [i for i in self.queue(model_sha) if i.verdict in ("normal", "anomalous")]

    def models(self) -> list[tuple[str, str, int]]:
        """(model name, model fingerprint, item count) of the models that have items, most items first."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT model_name, model_sha, COUNT(*) FROM items GROUP BY model_sha ORDER BY COUNT(*) DESC"
            ).fetchall()
        return [(r[0], r[1], int(r[2])) for r in rows]

    # -- export -----------------------------------------------------------------------------------

    EXPORT_FIELDS = (
        "item_id",
        "display_name",
        "image_path",
        "source",
        "model_name",
        "model_sha",
        "score",
        "normalized_score",
        "threshold",
        "verdict",
        "reviewer",
        "note",
        "reviewed_at",
        "n_verdicts",
    )

    def export_csv(self, path: str | os.PathLike, history: bool = False) -> Path:
        """Write the verdicts as CSV: one row per image with its latest verdict (unreviewed ones
        included, verdict empty), or with ``history=True`` one row per verdict ever recorded."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        items = {i.id: i for i in self.queue()}
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.EXPORT_FIELDS)
            writer.writeheader()
            if history:
                for v in self.history():
                    item = items[v.item_id]
                    row = self._export_row(item) | {
                        "verdict": v.verdict,
                        "reviewer": v.reviewer,
                        "note": v.note,
                        "reviewed_at": v.created_at,
                    }
                    writer.writerow(_escaped(row))
            else:
                for item in sorted(items.values(), key=lambda i: (-i.score, i.id)):
                    writer.writerow(_escaped(self._export_row(item)))
        return path

    @staticmethod
    def _export_row(item: QueueItem) -> dict:
        return {
            "item_id": item.id,
            "display_name": item.display_name,
            "image_path": item.image_path,
            "source": item.source,
            "model_name": item.model_name,
            "model_sha": item.model_sha,
            "score": item.score,
            "normalized_score": item.normalized_score,
            "threshold": item.threshold,
            "verdict": item.verdict or "",
            "reviewer": item.reviewer or "",
            "note": item.note or "",
            "reviewed_at": item.reviewed_at or "",
            "n_verdicts": item.n_verdicts,
        }
