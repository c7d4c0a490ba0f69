-- Small durable settings of the metering server, one row each. Used for the balancer lease:
-- `lease_until_ms` (new checkouts are granted only before it) and `last_sync_ms` (when the last
-- successful sync with the balancer was sent), so a restart within the lease keeps granting and
-- an expired lease can say since when the balancer has been unreachable.

CREATE TABLE settings (
    key   TEXT    PRIMARY KEY NOT NULL,
    value INTEGER NOT NULL CHECK (value >= 0)
) STRICT;
