-- Borrowing (issue 16): a borrowed checkout is held without heartbeats until it is returned
-- or until this time (Unix ms); NULL for every other checkout.
ALTER TABLE checkouts ADD COLUMN borrowed_until_ms INTEGER CHECK (borrowed_until_ms IS NULL OR borrowed_until_ms > 0);
