-- Issue 18: a checkin marks its checkout's row ended here instead of deleting it at once.
--
-- Checkouts end in no particular order, so each checkin's delete landed on a page of its own
-- of `checkouts`: a group commit of 30 checkins wrote about 30 pages to the WAL (and the
-- checkpoint copied them again), against one or two for 30 checkouts, which append. A mark is
-- appended to this table instead (a few hundred to a page), and the writer deletes the marked
-- rows later in row order, many to a page, then the marks up to the last it swept.
-- A checkout is live when its row is in `checkouts` and not marked here.
CREATE TABLE ended (
    seq INTEGER PRIMARY KEY,
    row INTEGER NOT NULL
) STRICT;
