-- 0005: the `notify:` command runs once per event, however many processes see it: the first to
-- insert the event's key sends the message, every other insert changes nothing.
--   sweep:<rows>:<attempts>   the sweep has nothing left to run; the counts make a new key once rows are
--                             planned, retried or resumed and run again, so that completion notifies too
--   failed:<task>:<attempts>  a row failed for good (after a retry, its next failure has a new key)

CREATE TABLE notifications (
    key     TEXT PRIMARY KEY,
    kind    TEXT NOT NULL,                -- 'sweep_complete' | 'row_failed'
    task_id INTEGER,
    sender  TEXT NOT NULL,                -- the worker (or command) that won the key and ran the command
    sent_at DOUBLE PRECISION NOT NULL
);
