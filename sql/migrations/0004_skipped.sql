-- 0004: sequential stopping (`stopping:` in base.yaml, off by default). A fine-tune config that is
-- significantly worse than its search's baseline has its pending rows set to status 'skipped': the
-- claim takes 'pending' rows only, so they never run, and turning stopping off puts them back to
-- 'pending'. tasks.status is plain TEXT without a CHECK constraint in 0001 on both SQLite and
-- PostgreSQL, so the new status needs no table rebuild; the claim's partial index (WHERE status =
-- 'pending') leaves skipped rows out by itself.
--
-- `stops` keeps each decision, so the report can say why a config stopped: against which
-- search's baseline, after how many paired videos, the one-sided p and the boundary it was below.

CREATE TABLE stops (
    config_hash    TEXT PRIMARY KEY REFERENCES configs (hash),
    search         TEXT NOT NULL,             -- the search whose baseline it was worse than
    metric         TEXT NOT NULL,
    videos         INTEGER NOT NULL,          -- paired videos at the look that stopped it
    planned        INTEGER NOT NULL,          -- videos planned for the config
    looks          INTEGER NOT NULL,          -- planned looks K: the boundary is alpha / K
    p_value        DOUBLE PRECISION NOT NULL, -- one-sided Wilcoxon p, config worse than the baseline
    window_p_value DOUBLE PRECISION,          -- the same on the search's common window of frames, if any
    boundary       DOUBLE PRECISION NOT NULL,
    skipped        INTEGER NOT NULL,          -- rows set to 'skipped'
    stopped_at     DOUBLE PRECISION NOT NULL
);
