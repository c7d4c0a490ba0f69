-- Hourly roll-ups of the usage samples, kept far longer than the raw samples. Each keeps the
-- peak, the sums and the count of what it summarises, so means and totals survive roll-up.
CREATE TABLE usage_hourly (
    server_id         BIGINT NOT NULL REFERENCES servers (id),
    product_id        BIGINT NOT NULL REFERENCES products (id),
    hour              BIGINT NOT NULL,
    samples           BIGINT NOT NULL CHECK (samples > 0),
    allocation_sum    BIGINT NOT NULL,
    allocation_max    BIGINT NOT NULL,
    in_use_sum        BIGINT NOT NULL,
    in_use_max        BIGINT NOT NULL,
    peak_in_use       BIGINT NOT NULL,
    checkouts         BIGINT NOT NULL,
    denials           BIGINT NOT NULL,
    overdrafts        BIGINT NOT NULL,
    staleouts         BIGINT NOT NULL,
    waiting_sum       BIGINT NOT NULL,
    waiting_max       BIGINT NOT NULL,
    instant_requests  BIGINT NOT NULL,
    PRIMARY KEY (server_id, product_id, hour)
);
CREATE INDEX usage_hourly_hour ON usage_hourly (hour);
INSERT INTO settings (key, value) VALUES ('history.rolled_up_to', '0');
