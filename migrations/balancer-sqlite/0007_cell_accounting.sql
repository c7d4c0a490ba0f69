-- Per (server, product) accounting (issue 13): between two samples, the units granted to and
-- released from the cell, the units granted back within the hour of a release from it
-- (ping-pong), and the units its waiting clients asked for that an instant balance could not
-- serve while nothing was free anywhere (true) or while units were free elsewhere (false).
ALTER TABLE usage_samples ADD COLUMN units_granted BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_samples ADD COLUMN units_released BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_samples ADD COLUMN ping_pong_units BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_samples ADD COLUMN unserved_true BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_samples ADD COLUMN unserved_false BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_hourly ADD COLUMN units_granted BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_hourly ADD COLUMN units_released BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_hourly ADD COLUMN ping_pong_units BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_hourly ADD COLUMN unserved_true BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_hourly ADD COLUMN unserved_false BIGINT NOT NULL DEFAULT 0;
