-- busway transactional outbox for SQLite (>= 3.24). SQLite has one writer at a time: the
-- source claims with BEGIN IMMEDIATE, so daemons sharing the file take turns.
--
-- AUTOINCREMENT matters: without it SQLite may reuse the id of a deleted last row, and the
-- Nats-Msg-Id "<source>:<table>:<id>" would then be dropped as a duplicate inside the
-- duplicate_window.
CREATE TABLE IF NOT EXISTS busway_outbox (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    subject      TEXT NOT NULL,
    headers      TEXT,                          -- JSON object {"name": "value"}
    payload      BLOB NOT NULL,                 -- published byte for byte
    created_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    published_at TEXT                           -- set by on_publish = "mark"
);

CREATE INDEX IF NOT EXISTS busway_outbox_unpublished ON busway_outbox (published_at, id);
