-- The runs still `running`: a takeover closes those whose leadership ended (its epoch no longer
-- held by any shard) in its own transaction, which holds the shard's row; without this index
-- that would scan every run ever recorded (one per instant balance) while writers wait.
CREATE INDEX balance_runs_running ON balance_runs (epoch) WHERE status = 'running';
