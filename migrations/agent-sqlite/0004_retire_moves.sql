-- Retire moves (issue 15): an expired entitlement's units leave a server's allocation. SQLite
-- cannot change a CHECK constraint in place, so the move log is rebuilt with the new kind.
CREATE TABLE moves_new (
    move_id    TEXT    PRIMARY KEY NOT NULL,
    kind       TEXT    NOT NULL CHECK (kind IN ('release', 'grant', 'retire')),
    product    TEXT    NOT NULL REFERENCES products (name),
    requested  INTEGER NOT NULL CHECK (requested >= 0),
    units      INTEGER NOT NULL CHECK (units >= 0),
    allocation INTEGER NOT NULL CHECK (allocation >= 0),
    generation INTEGER NOT NULL CHECK (generation > 0),
    applied_ms INTEGER NOT NULL
) STRICT;
INSERT INTO moves_new SELECT move_id, kind, product, requested, units, allocation, generation,
    applied_ms FROM moves;
DROP TABLE moves;
ALTER TABLE moves_new RENAME TO moves;
