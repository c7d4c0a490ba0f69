-- A product's options-file rules (issue 16): limits, reservations, linger, borrowing, idle
-- reclaim and queue priorities, as JSON (allot_core::domain::Options). '{}' is every option off.
ALTER TABLE products ADD COLUMN options TEXT NOT NULL DEFAULT '{}';
