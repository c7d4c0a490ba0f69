-- Usage samples without foreign keys. A run writes one sample per cell: 100,000 rows a run at
-- 1,000 servers x 100 products. On PostgreSQL each row's three foreign-key checks cost more
-- than the row itself (100,000 rows: 1.3 s with them, 0.4 s without), and each check holds a
-- share lock on its product's row until the run's insert commits. The samples name only
-- servers, products and runs that are never deleted (servers and products are retired, not
-- removed), resolved by the writer in the same transaction. Rows and indexes are as before.
CREATE TABLE usage_samples_next (
    run_id            BIGINT NOT NULL,
    server_id         BIGINT NOT NULL,
    product_id        BIGINT NOT NULL,
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
    units_granted     BIGINT NOT NULL DEFAULT 0,
    units_released    BIGINT NOT NULL DEFAULT 0,
    ping_pong_units   BIGINT NOT NULL DEFAULT 0,
    unserved_true     BIGINT NOT NULL DEFAULT 0,
    unserved_false    BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (run_id, server_id, product_id)
);
INSERT INTO usage_samples_next (run_id, server_id, product_id, at, allocation, in_use,
    peak_in_use, checkouts, denials, overdrafts, staleouts, waiting, instant_requests,
    units_granted, units_released, ping_pong_units, unserved_true, unserved_false)
SELECT run_id, server_id, product_id, at, allocation, in_use, peak_in_use, checkouts, denials,
    overdrafts, staleouts, waiting, instant_requests, units_granted, units_released,
    ping_pong_units, unserved_true, unserved_false
FROM usage_samples;
DROP TABLE usage_samples;
ALTER TABLE usage_samples_next RENAME TO usage_samples;
CREATE INDEX usage_samples_at ON usage_samples (at);
CREATE INDEX usage_samples_cell ON usage_samples (server_id, product_id, at);
