"""A corrupt commands.db is quarantined without losing the replay cache (issue 19, unconfirmed
point): a command redelivered after the quarantine is answered from the cache, not run again.

On main the quarantine started an empty cache, so every command id seen before ran a second
time when the broker delivered it again."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from edge_agent.replies import KEEP_REPLIES, ReplyCache

PAGE = 4096


def _fill(path: Path, n: int) -> None:
    cache = ReplyCache(path)
    for i in range(n):
        assert cache.claim(f"cmd-{i}") == (True, None)
        cache.store(f"cmd-{i}", {"id": f"cmd-{i}", "ok": True, "pad": "x" * 200})
    cache.close()


def _damage_page(path: Path, page: int) -> None:
    with path.open("r+b") as fh:
        fh.seek(page * PAGE)
        fh.write(b"\xde\xad\xbe\xef" * (PAGE // 4))


def _replayed(cache: ReplyCache, n: int) -> int:
    return sum(cache.claim(f"cmd-{i}")[1] is not None for i in range(n))


def test_a_file_damaged_at_rest_is_salvaged_row_by_row(tmp_path: Path) -> None:
    path = tmp_path / "commands.db"
    _fill(path, 300)
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    pages = path.stat().st_size // PAGE
    assert pages > 8
    _damage_page(path, pages // 2)
    cache = ReplyCache(path)
    assert cache.quarantined, "the damaged file was not noticed"
    replayed = _replayed(cache, 300)
    assert replayed >= 250, replayed  # only the rows of the damaged page are gone
    # The new file holds them: a restart after the quarantine still answers from the cache.
    cache.close()
    again = ReplyCache(path)
    assert not again.quarantined
    assert _replayed(again, 300) == replayed


def test_a_file_damaged_while_running_keeps_every_reply(tmp_path: Path) -> None:
    path = tmp_path / "commands.db"
    cache = ReplyCache(path)
    for i in range(50):
        cache.claim(f"cmd-{i}")
        cache.store(f"cmd-{i}", {"id": f"cmd-{i}", "ok": True})
    cache._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    path.write_bytes(b"not a database at all" * 1000)  # nothing in it can be salvaged
    cache._db.close()
    cache._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    assert _replayed(cache, 50) == 50  # from memory, written back into the new file
    assert cache.quarantined
    cache.close()
    assert _replayed(ReplyCache(path), 50) == 50


def test_salvage_keeps_the_newest_replies_and_no_more_than_the_cache_holds(
    tmp_path: Path,
) -> None:
    path = tmp_path / "commands.db"
    _fill(path, KEEP_REPLIES + 300)
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    _damage_page(path, 3)
    cache = ReplyCache(path)
    assert cache.quarantined
    assert cache.claim(f"cmd-{KEEP_REPLIES + 299}")[1] is not None  # the newest survived
    assert KEEP_REPLIES - 50 <= len(cache._memory) <= KEEP_REPLIES  # one page's rows lost
