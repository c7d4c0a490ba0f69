-- Token rotation without downtime: after `server rotate-token`, the server's previous token
-- (its salt, to derive it, and its digest, to recognise it) stays valid until
-- previous_token_until (Unix ms) or until the server first presents its new token, whichever
-- comes first. All three are NULL outside a rotation's grace period.
ALTER TABLE servers ADD COLUMN previous_token_hash TEXT;
ALTER TABLE servers ADD COLUMN previous_token_salt TEXT;
ALTER TABLE servers ADD COLUMN previous_token_until BIGINT;
CREATE UNIQUE INDEX servers_previous_token_hash ON servers (previous_token_hash);
