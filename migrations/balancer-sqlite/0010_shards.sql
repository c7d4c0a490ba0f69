-- Sharding: products are hashed into `COUNT(*)` shards (one row each), and every shard has its
-- own leader and leader epoch. Epochs are drawn from the one counter `settings.leader.epoch`,
-- so an epoch names one leadership of one shard. An estate starts, and an upgraded one goes
-- on, as one shard led as before.
CREATE TABLE leader_shards (
    shard       INTEGER PRIMARY KEY CHECK (shard >= 0),
    epoch       BIGINT  NOT NULL,
    leader_url  TEXT    NOT NULL DEFAULT '',
    taken_at    BIGINT
);
INSERT INTO leader_shards (shard, epoch, leader_url)
SELECT 0, CAST(e.value AS BIGINT),
       COALESCE((SELECT u.value FROM settings u WHERE u.key = 'leader.url'), '')
FROM settings e WHERE e.key = 'leader.epoch';
DELETE FROM settings WHERE key = 'leader.url';
