"""The store: one sweep's rows in SQLite or PostgreSQL, behind typed reads and fenced writes.

It imports nothing above it (only `hparray.errors`, `hparray.tasks`, `hparray.environment` and
`hparray.resources`): the worker, the CLI and the report talk to the database only through it.
"""

from hparray.store.migrate import migration_files
from hparray.store.records import PlanCounts, ReapReport, TaskCounts
from hparray.store.store import Store
from hparray.store.urls import DEFAULT_DB, redact_url, resolve_url

__all__ = ["DEFAULT_DB", "PlanCounts", "ReapReport", "Store", "TaskCounts", "migration_files", "redact_url",
           "resolve_url"]
