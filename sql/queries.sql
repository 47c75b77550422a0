-- The hot-path statements, by name. hparray/store.py loads this file once and runs nothing else
-- on the claim -> heartbeat -> finish path. A name ending in .sqlite or .postgresql is that
-- dialect's variant; the store picks it over the plain name.
--
-- Fencing: every write on behalf of a running attempt says `lease = :lease AND status = 'running'`,
-- so a worker that was declared dead (but was only slow) changes nothing when it comes back.

-- ---------------------------------------------------------------- planning (idempotent inserts)

-- name: insert_config
INSERT INTO configs (hash, kind, lr, condition_frames, finetune_steps, params, created_at)
VALUES (:hash, :kind, :lr, :condition_frames, :finetune_steps, :params, :now)
ON CONFLICT (hash) DO NOTHING;

-- name: insert_search_config
INSERT INTO search_configs (search, config_hash, name, parameter, value, is_baseline)
VALUES (:search, :config_hash, :name, :parameter, :value, :is_baseline)
ON CONFLICT (search, config_hash) DO NOTHING;

-- name: insert_video
INSERT INTO videos (name, path, category, caption, seed)
VALUES (:name, :path, :category, :caption, :seed)
ON CONFLICT (name) DO NOTHING;

-- name: task_ids
SELECT config_hash, video, id FROM tasks;

-- name: insert_task
INSERT INTO tasks (config_hash, video, kind, depends_on, priority, max_attempts, max_losses, estimate_s, created_at)
VALUES (:config_hash, :video, :kind, :depends_on, :priority, :max_attempts, :max_losses, :estimate_s, :now);

-- name: insert_task.postgresql
INSERT INTO tasks (config_hash, video, kind, depends_on, priority, max_attempts, max_losses, estimate_s, created_at)
VALUES (:config_hash, :video, :kind, :depends_on, :priority, :max_attempts, :max_losses, :estimate_s, :now)
RETURNING id;

-- name: record_submission
INSERT INTO submissions (job_id, array_size, throttle, submitted_at, command, script)
VALUES (:job_id, :array_size, :throttle, :now, :command, :script);

-- ---------------------------------------------------------------- the worker's path

-- name: claim.sqlite
-- Runs inside BEGIN IMMEDIATE, so no second writer can slip between the SELECT and the UPDATE.
UPDATE tasks
   SET status = 'running', attempts = attempts + 1, lease = :lease, worker_id = :worker_id,
       claimed_at = :now, heartbeat_at = :now
 WHERE id = (SELECT t.id FROM tasks AS t
              WHERE t.status = 'pending'
                AND (t.depends_on IS NULL
                     OR EXISTS (SELECT 1 FROM tasks AS d WHERE d.id = t.depends_on AND d.status = 'done'))
              ORDER BY t.priority, t.errors, t.id
              LIMIT 1)
RETURNING id, attempts;

-- name: claim.postgresql
UPDATE tasks
   SET status = 'running', attempts = attempts + 1, lease = :lease, worker_id = :worker_id,
       claimed_at = :now, heartbeat_at = :now
 WHERE id = (SELECT t.id FROM tasks AS t
              WHERE t.status = 'pending'
                AND (t.depends_on IS NULL
                     OR EXISTS (SELECT 1 FROM tasks AS d WHERE d.id = t.depends_on AND d.status = 'done'))
              ORDER BY t.priority, t.errors, t.id
              LIMIT 1
              FOR UPDATE OF t SKIP LOCKED)
RETURNING id, attempts;

-- name: claim_candidate
-- SQLite < 3.35 has no RETURNING: pick, then claim_by_id, inside the same BEGIN IMMEDIATE.
SELECT t.id FROM tasks AS t
 WHERE t.status = 'pending'
   AND (t.depends_on IS NULL
        OR EXISTS (SELECT 1 FROM tasks AS d WHERE d.id = t.depends_on AND d.status = 'done'))
 ORDER BY t.priority, t.errors, t.id
 LIMIT 1;

-- name: claim_by_id
UPDATE tasks
   SET status = 'running', attempts = attempts + 1, lease = :lease, worker_id = :worker_id,
       claimed_at = :now, heartbeat_at = :now
 WHERE id = :task_id AND status = 'pending';

-- name: claimed_task
SELECT t.id, t.kind, t.attempts, t.max_attempts, t.estimate_s, t.config_hash,
       c.lr, c.condition_frames, c.finetune_steps,
       v.name AS video, v.path AS video_path, v.category, v.caption, v.seed AS video_seed
  FROM tasks AS t
  JOIN configs AS c ON c.hash = t.config_hash
  JOIN videos AS v ON v.name = t.video
 WHERE t.id = :task_id;

-- name: start_attempt
INSERT INTO attempts (task_id, lease, number, worker_id, started_at, heartbeat_at)
VALUES (:task_id, :lease, :number, :worker_id, :now, :now);

-- name: waiting_work
-- Pending rows that will become claimable once a running (or pending) dependency is done.
SELECT COUNT(*) FROM tasks AS t
  JOIN tasks AS d ON d.id = t.depends_on
 WHERE t.status = 'pending' AND d.status IN ('pending', 'running');

-- name: heartbeat_task
UPDATE tasks SET heartbeat_at = :now, beats = beats + 1
 WHERE id = :task_id AND lease = :lease AND status = 'running';

-- name: heartbeat_attempt
UPDATE attempts SET heartbeat_at = :now WHERE lease = :lease AND outcome IS NULL;

-- name: heartbeat_worker
UPDATE workers SET heartbeat_at = :now, beats = beats + 1, current_task = :task_id WHERE id = :worker_id;

-- ---------------------------------------------------------------- liveness (0002)
-- A heartbeat (and the claim) also records, for the worker's own host, that the counter changed
-- now on that host's clock, so a reaper on the same host judges it at once; a reaper on another
-- host records the changes it sees on its own clock (`watch`).

-- name: watch_claim
INSERT INTO liveness (subject, observer, beats, seen_at)
SELECT :lease, w.host, 0, :now FROM workers AS w WHERE w.id = :worker_id
ON CONFLICT (subject, observer) DO UPDATE SET beats = excluded.beats, seen_at = excluded.seen_at;

-- name: watch_task_beat
INSERT INTO liveness (subject, observer, beats, seen_at)
SELECT t.lease, w.host, t.beats, :now FROM tasks AS t, workers AS w
 WHERE t.id = :task_id AND t.lease = :lease AND t.status = 'running' AND w.id = :worker_id
ON CONFLICT (subject, observer) DO UPDATE SET beats = excluded.beats, seen_at = excluded.seen_at;

-- name: watch_worker_beat
INSERT INTO liveness (subject, observer, beats, seen_at)
SELECT 'worker:' || w.id, w.host, w.beats, :now FROM workers AS w WHERE w.id = :worker_id
ON CONFLICT (subject, observer) DO UPDATE SET beats = excluded.beats, seen_at = excluded.seen_at;

-- name: watch
INSERT INTO liveness (subject, observer, beats, seen_at) VALUES (:subject, :observer, :beats, :now)
ON CONFLICT (subject, observer) DO UPDATE SET beats = excluded.beats, seen_at = excluded.seen_at;

-- name: seen_by
SELECT subject, beats, seen_at FROM liveness WHERE observer = :observer;

-- name: forget_ended
DELETE FROM liveness
 WHERE subject NOT IN (SELECT lease FROM tasks WHERE status = 'running' AND lease IS NOT NULL)
   AND subject NOT IN (SELECT 'worker:' || id FROM workers WHERE state = 'running');

-- name: finish_task
UPDATE tasks
   SET status = :status, lease = NULL, finished_at = :now, heartbeat_at = :now, error = NULL
 WHERE id = :task_id AND lease = :lease AND status = 'running';

-- name: insert_result
INSERT INTO results (task_id, attempt_id, status, psnr, ssim, lpips, trivial_psnr, trivial_ssim,
                     trivial_lpips, load_s, finetune_s, inference_s, metrics_s, wall_s, peak_memory_mb,
                     lpips_weights, artifact_dir, details, per_frame, recorded_at)
SELECT :task_id, a.id, :status, :psnr, :ssim, :lpips, :trivial_psnr, :trivial_ssim, :trivial_lpips,
       :load_s, :finetune_s, :inference_s, :metrics_s, :wall_s, :peak_memory_mb, :lpips_weights,
       :artifact_dir, :details, :per_frame, :now
  FROM attempts AS a WHERE a.lease = :lease;

-- name: fail_task
-- An error spends one of max_attempts; the row is retried until they are spent, then failed for good.
UPDATE tasks
   SET status = CASE WHEN errors + 1 >= max_attempts THEN 'failed' ELSE 'pending' END,
       finished_at = CASE WHEN errors + 1 >= max_attempts THEN :now ELSE NULL END,
       errors = errors + 1, lease = NULL, worker_id = NULL, heartbeat_at = NULL, error = :error
 WHERE id = :task_id AND lease = :lease AND status = 'running';

-- name: release_task
-- A clean stop (SIGTERM, Slurm's warning) gives the attempt back: it was not the task's fault.
UPDATE tasks
   SET status = 'pending', attempts = attempts - 1, lease = NULL, worker_id = NULL, heartbeat_at = NULL
 WHERE id = :task_id AND lease = :lease AND status = 'running';

-- name: end_attempt
UPDATE attempts SET ended_at = :now, outcome = :outcome, error = :error, traceback = :traceback
 WHERE lease = :lease AND outcome IS NULL;

-- name: fence_attempt
-- A write by an attempt whose row is no longer its own: its worker is alive, so a reaped attempt
-- becomes 'fenced' (slow, not dead). An attempt that ended by itself (done, error, released) keeps
-- its outcome: a heartbeat that raced its own finish is not a fenced attempt.
UPDATE attempts
   SET outcome = 'fenced', ended_at = COALESCE(ended_at, :now), error = COALESCE(error || '; ', '') || :error
 WHERE lease = :lease AND (outcome IS NULL OR outcome = 'reaped');

-- name: task_status
SELECT status FROM tasks WHERE id = :task_id;

-- name: running_tasks
SELECT t.id, t.lease, t.worker_id, t.heartbeat_at, t.beats, t.losses, t.max_losses, w.slurm_job_id,
       w.slurm_array_job_id, w.slurm_array_task_id
  FROM tasks AS t LEFT JOIN workers AS w ON w.id = t.worker_id
 WHERE t.status = 'running';

-- name: reap_task
-- A lost attempt (killed, preempted, vanished) spends one of max_losses, not of max_attempts: a
-- preemptible partition must not fail a row that never erred. A row that kills its worker every
-- time (out of memory) still ends failed, with :final_error saying so.
UPDATE tasks
   SET status = CASE WHEN losses + 1 >= max_losses THEN 'failed' ELSE 'pending' END,
       finished_at = CASE WHEN losses + 1 >= max_losses THEN :now ELSE NULL END,
       error = CASE WHEN losses + 1 >= max_losses THEN :final_error ELSE :error END,
       losses = losses + 1, lease = NULL, worker_id = NULL, heartbeat_at = NULL
 WHERE id = :task_id AND lease = :lease AND status = 'running';

-- name: log_event
INSERT INTO events (at, kind, task_id, lease, worker_id, message)
VALUES (:now, :kind, :task_id, :lease, :worker_id, :message);

-- name: register_worker
INSERT INTO workers (id, host, pid, slurm_job_id, slurm_array_job_id, slurm_array_task_id, gpu,
                     started_at, heartbeat_at, state)
VALUES (:worker_id, :host, :pid, :slurm_job_id, :slurm_array_job_id, :slurm_array_task_id, :gpu,
        :now, :now, 'running');

-- name: worker_task_done
UPDATE workers SET tasks_done = tasks_done + 1, current_task = NULL, heartbeat_at = :now
 WHERE id = (SELECT worker_id FROM attempts WHERE lease = :lease);

-- name: stop_worker
UPDATE workers SET state = :state, stopped_at = :now, current_task = NULL
 WHERE id = :worker_id AND state = 'running';

-- name: running_workers
SELECT id, beats FROM workers WHERE state = 'running';

-- ---------------------------------------------------------------- reads for status and report

-- name: status_configs
SELECT c.hash, c.kind, c.lr, c.condition_frames, c.finetune_steps,
       COUNT(t.id) AS total,
       SUM(CASE WHEN t.status = 'pending' THEN 1 ELSE 0 END) AS pending,
       SUM(CASE WHEN t.status = 'running' THEN 1 ELSE 0 END) AS running,
       SUM(CASE WHEN t.status = 'done' THEN 1 ELSE 0 END) AS done,
       SUM(CASE WHEN t.status = 'diverged' THEN 1 ELSE 0 END) AS diverged,
       SUM(CASE WHEN t.status = 'failed' THEN 1 ELSE 0 END) AS failed,
       SUM(CASE WHEN t.status = 'skipped' THEN 1 ELSE 0 END) AS skipped,
       AVG(r.psnr) AS psnr, AVG(r.ssim) AS ssim, AVG(r.lpips) AS lpips,
       SUM(r.wall_s) AS wall_s
  FROM configs AS c
  JOIN tasks AS t ON t.config_hash = c.hash
  LEFT JOIN results AS r ON r.task_id = t.id
 GROUP BY c.hash, c.kind, c.lr, c.condition_frames, c.finetune_steps;

-- name: search_configs
SELECT search, config_hash, name, parameter, value, is_baseline FROM search_configs ORDER BY search, value;

-- name: task_totals
SELECT status, COUNT(*) AS n FROM tasks GROUP BY status;

-- name: largest_unfinished_condition_frames
-- The most conditioning frames of a row still to run, by kind: the row whose memory submit checks.
SELECT t.kind, MAX(c.condition_frames) AS condition_frames
  FROM tasks AS t JOIN configs AS c ON c.hash = t.config_hash
 WHERE t.status IN ('pending', 'running')
 GROUP BY t.kind;

-- name: blocked_tasks
-- Pending rows whose dependency ended without a result (failed for good, or diverged): claim needs
-- it 'done', so they can never run until it is retried. Counting only 'failed' left the rows of a
-- diverged baseline neither claimable, waiting nor blocked, and `submit --local` respawned workers forever.
SELECT COUNT(*) FROM tasks AS t JOIN tasks AS d ON d.id = t.depends_on
 WHERE t.status = 'pending' AND d.status IN ('failed', 'diverged');

-- name: live_workers
SELECT w.id, w.host, w.pid, w.gpu, w.slurm_job_id, w.slurm_array_job_id, w.slurm_array_task_id,
       w.heartbeat_at, w.started_at, w.tasks_done, w.current_task, t.kind AS task_kind, t.video AS task_video
  FROM workers AS w LEFT JOIN tasks AS t ON t.id = w.current_task
 WHERE w.state = 'running'
 ORDER BY w.started_at;

-- name: finished_since
SELECT COUNT(*) AS n, AVG(r.wall_s) AS mean_wall_s, MIN(t.finished_at) AS first_at,
       MIN(t.claimed_at) AS first_claimed_at
  FROM tasks AS t LEFT JOIN results AS r ON r.task_id = t.id
 WHERE t.finished_at >= :since AND t.status IN ('done', 'diverged');

-- name: remaining_estimate
-- Rows still to run: pending or running, but not blocked behind a failed or diverged dependency.
SELECT COALESCE(SUM(t.estimate_s), 0) FROM tasks AS t LEFT JOIN tasks AS d ON d.id = t.depends_on
 WHERE t.status IN ('pending', 'running') AND (d.id IS NULL OR d.status NOT IN ('failed', 'diverged'));

-- name: failed_rows
-- Rows that failed for good, with what they last raised, and the name of their config.
SELECT t.id, t.kind, t.video, t.errors, t.losses, t.error,
       COALESCE((SELECT MIN(sc.name) FROM search_configs AS sc WHERE sc.config_hash = t.config_hash),
                'no_finetune_cf_' || CAST(c.condition_frames AS TEXT)) AS config_name
  FROM tasks AS t JOIN configs AS c ON c.hash = t.config_hash
 WHERE t.status = 'failed'
 ORDER BY t.id LIMIT :limit;

-- name: config_names
SELECT search, name FROM search_configs WHERE config_hash = :config_hash ORDER BY search;

-- name: durations_by_kind
SELECT r.wall_s FROM results AS r JOIN tasks AS t ON t.id = r.task_id
 WHERE t.kind = :kind AND r.wall_s IS NOT NULL
 ORDER BY r.recorded_at DESC LIMIT 200;

-- ---------------------------------------------------------------- report

-- name: report_rows
-- Every task row, once per search holding its config (fine-tune rows) or once with NULL search
-- columns (un-fine-tuned baseline rows), with its video's category and its result if any.
SELECT t.id AS task_id, t.kind, t.status, t.video, t.config_hash,
       c.lr, c.condition_frames, c.finetune_steps,
       v.category, v.path AS video_path,
       sc.search, sc.name, sc.parameter, sc.value, sc.is_baseline,
       r.psnr, r.ssim, r.lpips, r.trivial_psnr, r.trivial_ssim, r.trivial_lpips,
       r.finetune_s, r.inference_s, r.wall_s, r.artifact_dir, r.per_frame,
       d.status AS depends_status, t.estimate_s
  FROM tasks AS t
  JOIN configs AS c ON c.hash = t.config_hash
  JOIN videos AS v ON v.name = t.video
  LEFT JOIN search_configs AS sc ON sc.config_hash = t.config_hash
  LEFT JOIN results AS r ON r.task_id = t.id
  LEFT JOIN tasks AS d ON d.id = t.depends_on
 ORDER BY sc.search, sc.value, t.video, t.id;

-- ---------------------------------------------------------------- sequential stopping (0004)
-- hparray/store/stopping.py: a stopped config's pending rows become 'skipped' (the claim takes
-- 'pending' only) and its decision is kept in `stops`; running and finished rows are never touched.

-- name: skip_pending
UPDATE tasks SET status = 'skipped' WHERE config_hash = :config_hash AND status = 'pending';

-- name: record_stop
INSERT INTO stops (config_hash, search, metric, videos, planned, looks, p_value, window_p_value, boundary,
                   skipped, stopped_at)
VALUES (:config_hash, :search, :metric, :videos, :planned, :looks, :p_value, :window_p_value, :boundary,
        :skipped, :now)
ON CONFLICT (config_hash) DO UPDATE SET search = excluded.search, metric = excluded.metric,
       videos = excluded.videos, planned = excluded.planned, looks = excluded.looks, p_value = excluded.p_value,
       window_p_value = excluded.window_p_value, boundary = excluded.boundary,
       skipped = stops.skipped + excluded.skipped, stopped_at = excluded.stopped_at;

-- name: skipped_configs
SELECT config_hash, COUNT(*) AS n FROM tasks WHERE status = 'skipped' GROUP BY config_hash;

-- name: resume_skipped
UPDATE tasks SET status = 'pending' WHERE status = 'skipped';

-- name: forget_stops
DELETE FROM stops;

-- name: stops
SELECT config_hash, search, metric, videos, planned, looks, p_value, window_p_value, boundary, skipped, stopped_at
  FROM stops ORDER BY stopped_at, config_hash;

-- ---------------------------------------------------------------- slurm
-- hparray/slurm.py: the sweep's job arrays and the Slurm ids of its live workers.

-- name: slurm_submissions
SELECT id, job_id, array_size, throttle, submitted_at, state FROM submissions ORDER BY submitted_at, id;

-- name: slurm_live_workers
-- Workers that have not stopped, with the Slurm task they run in (the reaper asks squeue about it).
SELECT id, started_at, slurm_job_id, slurm_array_job_id, slurm_array_task_id FROM workers
 WHERE state = 'running' AND slurm_job_id IS NOT NULL;

-- name: slurm_cancel_submission
UPDATE submissions SET state = 'cancelled' WHERE job_id = :job_id AND state = 'submitted';

-- ---------------------------------------------------------------- retry and notify (0005)
-- hparray/store/retry.py: `hparray retry` puts failed or diverged rows back to pending with fresh
-- budgets (errors and losses), in one transaction; their attempts stay, and an event says so. Running
-- rows are never touched: every write says which status it expects.

-- name: retry_candidates
-- Every row with each name its config goes by (a fine-tune config once per search holding it).
SELECT t.id, t.kind, t.status, t.video, t.depends_on, t.attempts, t.errors, t.losses, t.error,
       c.condition_frames, sc.search, sc.name
  FROM tasks AS t
  JOIN configs AS c ON c.hash = t.config_hash
  LEFT JOIN search_configs AS sc ON sc.config_hash = t.config_hash
 ORDER BY t.id;

-- name: retry_task
-- `attempts` keeps counting (the next attempt's number follows the last); the budgets start again.
UPDATE tasks
   SET status = 'pending', errors = 0, losses = 0, error = NULL, finished_at = NULL, lease = NULL,
       worker_id = NULL, heartbeat_at = NULL
 WHERE id = :task_id AND status = :status;

-- name: retry_drop_result
-- A diverged row's result (no metrics) makes way for the one its next attempt records.
DELETE FROM results WHERE task_id = :task_id;

-- name: retried_counts
SELECT task_id, COUNT(*) AS n FROM events WHERE kind = 'retried' GROUP BY task_id;

-- hparray/store/notifications.py: the `notify:` command runs once per event, whoever sees it.

-- name: claim_notification
INSERT INTO notifications (key, kind, task_id, sender, sent_at) VALUES (:key, :kind, :task_id, :sender, :now)
ON CONFLICT (key) DO NOTHING;

-- name: sweep_generation
-- Rows and attempts so far: both stand still once nothing is left to run, and grow when rows are
-- planned, retried or resumed and run again, so each completion has its own key.
SELECT (SELECT COUNT(*) FROM tasks) AS tasks, (SELECT COALESCE(MAX(id), 0) FROM attempts) AS attempts;

-- name: sweep_span
SELECT MIN(started_at) AS started_at, MAX(ended_at) AS ended_at FROM attempts;

-- name: notify_row
SELECT t.id, t.kind, t.video, t.status, t.attempts, t.errors, t.losses, t.error,
       COALESCE((SELECT MIN(sc.name) FROM search_configs AS sc WHERE sc.config_hash = t.config_hash),
                'no_finetune_cf_' || CAST(c.condition_frames AS TEXT)) AS config_name
  FROM tasks AS t JOIN configs AS c ON c.hash = t.config_hash
 WHERE t.id = :task_id;
