-- Per (server, product) accounting (issue 13): between two samples, the units granted to and
-- released from the cell, the units granted back within the hour of a release from it
-- (ping-pong), and the units its waiting clients asked for that an instant balance could not
-- serve while nothing was free anywhere (true) or while units were free elsewhere (false).
ALTER TABLE usage_samples ADD COLUMN units_granted BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_samples ADD COLUMN units_released BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_samples ADD COLUMN ping_pong_units BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_samples ADD COLUMN unserved_true BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_samples ADD COLUMN unserved_false BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_hourly ADD COLUMN units_granted BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_hourly ADD COLUMN units_released BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_hourly ADD COLUMN ping_pong_units BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_hourly ADD COLUMN unserved_true BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_hourly ADD COLUMN unserved_false BIGINT NOT NULL DEFAULT 0;

-- Why each run did what it did (issue 13): per product, every server the planner did not
-- leave steady — the demand signals it read, want, fair share, target, and the rule that
-- decided the move or the non-move. Kept as long as the raw usage samples.
CREATE TABLE run_decisions (
    run_id        BIGINT NOT NULL REFERENCES balance_runs (id),
    product_id    BIGINT NOT NULL REFERENCES products (id),
    server_id     BIGINT NOT NULL REFERENCES servers (id),
    at            BIGINT NOT NULL,
    decision      TEXT NOT NULL,
    allocation    BIGINT NOT NULL,
    in_use        BIGINT NOT NULL,
    waiting       BIGINT NOT NULL,
    min_units     BIGINT NOT NULL,
    buffer_units  BIGINT NOT NULL,
    peak_in_use   BIGINT NOT NULL,
    denials       BIGINT NOT NULL,
    level         BIGINT NOT NULL,
    forecast      BIGINT NOT NULL,
    window_peak   BIGINT,
    held          BOOLEAN NOT NULL,
    need          BIGINT NOT NULL,
    want          BIGINT NOT NULL,
    fair_share    BIGINT NOT NULL,
    target        BIGINT NOT NULL,
    PRIMARY KEY (run_id, product_id, server_id)
);
CREATE INDEX run_decisions_at ON run_decisions (at);
