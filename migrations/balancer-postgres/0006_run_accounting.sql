-- What each run's accounting found (issue 13): units waiting clients asked for that an instant
-- balance could not serve, while nothing was free anywhere (true) or while units were free
-- elsewhere (false); and units granted back to a server that had released them within the hour.
ALTER TABLE balance_runs ADD COLUMN unserved_true BIGINT NOT NULL DEFAULT 0;
ALTER TABLE balance_runs ADD COLUMN unserved_false BIGINT NOT NULL DEFAULT 0;
ALTER TABLE balance_runs ADD COLUMN ping_pong_units BIGINT NOT NULL DEFAULT 0;
