-- Usage and denial records (issue 15) waiting for the balancer's acknowledgement: written in
-- the same transaction as the checkin, staleout, revoke or denial they record, deleted once
-- the balancer has stored them (it stores a record id once, so a resend after a crash is safe).
CREATE TABLE outbox (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    id         TEXT    NOT NULL UNIQUE,
    kind       TEXT    NOT NULL CHECK (kind IN ('usage', 'denial')),
    body       TEXT    NOT NULL,
    created_ms INTEGER NOT NULL
) STRICT;
