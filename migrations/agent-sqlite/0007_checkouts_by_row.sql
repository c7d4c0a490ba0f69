-- Issue 18: live checkouts are keyed by a row number the store assigns, not by their handle.
--
-- Handles are random 128-bit secrets, so the unique index on them put every checkout's insert,
-- and every checkin's delete, on a random page of the index: a group commit of 31 checkouts
-- wrote about one index page per row. The store now keeps each live checkout's row number in
-- memory (rebuilt from this table at start) and deletes by it; new rows append to the last
-- page of the table. A handle stays unique as the in-memory book already relies on: it is 122
-- random bits from the OS's generator (a UUID v4); the CHECK still holds its shape.
CREATE TABLE checkouts_by_row (
    row               INTEGER PRIMARY KEY,
    -- 32 lowercase hex digits
    handle            TEXT    NOT NULL CHECK (length(handle) = 32),
    product           TEXT    NOT NULL REFERENCES products (name),
    user              TEXT    NOT NULL,
    host              TEXT    NOT NULL,
    -- the shared seat key (per_user_host, per_user), NULL for concurrent seats
    seat              TEXT,
    units             INTEGER NOT NULL CHECK (units > 0),
    overdraft         INTEGER NOT NULL CHECK (overdraft IN (0, 1)),
    created_ms        INTEGER NOT NULL,
    groups            TEXT    NOT NULL DEFAULT '[]',
    borrowed_until_ms INTEGER CHECK (borrowed_until_ms IS NULL OR borrowed_until_ms > 0)
) STRICT;

INSERT INTO checkouts_by_row (row, handle, product, user, host, seat, units, overdraft,
                              created_ms, groups, borrowed_until_ms)
SELECT rowid, handle, product, user, host, seat, units, overdraft, created_ms, groups,
       borrowed_until_ms
FROM checkouts ORDER BY rowid;

DROP TABLE checkouts;
ALTER TABLE checkouts_by_row RENAME TO checkouts;
