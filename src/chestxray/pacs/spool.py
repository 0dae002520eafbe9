"""The durable spool: received instances and the results made from them, with a journal
(SQLite in WAL mode: atomic, crash-safe, in the standard library) of each instance's state.

States: received -> analysed (results written) -> sent; or skipped (no results, with the
reason) or failed (given up, moved to failed/ with the reason). After a crash every row in
`received` or `analysed` is picked up again; results carry UIDs derived from the source and
the model, so a send repeated after a crash stores the same objects, not new ones.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from chestxray.io import atomic_write_bytes

SCHEMA = """
create table if not exists instances (
    uid text primary key,
    key text not null,
    state text not null,
    attempts integer not null default 0,
    next_try real not null default 0,
    reason text,
    received real not null,
    done real
)
"""
PENDING = ("received", "analysed")


def short_hash(uid: str) -> str:
    """How logs name an instance: never its UID or any patient tag."""
    return hashlib.sha256(uid.encode()).hexdigest()[:10]


@dataclass
class Entry:
    uid: str
    key: str
    state: str
    attempts: int
    received: float


class Spool:
    """The folder (mode 0700) with incoming/, results/, failed/ and journal.sqlite."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        for sub in ("", "incoming", "results", "failed"):
            (self.root / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.root / "journal.sqlite", check_same_thread=False, isolation_level=None)
        self._db.execute("pragma journal_mode=wal")
        self._db.execute("pragma synchronous=full")
        self._db.execute(SCHEMA)
        os.chmod(self.root / "journal.sqlite", 0o600)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---- paths ---------------------------------------------------------------------------

    def incoming(self, key: str) -> Path:
        return self.root / "incoming" / f"{key}.dcm"

    def results_dir(self, key: str) -> Path:
        return self.root / "results" / key

    # ---- journal -------------------------------------------------------------------------

    def _exec(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def seen(self, uid: str) -> bool:
        return bool(self._exec("select 1 from instances where uid = ?", (uid,)))

    def receive(self, uid: str, data: bytes) -> bool:
        """Store an incoming instance durably (file, then journal row); False for a SOP
        Instance UID seen before (its work is done or under way: not repeated)."""
        if self.seen(uid):
            return False
        key = short_hash(uid) + hashlib.sha256(uid.encode()).hexdigest()[10:24]
        path = self.incoming(key)
        atomic_write_bytes(path, data)
        os.chmod(path, 0o600)
        _fsync(path)
        with self._lock:
            cur = self._db.execute(
                "insert or ignore into instances (uid, key, state, received) values (?, ?, 'received', ?)",
                (uid, key, time.time()),
            )
        return cur.rowcount == 1

    def record_skip(self, uid: str, reason: str) -> None:
        """An instance answered without results (not a frontal chest radiograph, unreadable)."""
        with self._lock:
            self._db.execute(
                "insert into instances (uid, key, state, reason, received, done) values (?, ?, 'skipped', ?, ?, ?) "
                "on conflict(uid) do update set state='skipped', reason=excluded.reason, done=excluded.done",
                (uid, short_hash(uid), reason[:500], time.time(), time.time()),
            )
        self._drop_files(self._key(uid))

    def _key(self, uid: str) -> str:
        rows = self._exec("select key from instances where uid = ?", (uid,))
        return rows[0][0] if rows else short_hash(uid)

    def entries(self, state: str, limit: int = 1000, due: bool = False) -> list[Entry]:
        sql = "select uid, key, state, attempts, received from instances where state = ?"
        args: tuple = (state,)
        if due:
            sql += " and next_try <= ?"
            args += (time.time(),)
        rows = self._exec(sql + " order by received limit ?", (*args, limit))
        return [Entry(*r) for r in rows]

    def mark_analysed(self, uid: str) -> None:
        self._exec("update instances set state='analysed', next_try=0 where uid = ?", (uid,))

    def retry_later(self, uid: str, attempts: int, delay: float, reason: str) -> None:
        self._exec(
            "update instances set attempts = ?, next_try = ?, reason = ? where uid = ?",
            (attempts, time.time() + delay, reason[:500], uid),
        )

    def mark_sent(self, uid: str, keep: bool) -> None:
        self._exec("update instances set state='sent', done=?, reason=null where uid = ?", (time.time(), uid))
        if not keep:
            self._drop_files(self._key(uid))

    def mark_failed(self, uid: str, reason: str) -> None:
        """Give up: the instance and its results move to failed/KEY/ with REASON.txt."""
        key = self._key(uid)
        target = self.root / "failed" / key
        target.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.incoming(key).exists():
            os.replace(self.incoming(key), target / "instance.dcm")
        if self.results_dir(key).exists():
            shutil.rmtree(target / "results", ignore_errors=True)
            os.replace(self.results_dir(key), target / "results")
        (target / "REASON.txt").write_text(reason + "\n")
        self._exec(
            "update instances set state='failed', reason=?, done=? where uid = ?", (reason[:500], time.time(), uid)
        )

    def counts(self) -> dict[str, int]:
        return {str(state): int(n) for state, n in self._exec("select state, count(*) from instances group by state")}

    def purge(self, keep_days: float) -> int:
        """Delete files of instances sent more than `keep_days` ago."""
        cutoff = time.time() - keep_days * 86400
        n = 0
        for (key,) in self._exec("select key from instances where state='sent' and done < ?", (cutoff,)):
            n += self._drop_files(key)
        return n

    def _drop_files(self, key: str) -> int:
        n = 0
        if self.incoming(key).exists():
            self.incoming(key).unlink()
            n += 1
        if self.results_dir(key).exists():
            shutil.rmtree(self.results_dir(key))
            n += 1
        return n

    def result_files(self, key: str) -> Iterator[Path]:
        yield from sorted(self.results_dir(key).glob("*.dcm"))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
