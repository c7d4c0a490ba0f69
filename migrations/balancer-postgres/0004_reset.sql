-- A lost server's units were reclaimed: until it shows that it adopted the books' allocations,
-- every sync tells it to (a lost answer must not leave it holding reclaimed units).
ALTER TABLE servers ADD COLUMN needs_reset BIGINT NOT NULL DEFAULT 0;
