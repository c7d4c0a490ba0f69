-- The balancer's books on PostgreSQL (production). Kept in step with balancer-sqlite:
-- same tables, same columns, same constraints; only the dialect differs.
-- Times are Unix epoch milliseconds (BIGINT) in both backends.

CREATE TABLE products (
    id                BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name              TEXT    NOT NULL UNIQUE,
    publisher         TEXT,
    version           TEXT,
    enforcement       TEXT    NOT NULL CHECK (enforcement IN ('hard_stop', 'soft_stop', 'no_stop')),
    seat              TEXT    NOT NULL CHECK (seat IN ('concurrent', 'per_user_host', 'per_user')),
    heartbeat_seconds BIGINT  NOT NULL CHECK (heartbeat_seconds > 0),
    staleout_seconds  BIGINT  NOT NULL CHECK (staleout_seconds >= heartbeat_seconds),
    acl               TEXT    NOT NULL,
    -- The pool: purchased = reserve + in_transit + Σ allocations.units, kept by every transaction.
    purchased         BIGINT  NOT NULL DEFAULT 0 CHECK (purchased >= 0),
    reserve           BIGINT  NOT NULL DEFAULT 0 CHECK (reserve >= 0),
    in_transit        BIGINT  NOT NULL DEFAULT 0 CHECK (in_transit >= 0),
    created_at        BIGINT  NOT NULL
);

CREATE TABLE entitlements (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    product_id  BIGINT  NOT NULL REFERENCES products (id),
    units       BIGINT  NOT NULL CHECK (units > 0),
    expires_at  BIGINT,
    reference   TEXT,
    created_at  BIGINT  NOT NULL,
    created_by  TEXT    NOT NULL,
    removed_at  BIGINT,
    removed_by  TEXT
);
CREATE INDEX entitlements_live ON entitlements (product_id) WHERE removed_at IS NULL;

CREATE TABLE servers (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name          TEXT    NOT NULL,
    url           TEXT    NOT NULL,
    site          TEXT    NOT NULL,
    token_hash    TEXT    NOT NULL,
    state         TEXT    NOT NULL CHECK (state IN ('active', 'draining', 'lost')),
    created_at    BIGINT  NOT NULL,
    last_seen_at  BIGINT,
    removed_at    BIGINT
);
CREATE UNIQUE INDEX servers_live_name ON servers (name) WHERE removed_at IS NULL;
CREATE UNIQUE INDEX servers_token_hash ON servers (token_hash);

CREATE TABLE allocations (
    server_id     BIGINT NOT NULL REFERENCES servers (id),
    product_id    BIGINT NOT NULL REFERENCES products (id),
    units         BIGINT NOT NULL DEFAULT 0 CHECK (units >= 0),
    min_units     BIGINT NOT NULL DEFAULT 0 CHECK (min_units >= 0),
    buffer_units  BIGINT NOT NULL DEFAULT 0 CHECK (buffer_units >= 0),
    generation    BIGINT NOT NULL DEFAULT 0 CHECK (generation >= 0),
    PRIMARY KEY (server_id, product_id)
);
CREATE INDEX allocations_product ON allocations (product_id);

CREATE TABLE balance_runs (
    id                   BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    trigger              TEXT    NOT NULL CHECK (trigger IN ('scheduled', 'instant', 'manual', 'reclaim')),
    status               TEXT    NOT NULL CHECK (status IN ('running', 'ok', 'partial', 'failed')),
    epoch                BIGINT  NOT NULL,
    started_at           BIGINT  NOT NULL,
    finished_at          BIGINT,
    servers_queried      BIGINT  NOT NULL DEFAULT 0,
    servers_unreachable  BIGINT  NOT NULL DEFAULT 0,
    moves                BIGINT  NOT NULL DEFAULT 0,
    units_moved          BIGINT  NOT NULL DEFAULT 0,
    errors               TEXT
);
CREATE INDEX balance_runs_started ON balance_runs (started_at);

-- The move log: written before a move is sent; idempotent by id at the metering server.
CREATE TABLE moves (
    id             TEXT    PRIMARY KEY,
    run_id         BIGINT  REFERENCES balance_runs (id),
    product_id     BIGINT  NOT NULL REFERENCES products (id),
    server_id      BIGINT  NOT NULL REFERENCES servers (id),
    kind           TEXT    NOT NULL CHECK (kind IN ('release', 'grant')),
    units          BIGINT  NOT NULL CHECK (units > 0),
    state          TEXT    NOT NULL CHECK (state IN ('planned', 'applied', 'abandoned')),
    -- Units the server confirmed: a release takes only free units and may move fewer.
    applied_units  BIGINT  CHECK (applied_units >= 0 AND applied_units <= units),
    epoch          BIGINT  NOT NULL,
    created_at     BIGINT  NOT NULL,
    updated_at     BIGINT  NOT NULL,
    error          TEXT
);
CREATE INDEX moves_unfinished ON moves (state) WHERE state = 'planned';
CREATE INDEX moves_run ON moves (run_id);

CREATE TABLE usage_samples (
    run_id            BIGINT NOT NULL REFERENCES balance_runs (id),
    server_id         BIGINT NOT NULL REFERENCES servers (id),
    product_id        BIGINT NOT NULL REFERENCES products (id),
    at                BIGINT NOT NULL,
    allocation        BIGINT NOT NULL,
    in_use            BIGINT NOT NULL,
    peak_in_use       BIGINT NOT NULL,
    checkouts         BIGINT NOT NULL,
    denials           BIGINT NOT NULL,
    overdrafts        BIGINT NOT NULL,
    staleouts         BIGINT NOT NULL,
    waiting           BIGINT NOT NULL,
    instant_requests  BIGINT NOT NULL,
    PRIMARY KEY (run_id, server_id, product_id)
);
CREATE INDEX usage_samples_at ON usage_samples (at);

-- Small named settings: the schedule, the leader epoch.
CREATE TABLE settings (
    key    TEXT PRIMARY KEY,
    value  TEXT NOT NULL
);
INSERT INTO settings (key, value) VALUES ('schedule.cron', '*/15 * * * *');
INSERT INTO settings (key, value) VALUES ('schedule.timezone', 'UTC');
INSERT INTO settings (key, value) VALUES ('leader.epoch', '0');

CREATE TABLE audit_log (
    id      BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at      BIGINT  NOT NULL,
    actor   TEXT    NOT NULL,
    action  TEXT    NOT NULL,
    target  TEXT    NOT NULL,
    before  TEXT,
    after   TEXT
);
