-- 0002: liveness that needs no agreement between the nodes' clocks, and separate budgets for
-- errors (the row raised) and losses (its worker was killed, preempted or vanished).
--
-- Heartbeats count up (`beats`). A reaper never compares a stamp written by one node with its own
-- clock: it records, per host, when it saw each running attempt's counter change, on that host's
-- clock (`liveness`), and reaps an attempt whose counter stood still for a grace on it.

ALTER TABLE tasks ADD COLUMN beats INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN errors INTEGER NOT NULL DEFAULT 0;        -- attempts that raised
ALTER TABLE tasks ADD COLUMN losses INTEGER NOT NULL DEFAULT 0;        -- attempts reaped (worker killed or gone)
ALTER TABLE tasks ADD COLUMN max_losses INTEGER NOT NULL DEFAULT 10;
ALTER TABLE workers ADD COLUMN beats INTEGER NOT NULL DEFAULT 0;

UPDATE tasks SET
    errors = (SELECT COUNT(*) FROM attempts AS a WHERE a.task_id = tasks.id AND a.outcome = 'error'),
    losses = (SELECT COUNT(*) FROM attempts AS a WHERE a.task_id = tasks.id AND a.outcome IN ('reaped', 'fenced'));

CREATE TABLE liveness (
    subject  TEXT NOT NULL,               -- a running attempt's lease, or 'worker:' || the worker's id
    observer TEXT NOT NULL,               -- the host whose clock seen_at is on
    beats    INTEGER NOT NULL,            -- the subject's heartbeat counter when it was last seen to change
    seen_at  DOUBLE PRECISION NOT NULL,   -- the observer's clock at that moment
    PRIMARY KEY (subject, observer)
);

-- A row that just raised is retried after the other rows of its kind, not at once: a fault of the
-- row costs one attempt before other work goes ahead, and a fault of the node (the circuit breaker)
-- shows on different rows first.
DROP INDEX tasks_claimable;
CREATE INDEX tasks_claimable ON tasks (priority, errors, id) WHERE status = 'pending';
