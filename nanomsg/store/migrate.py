"""Versioned schema files shared by both backends: parsing and locating them.

A schema file is a sequence of sections, each opened by a ``-- migration: <version> <name>``
line. Backends record applied versions in ``schema_migrations`` and apply the rest in order,
so a file only ever grows by appending sections.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

MARKER = re.compile(r"^--\s*migration:\s*(\d+)\s+(\S.*?)\s*$")

_STORE_DIR = Path(__file__).resolve().parent


class Migration(NamedTuple):
    version: int
    name: str
    sql: str


def parse_migrations(text: str) -> list[Migration]:
    """Split a versioned SQL file into its migrations, in file order.

    Raises ValueError when SQL appears before the first marker, a section is empty, or versions
    are not strictly increasing: any of those means the file was edited by mistake.
    """
    migrations: list[Migration] = []
    header: list[str] = []
    current: tuple[int, str] | None = None
    body: list[str] = []

    def finish() -> None:
        if current is None:
            return
        sql = "\n".join(body).strip()
        if not _has_sql(sql):
            raise ValueError(f"migration {current[0]} ({current[1]}) is empty")
        migrations.append(Migration(current[0], current[1], sql + "\n"))

    for line in text.splitlines():
        match = MARKER.match(line)
        if match is None:
            (body if current is not None else header).append(line)
            continue
        finish()
        version, name = int(match.group(1)), match.group(2)
        if migrations and version <= migrations[-1].version:
            raise ValueError(
                f"migration {version} follows {migrations[-1].version}: versions must increase"
            )
        current, body = (version, name), []
    if _has_sql("\n".join(header)):
        raise ValueError("SQL before the first '-- migration:' marker")
    finish()
    if not migrations:
        raise ValueError("no '-- migration: <version> <name>' section found")
    return migrations


def _has_sql(text: str) -> bool:
    """True when ``text`` holds anything besides blank lines and ``--`` comments."""
    return any(line.strip() and not line.strip().startswith("--") for line in text.splitlines())


def load_migrations(path: Path) -> list[Migration]:
    """Read and parse a versioned schema file."""
    return parse_migrations(path.read_text(encoding="utf-8"))


def postgres_schema_path() -> Path:
    """The canonical schema.sql: inside the package in a wheel, else at the repository root.

    The wheel build force-includes the root ``schema.sql`` as ``nanomsg/store/schema.sql``, so
    an installed package finds it next to this module; a source checkout finds it two
    directories above the package.
    """
    packaged = _STORE_DIR / "schema.sql"
    if packaged.is_file():
        return packaged
    checkout = _STORE_DIR.parents[1] / "schema.sql"
    if checkout.is_file():
        return checkout
    raise FileNotFoundError(f"schema.sql not found at {packaged} nor at {checkout}")


def sqlite_schema_path() -> Path:
    """The SQLite schema, always shipped inside the package."""
    return _STORE_DIR / "schema_sqlite.sql"
