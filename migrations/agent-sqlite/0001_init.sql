-- The metering server's durable log: products with their allocation, live checkouts, applied
-- moves. In-memory state is rebuilt from these tables at start.

CREATE TABLE products (
    name             TEXT    PRIMARY KEY NOT NULL,
    -- the policy as JSON (allot_core::domain::Policy)
    policy           TEXT    NOT NULL,
    allocation       INTEGER NOT NULL CHECK (allocation >= 0),
    generation       INTEGER NOT NULL CHECK (generation >= 0),
    -- totals since the store was created (allot_core::wire::agent::UsageCounters)
    peak_in_use      INTEGER NOT NULL DEFAULT 0 CHECK (peak_in_use >= 0),
    checkouts        INTEGER NOT NULL DEFAULT 0 CHECK (checkouts >= 0),
    denials          INTEGER NOT NULL DEFAULT 0 CHECK (denials >= 0),
    overdrafts       INTEGER NOT NULL DEFAULT 0 CHECK (overdrafts >= 0),
    staleouts        INTEGER NOT NULL DEFAULT 0 CHECK (staleouts >= 0),
    instant_requests INTEGER NOT NULL DEFAULT 0 CHECK (instant_requests >= 0)
) STRICT;

CREATE TABLE checkouts (
    -- 32 lowercase hex digits
    handle     TEXT    PRIMARY KEY NOT NULL CHECK (length(handle) = 32),
    product    TEXT    NOT NULL REFERENCES products (name),
    user       TEXT    NOT NULL,
    host       TEXT    NOT NULL,
    -- the shared seat key (per_user_host, per_user), NULL for concurrent seats
    seat       TEXT,
    units      INTEGER NOT NULL CHECK (units > 0),
    overdraft  INTEGER NOT NULL CHECK (overdraft IN (0, 1)),
    created_ms INTEGER NOT NULL
) STRICT;

CREATE TABLE moves (
    move_id    TEXT    PRIMARY KEY NOT NULL,
    kind       TEXT    NOT NULL CHECK (kind IN ('release', 'grant')),
    product    TEXT    NOT NULL REFERENCES products (name),
    requested  INTEGER NOT NULL CHECK (requested >= 0),
    units      INTEGER NOT NULL CHECK (units >= 0),
    allocation INTEGER NOT NULL CHECK (allocation >= 0),
    generation INTEGER NOT NULL CHECK (generation > 0),
    applied_ms INTEGER NOT NULL
) STRICT;
