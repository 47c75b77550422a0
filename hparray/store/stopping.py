"""Sequential stopping's writes and reads (migration 0004), beside the Store's own: skip a stopped
config's pending rows, put every skipped row back, read the decisions. The decision itself is
`hparray.stopping`'s; nothing here computes a statistic."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hparray.store.records import StopRecord

if TYPE_CHECKING:
    from hparray.store.store import Store


def skip_pending(store: Store, stop: StopRecord, now: float) -> int:
    """Set the config's pending rows to 'skipped' and keep the decision, in one transaction; running
    and finished rows are never touched. Returns the rows skipped (0 when another worker was first)."""
    with store._write() as conn:
        skipped = int(store._run(conn, "skip_pending", {"config_hash": stop.config_hash}).rowcount or 0)
        if not skipped:
            return 0
        store._run(conn, "record_stop", {
            "config_hash": stop.config_hash, "search": stop.search, "metric": stop.metric, "videos": stop.videos,
            "planned": stop.planned, "looks": stop.looks, "p_value": stop.p_value,
            "window_p_value": stop.window_p_value, "boundary": stop.boundary, "skipped": skipped, "now": now})
        store._run(conn, "log_event", {
            "now": now, "kind": "stopped", "task_id": None, "lease": None, "worker_id": None,
            "message": f"config {stop.config_hash}: {skipped} pending rows skipped, worse than the baseline of "
                       f"search {stop.search} after {stop.videos} videos (p={stop.p_value:.4g} < {stop.boundary:.4g})"})
    return skipped


def resume_skipped(store: Store, now: float) -> int:
    """Every skipped row back to 'pending' (stopping turned off), the decisions forgotten; one transaction."""
    with store._write() as conn:
        configs = [(row.config_hash, int(row.n)) for row in store._run(conn, "skipped_configs")]
        if not configs:
            return 0
        resumed = int(store._run(conn, "resume_skipped").rowcount or 0)
        store._run(conn, "forget_stops")
        for config_hash, n in configs:
            store._run(conn, "log_event", {
                "now": now, "kind": "resumed", "task_id": None, "lease": None, "worker_id": None,
                "message": f"config {config_hash}: {n} skipped rows pending again (stopping is off)"})
    return resumed


def stops(store: Store) -> list[StopRecord]:
    """The configs sequential stopping stopped (and not resumed since)."""
    return store._records(StopRecord, "stops")
