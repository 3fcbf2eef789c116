"""The server's own state: API keys (hashed), which tenant owns which sandbox, exposed
ports, kept pools and their waiting members. Every table of the server is made and
queried here (``ServerStore``'s methods); the rest of the server holds no SQL.

One SQLite file, ``<state dir>/server.db`` (WAL; the file and its directory are
private to the user: 0600 / 0700). A key is ``sandvm_`` + 32 random bytes
(URL-safe base64); only its sha256 is stored, so the database never holds a usable
key. ``sandvm key create/ls/revoke`` and a running server share the file: a revoked
key stops working at the server's next request.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import sqlite3
import stat as stat_mod
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandvm.errors import ConfigError, InvalidSpec, Unauthenticated
from sandvm.runtime.journal import open_wal_db, transaction

KEY_PREFIX = "sandvm_"
MAX_KEY_LENGTH = 128  # far more than a real key: anything longer is refused unhashed
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    name TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    sha256 TEXT NOT NULL UNIQUE,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS sandboxes (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    created REAL NOT NULL,
    ended REAL                        -- set when killed or found ended
);
CREATE INDEX IF NOT EXISTS sandboxes_by_tenant ON sandboxes (tenant, ended);
"""

# memory quota and exposed ports (ServerStore._migrate_limits adds sandboxes.memory_mib)
LIMITS_SCHEMA = """
CREATE TABLE IF NOT EXISTS exposed_ports (
    sandbox_id TEXT NOT NULL,
    port INTEGER NOT NULL,            -- the guest port
    host TEXT NOT NULL,               -- where the server listens for it
    host_port INTEGER NOT NULL,       -- 0 until it listens
    created REAL NOT NULL,
    PRIMARY KEY (sandbox_id, port)
);
"""

# tenants' pools, kept across restarts, and their waiting sandboxes (nobody's yet)
POOLS_SCHEMA = """
CREATE TABLE IF NOT EXISTS pools (
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    snapshot TEXT NOT NULL,
    min_size INTEGER NOT NULL,
    max_size INTEGER NOT NULL,
    idle_timeout REAL,
    network TEXT,                     -- the policy as JSON, or NULL
    memory_mib INTEGER NOT NULL,      -- of each sandbox (the snapshot's)
    created REAL NOT NULL,
    PRIMARY KEY (tenant, name)
);
CREATE TABLE IF NOT EXISTS pool_members (
    id TEXT PRIMARY KEY,              -- a waiting sandbox: nobody's yet
    tenant TEXT NOT NULL,
    pool TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class PoolRecord:
    """A kept pool's settings (``network``: the policy as a dict, or None)."""

    tenant: str
    name: str
    snapshot: str
    min_size: int
    max_size: int
    idle_timeout: float | None
    network: dict[str, Any] | None
    memory_mib: int
    created: float


@dataclass(frozen=True)
class KeyInfo:
    """One line of `sandvm key ls` (never the key itself)."""

    name: str
    tenant: str
    created: float


def check_name(value: str, what: str) -> str:
    """``value`` if it is a usable key or tenant name; raise InvalidSpec otherwise."""
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise InvalidSpec(f"invalid {what} {value!r}: use 1-64 letters, digits, '.', '_' or"
                          " '-', starting with a letter or digit")
    return value


def key_sha256(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ServerStore:
    """API keys and sandbox ownership in ``<state_dir>/server.db``.

    Raises ConfigError if the directory or file is not private to this user."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir)
        with contextlib.suppress(FileExistsError):
            self.dir.mkdir(parents=True, mode=0o700)
        st = os.lstat(self.dir)
        if not stat_mod.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            raise ConfigError(f"{self.dir} is not a directory owned by uid {os.geteuid()}")
        if stat_mod.S_IMODE(st.st_mode) & 0o077:
            os.chmod(self.dir, 0o700)
        self.path = self.dir / "server.db"
        self._db = open_wal_db(self.path, SCHEMA)
        self._db.executescript(LIMITS_SCHEMA)
        self._db.executescript(POOLS_SCHEMA)
        self._migrate_limits()
        os.chmod(self.path, 0o600)  # also if it was there before, with a looser mode

    def close(self) -> None:
        self._db.close()

    def _tx(self) -> AbstractContextManager[sqlite3.Connection]:
        return transaction(self._db)

    # ------------------------------------------------------------------ keys

    def create_key(self, name: str, *, tenant: str | None = None) -> str:
        """A new API key named ``name`` for ``tenant`` (default: the name); returns the
        key, which is never stored. Raises InvalidSpec (bad or taken name)."""
        check_name(name, "key name")
        tenant = check_name(tenant if tenant is not None else name, "tenant")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        try:
            with self._tx() as db:
                db.execute("INSERT INTO api_keys (name, tenant, sha256, created)"
                           " VALUES (?, ?, ?, ?)", (name, tenant, key_sha256(key), time.time()))
        except sqlite3.IntegrityError:
            raise InvalidSpec(f"a key named {name!r} exists: choose another name or"
                              f" revoke it first (`sandvm key revoke {name}`)") from None
        return key

    def keys(self) -> list[KeyInfo]:
        """Every key, oldest first."""
        rows = self._db.execute("SELECT name, tenant, created FROM api_keys"
                                " ORDER BY created, name").fetchall()
        return [KeyInfo(name=r[0], tenant=r[1], created=r[2]) for r in rows]

    def revoke_key(self, name: str) -> None:
        """End the key ``name`` (requests with it are refused from now on).
        Raises InvalidSpec if there is no such key."""
        with self._tx() as db:
            cur = db.execute("DELETE FROM api_keys WHERE name = ?", (name,))
        if cur.rowcount == 0:
            raise InvalidSpec(f"no key named {name!r} (see `sandvm key ls`)")

    def tenant_for_key(self, key: str) -> str:
        """The tenant of a valid key. Every stored hash is compared in constant time.
        Raises Unauthenticated for a malformed, unknown or revoked key."""
        if not key.startswith(KEY_PREFIX) or len(key) > MAX_KEY_LENGTH:
            raise Unauthenticated("invalid API key: create one with `sandvm key create NAME`")
        digest = key_sha256(key).encode()
        found: str | None = None
        for tenant, sha in self._db.execute("SELECT tenant, sha256 FROM api_keys"):
            if hmac.compare_digest(digest, sha.encode()):
                found = tenant
        if found is None:
            raise Unauthenticated("invalid API key (unknown or revoked)")
        return found

    # ------------------------------------------------------------------ ownership

    def reserve(self, sandbox_id: str, tenant: str, *, limit: int) -> bool:
        """Record ``tenant`` as the owner of the new ``sandbox_id`` unless it already
        has ``limit`` sandboxes that have not ended; returns whether it did."""
        with self._tx() as db:
            (n,) = db.execute("SELECT count(*) FROM sandboxes WHERE tenant = ? AND"
                              " ended IS NULL", (tenant,)).fetchone()
            if n >= limit:
                return False
            db.execute("INSERT INTO sandboxes (id, tenant, created) VALUES (?, ?, ?)",
                       (sandbox_id, tenant, time.time()))
        return True

    def owner(self, sandbox_id: str) -> tuple[str, float | None] | None:
        """(tenant, ended) of a sandbox this server made, or None."""
        row = self._db.execute("SELECT tenant, ended FROM sandboxes WHERE id = ?",
                               (sandbox_id,)).fetchone()
        return None if row is None else (row[0], row[1])

    def owned(self, tenant: str | None = None) -> list[str]:
        """Ids of the sandboxes not ended (of ``tenant``, or of everyone), oldest first."""
        if tenant is None:
            rows = self._db.execute("SELECT id FROM sandboxes WHERE ended IS NULL"
                                    " ORDER BY created").fetchall()
        else:
            rows = self._db.execute("SELECT id FROM sandboxes WHERE tenant = ? AND"
                                    " ended IS NULL ORDER BY created", (tenant,)).fetchall()
        return [r[0] for r in rows]

    def mark_ended(self, sandbox_id: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE sandboxes SET ended = ? WHERE id = ? AND ended IS NULL",
                       (time.time(), sandbox_id))

    def count_live(self) -> int:
        (n,) = self._db.execute("SELECT count(*) FROM sandboxes WHERE ended IS NULL").fetchone()
        return int(n)

    # ------------------------------------------------------------------ memory quota

    def _migrate_limits(self) -> None:
        """Databases of older servers have no ``sandboxes.memory_mib`` (their sandboxes
        count as 0 MiB)."""
        cols = {r[1] for r in self._db.execute("PRAGMA table_info(sandboxes)")}
        if "memory_mib" not in cols:
            with contextlib.suppress(sqlite3.OperationalError):  # another process did it
                self._db.execute("ALTER TABLE sandboxes ADD COLUMN memory_mib INTEGER"
                                 " NOT NULL DEFAULT 0")

    def memory_in_use(self, tenant: str) -> int:
        """MiB of ``tenant``'s sandboxes that have not ended (reserved ones included)."""
        (n,) = self._db.execute("SELECT coalesce(sum(memory_mib), 0) FROM sandboxes WHERE"
                                " tenant = ? AND ended IS NULL", (tenant,)).fetchone()
        return int(n)

    def reserve_within(self, sandbox_id: str, tenant: str, *, limit: int, memory_mib: int,
                       max_memory_mib: int | None, memory_elsewhere: int = 0
                       ) -> str | None:
        """``reserve`` with a memory quota too, in one transaction: record ``tenant`` as
        the owner of the new ``sandbox_id`` (of ``memory_mib``) unless it already has
        ``limit`` live sandboxes (returns ``"sandboxes"``) or their memory, plus
        ``memory_elsewhere`` (what the tenant holds outside this table) and this one,
        would be over ``max_memory_mib`` (returns ``"memory"``). None: reserved."""
        with self._tx() as db:
            n, used = db.execute("SELECT count(*), coalesce(sum(memory_mib), 0) FROM"
                                 " sandboxes WHERE tenant = ? AND ended IS NULL",
                                 (tenant,)).fetchone()
            if n >= limit:
                return "sandboxes"
            if max_memory_mib is not None and \
                    used + memory_elsewhere + memory_mib > max_memory_mib:
                return "memory"
            db.execute("INSERT INTO sandboxes (id, tenant, created, memory_mib) VALUES"
                       " (?, ?, ?, ?)", (sandbox_id, tenant, time.time(), memory_mib))
        return None

    # ------------------------------------------------------------------ exposed ports

    def reserve_port(self, sandbox_id: str, port: int, host: str, *, limit: int) -> bool:
        """Record guest ``port`` of ``sandbox_id`` as exposed on ``host`` (its host port
        is set once listening: ``set_host_port``), unless the sandbox's tenant already
        has ``limit`` ports exposed in its live sandboxes; returns whether it did. An
        existing record of that port is kept (True)."""
        with self._tx() as db:
            if db.execute("SELECT 1 FROM exposed_ports WHERE sandbox_id = ? AND port = ?",
                          (sandbox_id, port)).fetchone() is not None:
                return True
            (n,) = db.execute(
                "SELECT count(*) FROM exposed_ports e JOIN sandboxes s ON s.id ="
                " e.sandbox_id WHERE s.ended IS NULL AND s.tenant = (SELECT tenant FROM"
                " sandboxes WHERE id = ?)", (sandbox_id,)).fetchone()
            if n >= limit:
                return False
            db.execute("INSERT INTO exposed_ports (sandbox_id, port, host, host_port,"
                       " created) VALUES (?, ?, ?, 0, ?)",
                       (sandbox_id, port, host, time.time()))
        return True

    def set_host_port(self, sandbox_id: str, port: int, host: str, host_port: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE exposed_ports SET host = ?, host_port = ? WHERE"
                       " sandbox_id = ? AND port = ?", (host, host_port, sandbox_id, port))

    def exposed(self, sandbox_id: str) -> list[tuple[int, str, int]]:
        """(guest port, host, host port) of each port of ``sandbox_id`` recorded as
        exposed, by guest port (host port 0: not listening yet)."""
        rows = self._db.execute("SELECT port, host, host_port FROM exposed_ports WHERE"
                                " sandbox_id = ? ORDER BY port", (sandbox_id,)).fetchall()
        return [(int(r[0]), str(r[1]), int(r[2])) for r in rows]

    def unexpose(self, sandbox_id: str, port: int) -> bool:
        """Forget an exposed port; returns whether it was recorded."""
        with self._tx() as db:
            cur = db.execute("DELETE FROM exposed_ports WHERE sandbox_id = ? AND port = ?",
                             (sandbox_id, port))
        return cur.rowcount > 0

    def with_exposed_ports(self) -> list[str]:
        """Live sandboxes with exposed ports, oldest first."""
        rows = self._db.execute("SELECT DISTINCT s.id, s.created FROM exposed_ports e JOIN"
                                " sandboxes s ON s.id = e.sandbox_id WHERE s.ended IS NULL"
                                " ORDER BY s.created").fetchall()
        return [r[0] for r in rows]

    def count_exposed(self) -> int:
        """Exposed ports of live sandboxes (all tenants)."""
        (n,) = self._db.execute("SELECT count(*) FROM exposed_ports e JOIN sandboxes s ON"
                                " s.id = e.sandbox_id WHERE s.ended IS NULL").fetchone()
        return int(n)

    def prune_exposed(self) -> int:
        """Forget the ports of sandboxes that ended; returns how many."""
        with self._tx() as db:
            cur = db.execute("DELETE FROM exposed_ports WHERE sandbox_id NOT IN (SELECT id"
                             " FROM sandboxes WHERE ended IS NULL)")
        return cur.rowcount

    # ------------------------------------------------------------------ pools

    _POOL_COLUMNS = ("tenant, name, snapshot, min_size, max_size, idle_timeout, network,"
                     " memory_mib, created")

    @staticmethod
    def _pool_record(row: tuple[Any, ...]) -> PoolRecord:
        net = json.loads(row[6]) if row[6] else None
        return PoolRecord(tenant=row[0], name=row[1], snapshot=row[2], min_size=int(row[3]),
                          max_size=int(row[4]), idle_timeout=row[5],
                          network=net if isinstance(net, dict) else None,
                          memory_mib=int(row[7]), created=float(row[8]))

    def pools(self, tenant: str | None = None) -> list[PoolRecord]:
        """The kept pools (of ``tenant``, or of everyone), by tenant and name."""
        sql = f"SELECT {self._POOL_COLUMNS} FROM pools"
        rows = self._db.execute(sql + " ORDER BY tenant, name").fetchall() if tenant is None \
            else self._db.execute(sql + " WHERE tenant = ? ORDER BY name", (tenant,)).fetchall()
        return [self._pool_record(tuple(r)) for r in rows]

    def pool(self, tenant: str, name: str) -> PoolRecord | None:
        """The kept pool ``name`` of ``tenant``, or None."""
        row = self._db.execute(f"SELECT {self._POOL_COLUMNS} FROM pools WHERE tenant = ?"
                               " AND name = ?", (tenant, name)).fetchone()
        return None if row is None else self._pool_record(tuple(row))

    def pools_using(self, tenant: str, snapshot: str) -> list[str]:
        """Names of ``tenant``'s pools that restore its snapshot ``snapshot``."""
        return [r[0] for r in self._db.execute(
            "SELECT name FROM pools WHERE tenant = ? AND snapshot = ? ORDER BY name",
            (tenant, snapshot))]

    def pool_totals(self, tenant: str) -> tuple[int, int]:
        """(pools, sum of their ``max_size``) of ``tenant``."""
        n, held = self._db.execute("SELECT count(*), coalesce(sum(max_size), 0) FROM pools"
                                   " WHERE tenant = ?", (tenant,)).fetchone()
        return int(n), int(held)

    def pool_memory_mib(self, tenant: str) -> int:
        """Memory ``tenant``'s pools may hold: each pool's ``max_size`` times its
        sandboxes' memory."""
        (n,) = self._db.execute("SELECT coalesce(sum(max_size * memory_mib), 0) FROM pools"
                                " WHERE tenant = ?", (tenant,)).fetchone()
        return int(n)

    def add_pool(self, pool: PoolRecord) -> bool:
        """Keep ``pool``; returns False (and keeps nothing) if its tenant has a pool of
        that name."""
        try:
            with self._tx() as db:
                db.execute(f"INSERT INTO pools ({self._POOL_COLUMNS}) VALUES"
                           " (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           (pool.tenant, pool.name, pool.snapshot, pool.min_size,
                            pool.max_size, pool.idle_timeout,
                            json.dumps(pool.network) if pool.network is not None else None,
                            pool.memory_mib, pool.created))
        except sqlite3.IntegrityError:
            return False
        return True

    def remove_pool(self, tenant: str, name: str) -> bool:
        """Forget a kept pool (not its members); returns whether it was kept."""
        with self._tx() as db:
            cur = db.execute("DELETE FROM pools WHERE tenant = ? AND name = ?", (tenant, name))
        return cur.rowcount > 0

    def pool_members(self) -> list[str]:
        """Ids of every recorded waiting pool sandbox."""
        return [r[0] for r in self._db.execute("SELECT id FROM pool_members")]

    def add_pool_member(self, sandbox_id: str, tenant: str, pool: str) -> None:
        """Record ``sandbox_id`` as a waiting sandbox of ``tenant``'s ``pool`` (before it
        is restored: a server that dies meanwhile leaves a record to clean up)."""
        with self._tx() as db:
            db.execute("INSERT INTO pool_members (id, tenant, pool) VALUES (?, ?, ?)",
                       (sandbox_id, tenant, pool))

    def forget_pool_members(self, *, sandbox_id: str | None = None,
                            tenant: str | None = None, pool: str | None = None) -> int:
        """Forget waiting pool sandboxes: the one ``sandbox_id``, those of ``tenant``'s
        ``pool``, or (no argument) all. Returns how many."""
        with self._tx() as db:
            if sandbox_id is not None:
                cur = db.execute("DELETE FROM pool_members WHERE id = ?", (sandbox_id,))
            elif tenant is not None and pool is not None:
                cur = db.execute("DELETE FROM pool_members WHERE tenant = ? AND pool = ?",
                                 (tenant, pool))
            else:
                cur = db.execute("DELETE FROM pool_members")
        return cur.rowcount

    def hand_out(self, placeholder: str, sandbox_id: str) -> bool:
        """In one transaction, make the waiting pool sandbox ``sandbox_id`` the owned
        sandbox reserved as ``placeholder`` (the reservation takes its id) and forget
        it as a pool member. Returns False (nothing changed) if the reservation is
        gone or ended."""
        with self._tx() as db:
            cur = db.execute("UPDATE sandboxes SET id = ? WHERE id = ? AND ended IS NULL",
                             (sandbox_id, placeholder))
            if cur.rowcount != 1:
                return False
            db.execute("DELETE FROM pool_members WHERE id = ?", (sandbox_id,))
        return True
