-- Issue 15: who holds what, and force release.
--
-- `checkouts.groups`: the groups a client stated at checkout (a JSON array of strings), shown to
-- operators in `GET /v1/checkouts`; rows written before this migration hold none.
--
-- `revocations`: checkouts an operator force-released (`POST /v1/checkouts/{id}/revoke`). The
-- checkout's row is deleted in the same transaction; this row makes the holder's next heartbeat
-- or checkin answer `410 license_revoked` (with the reason) even after a restart. Rows older than
-- seven days (the longest staleout) are forgotten at start.

ALTER TABLE checkouts ADD COLUMN groups TEXT NOT NULL DEFAULT '[]';

CREATE TABLE revocations (
    -- 32 lowercase hex digits, as in `checkouts`
    handle     TEXT    PRIMARY KEY NOT NULL CHECK (length(handle) = 32),
    product    TEXT    NOT NULL,
    revoked_ms INTEGER NOT NULL CHECK (revoked_ms >= 0),
    reason     TEXT    NOT NULL
) STRICT;
