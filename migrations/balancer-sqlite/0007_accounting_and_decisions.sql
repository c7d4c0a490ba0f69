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

-- Expiry enforced (issue 15): the units of an expired entitlement already taken out of
-- `purchased` (from the reserve, or retired from servers); the entitlement is removed, by
-- `expiry`, once all are.
ALTER TABLE entitlements ADD COLUMN retired BIGINT NOT NULL DEFAULT 0;
CREATE INDEX entitlements_expiring ON entitlements (expires_at) WHERE removed_at IS NULL;

-- Retire moves: an expired entitlement's units leave a server's allocation and the estate.
-- SQLite cannot change a CHECK constraint in place, so the move log is rebuilt, the same way
-- on both backends (nothing references it).
CREATE TABLE moves_new (
    id             TEXT    PRIMARY KEY,
    run_id         BIGINT  REFERENCES balance_runs (id),
    product_id     BIGINT  NOT NULL REFERENCES products (id),
    server_id      BIGINT  NOT NULL REFERENCES servers (id),
    kind           TEXT    NOT NULL CHECK (kind IN ('release', 'grant', 'retire')),
    units          BIGINT  NOT NULL CHECK (units > 0),
    state          TEXT    NOT NULL CHECK (state IN ('planned', 'applied', 'abandoned')),
    -- Units the server confirmed: a release takes only free units and may move fewer.
    applied_units  BIGINT  CHECK (applied_units >= 0 AND applied_units <= units),
    epoch          BIGINT  NOT NULL,
    created_at     BIGINT  NOT NULL,
    updated_at     BIGINT  NOT NULL,
    error          TEXT
);
INSERT INTO moves_new (id, run_id, product_id, server_id, kind, units, state, applied_units,
    epoch, created_at, updated_at, error)
    SELECT id, run_id, product_id, server_id, kind, units, state, applied_units, epoch,
    created_at, updated_at, error FROM moves;
DROP TABLE moves;
ALTER TABLE moves_new RENAME TO moves;
CREATE INDEX moves_unfinished ON moves (state) WHERE state = 'planned';
CREATE INDEX moves_run ON moves (run_id);

-- Usage and denial records (issue 15): every ended checkout and every denial, shipped by the
-- metering servers in batches and stored once by record id; kept for the records' retention
-- (default 400 days). Groups, which a report may group by, in a table of their own.
CREATE TABLE usage_records (
    id          TEXT    PRIMARY KEY,
    server_id   BIGINT  NOT NULL REFERENCES servers (id),
    product_id  BIGINT  NOT NULL REFERENCES products (id),
    user_name   TEXT    NOT NULL,
    host        TEXT    NOT NULL,
    units       BIGINT  NOT NULL CHECK (units > 0),
    started_at  BIGINT  NOT NULL,
    ended_at    BIGINT  NOT NULL,
    ended_by    TEXT    NOT NULL CHECK (ended_by IN ('checkin', 'staleout', 'revoke', 'idle', 'restart')),
    CHECK (ended_at >= started_at)
);
CREATE INDEX usage_records_ended ON usage_records (ended_at);
CREATE INDEX usage_records_product ON usage_records (product_id, ended_at);
CREATE INDEX usage_records_user ON usage_records (user_name, ended_at);
CREATE TABLE denial_records (
    id              TEXT    PRIMARY KEY,
    server_id       BIGINT  NOT NULL REFERENCES servers (id),
    product_id      BIGINT  NOT NULL REFERENCES products (id),
    user_name       TEXT    NOT NULL,
    host            TEXT    NOT NULL,
    at              BIGINT  NOT NULL,
    reason          TEXT    NOT NULL,
    free_elsewhere  BOOLEAN
);
CREATE INDEX denial_records_at ON denial_records (at);
CREATE INDEX denial_records_product ON denial_records (product_id, at);
CREATE TABLE record_groups (
    record_id   TEXT NOT NULL,
    group_name  TEXT NOT NULL,
    PRIMARY KEY (record_id, group_name)
);
