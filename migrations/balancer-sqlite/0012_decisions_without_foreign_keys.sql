-- Run decisions without foreign keys, as the usage samples (0011). The first run of an estate,
-- and the first after it, record a decision for every cell: 100,000 rows at 1,000 servers x
-- 100 products, each with three foreign-key checks on PostgreSQL (a trigger, a lookup and a
-- share lock per check: 300,000 of them) that made that write take 6-8 s of the run. The
-- decisions name only runs, servers and products that are never deleted (servers and products
-- are retired, not removed), resolved by the writer in the same transaction. Rows and indexes
-- are as before.
CREATE TABLE run_decisions_next (
    run_id        BIGINT NOT NULL,
    product_id    BIGINT NOT NULL,
    server_id     BIGINT NOT NULL,
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
INSERT INTO run_decisions_next (run_id, product_id, server_id, at, decision, allocation,
    in_use, waiting, min_units, buffer_units, peak_in_use, denials, level, forecast,
    window_peak, held, need, want, fair_share, target)
SELECT run_id, product_id, server_id, at, decision, allocation, in_use, waiting, min_units,
    buffer_units, peak_in_use, denials, level, forecast, window_peak, held, need, want,
    fair_share, target
FROM run_decisions;
DROP TABLE run_decisions;
ALTER TABLE run_decisions_next RENAME TO run_decisions;
CREATE INDEX run_decisions_at ON run_decisions (at);
