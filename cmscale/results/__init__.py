"""cmscale.results: the DuckDB results store (ingest run directories, query with SQL, export)."""

from cmscale.results.store import (
    DB_FILE,
    SCHEMA_VERSION,
    IngestReport,
    ReadOnlyQueryError,
    StoreError,
    connect,
    db_path,
    default_root,
    ingest,
    migrate,
    query,
)

__all__ = [
    "DB_FILE",
    "SCHEMA_VERSION",
    "IngestReport",
    "ReadOnlyQueryError",
    "StoreError",
    "connect",
    "db_path",
    "default_root",
    "ingest",
    "migrate",
    "query",
]
