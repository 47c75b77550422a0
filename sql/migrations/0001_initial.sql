-- 0001: configs, videos, tasks with leases, attempts, results, workers, submissions, events.
-- Portable between SQLite and PostgreSQL; {{SERIAL_PK}} is the dialect's auto-increment key.
-- Times are unix seconds (DOUBLE PRECISION): every writer stamps its own clock, and the reaper's
-- grace period allows for skew between nodes.

CREATE TABLE configs (
    hash             TEXT PRIMARY KEY,        -- content hash of the effective hyperparameters + experiment
    kind             TEXT NOT NULL,           -- 'finetune' | 'baseline' (un-fine-tuned inference)
    lr               DOUBLE PRECISION,
    condition_frames INTEGER NOT NULL,
    finetune_steps   INTEGER,
    params           TEXT NOT NULL,           -- canonical JSON that was hashed
    created_at       DOUBLE PRECISION NOT NULL
);

-- A config belongs to every search that contains it: the baseline point is ONE config in three searches.
CREATE TABLE search_configs (
    search      TEXT NOT NULL,
    config_hash TEXT NOT NULL REFERENCES configs (hash),
    name        TEXT NOT NULL,                -- lr_1e-5, cf_22, steps_20: the same config under three names
    parameter   TEXT NOT NULL,
    value       DOUBLE PRECISION NOT NULL,
    is_baseline INTEGER NOT NULL,
    PRIMARY KEY (search, config_hash)
);

CREATE TABLE videos (
    name     TEXT PRIMARY KEY,
    path     TEXT NOT NULL,
    category TEXT NOT NULL,
    caption  TEXT,
    seed     BIGINT NOT NULL                  -- fixed per video: baseline and fine-tuned runs share noise
);

CREATE TABLE tasks (
    id           {{SERIAL_PK}},
    config_hash  TEXT NOT NULL REFERENCES configs (hash),
    video        TEXT NOT NULL REFERENCES videos (name),
    kind         TEXT NOT NULL,               -- 'baseline' | 'finetune'
    depends_on   INTEGER REFERENCES tasks (id),  -- claimable only once this row is done
    priority     INTEGER NOT NULL DEFAULT 0,  -- lower first: baselines before the rows that need them
    status       TEXT NOT NULL DEFAULT 'pending',  -- pending | running | done | diverged | failed
    attempts     INTEGER NOT NULL DEFAULT 0,  -- attempts spent (a clean release gives one back)
    max_attempts INTEGER NOT NULL,
    lease        TEXT,                        -- token of the running attempt: fences late writers
    worker_id    TEXT,
    claimed_at   DOUBLE PRECISION,
    heartbeat_at DOUBLE PRECISION,
    finished_at  DOUBLE PRECISION,
    estimate_s   DOUBLE PRECISION NOT NULL,
    error        TEXT,
    created_at   DOUBLE PRECISION NOT NULL,
    UNIQUE (config_hash, video)
);
-- The claim walks only pending rows in claim order; without it every claim scans finished rows.
CREATE INDEX tasks_claimable ON tasks (priority, id) WHERE status = 'pending';
CREATE INDEX tasks_running ON tasks (heartbeat_at) WHERE status = 'running';
CREATE INDEX tasks_by_config ON tasks (config_hash, status);

CREATE TABLE attempts (
    id           {{SERIAL_PK}},
    task_id      INTEGER NOT NULL REFERENCES tasks (id),
    lease        TEXT NOT NULL UNIQUE,
    number       INTEGER NOT NULL,
    worker_id    TEXT NOT NULL,
    started_at   DOUBLE PRECISION NOT NULL,
    heartbeat_at DOUBLE PRECISION,
    ended_at     DOUBLE PRECISION,
    outcome      TEXT,                        -- NULL while running; done | diverged | error | released | reaped | fenced
    error        TEXT,
    traceback    TEXT
);
CREATE INDEX attempts_by_task ON attempts (task_id);

CREATE TABLE results (
    task_id        INTEGER PRIMARY KEY REFERENCES tasks (id),
    attempt_id     INTEGER NOT NULL REFERENCES attempts (id),
    status         TEXT NOT NULL,             -- done | diverged (metrics NULL)
    psnr           DOUBLE PRECISION,
    ssim           DOUBLE PRECISION,
    lpips          DOUBLE PRECISION,
    trivial_psnr   DOUBLE PRECISION,          -- last conditioning frame repeated (baseline rows)
    trivial_ssim   DOUBLE PRECISION,
    trivial_lpips  DOUBLE PRECISION,
    load_s         DOUBLE PRECISION,
    finetune_s     DOUBLE PRECISION,
    inference_s    DOUBLE PRECISION,
    metrics_s      DOUBLE PRECISION,
    wall_s         DOUBLE PRECISION,
    peak_memory_mb DOUBLE PRECISION,
    lpips_weights  TEXT,                      -- sha256 prefix of the AlexNet weights LPIPS used
    artifact_dir   TEXT,
    details        TEXT,                      -- JSON: per-runner notes
    recorded_at    DOUBLE PRECISION NOT NULL
);

CREATE TABLE workers (
    id                  TEXT PRIMARY KEY,
    host                TEXT NOT NULL,
    pid                 INTEGER NOT NULL,
    slurm_job_id        TEXT,
    slurm_array_job_id  TEXT,
    slurm_array_task_id TEXT,
    gpu                 TEXT,
    started_at          DOUBLE PRECISION NOT NULL,
    heartbeat_at        DOUBLE PRECISION NOT NULL,
    stopped_at          DOUBLE PRECISION,
    state               TEXT NOT NULL,        -- running | stopped | lost
    current_task        INTEGER,
    tasks_done          INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE submissions (
    id           {{SERIAL_PK}},
    job_id       TEXT NOT NULL,
    array_size   INTEGER NOT NULL,
    throttle     INTEGER NOT NULL,
    submitted_at DOUBLE PRECISION NOT NULL,
    command      TEXT NOT NULL,
    script       TEXT NOT NULL,
    state        TEXT NOT NULL DEFAULT 'submitted'   -- submitted | cancelled
);

-- What happened that no row shows any more: fenced late writes, reaps, releases.
CREATE TABLE events (
    id        {{SERIAL_PK}},
    at        DOUBLE PRECISION NOT NULL,
    kind      TEXT NOT NULL,
    task_id   INTEGER,
    lease     TEXT,
    worker_id TEXT,
    message   TEXT NOT NULL
);
