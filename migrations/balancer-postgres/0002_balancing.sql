-- Balancing: instant-balance idempotency, the secret behind each server's token, peaks.

-- A server's token is derived from the balancer's key and this per-registration salt, so the
-- balancer can present it to the server without storing the token itself.
ALTER TABLE servers ADD COLUMN token_salt TEXT NOT NULL DEFAULT '';

-- One row per instant-balance request id: a repeat is answered from here and grants nothing.
CREATE TABLE instant_requests (
    id          TEXT    PRIMARY KEY,
    server_id   BIGINT  NOT NULL REFERENCES servers (id),
    product_id  BIGINT  NOT NULL REFERENCES products (id),
    units       BIGINT  NOT NULL CHECK (units > 0),
    granted     BIGINT  NOT NULL CHECK (granted >= 0),
    created_at  BIGINT  NOT NULL
);
CREATE INDEX instant_requests_created ON instant_requests (created_at);
CREATE INDEX usage_samples_cell ON usage_samples (server_id, product_id, at);
