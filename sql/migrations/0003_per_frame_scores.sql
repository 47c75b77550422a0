-- 0003: every scored row keeps its metrics frame by frame, so the report can plot them against the
-- frame index and score configs on a common window of frames without running anything again.
-- JSON text: {"first_frame": condition_frames, "psnr": [...], "ssim": [...], "lpips": [...],
-- "trivial_psnr": [...], ...} (the trivial predictor's on un-fine-tuned rows); NULL for rows
-- recorded before 0003 and for diverged rows. The per-row means stay where they were.

ALTER TABLE results ADD COLUMN per_frame TEXT;
