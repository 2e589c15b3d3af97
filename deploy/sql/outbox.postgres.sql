-- busway transactional outbox for PostgreSQL (>= 11). The application inserts a row in the same
-- transaction as its business change; a busway `postgres` source in `mode = "outbox"` publishes it
-- and deletes it (or sets published_at, with on_publish = "mark") after JetStream stored it.
--
-- Ids must never be reused: a message's Nats-Msg-Id is "<source>:<table>:<id>", and a reused
-- id inside the stream's duplicate_window would be dropped as a duplicate. Identity columns
-- never reuse.
CREATE TABLE IF NOT EXISTS busway_outbox (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    subject      text        NOT NULL,          -- with `subject = "{subject}"` in the source
    headers      jsonb,                         -- {"name": "value"}; a Nats-Msg-Id here wins
    payload      jsonb       NOT NULL,          -- or bytea / text: published byte for byte
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz                    -- set by on_publish = "mark"
);

-- Only needed with on_publish = "mark": claims read the unpublished rows in id order.
CREATE INDEX IF NOT EXISTS busway_outbox_unpublished
    ON busway_outbox (id) WHERE published_at IS NULL;

-- Optional: wake the source at once (notify_channel = "busway_outbox"); polling stays the
-- safety net if a notification is missed.
CREATE OR REPLACE FUNCTION busway_outbox_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('busway_outbox', '');
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS busway_outbox_notify ON busway_outbox;
CREATE TRIGGER busway_outbox_notify
    AFTER INSERT ON busway_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION busway_outbox_notify();

-- The application, in its own transaction:
--   INSERT INTO busway_outbox (subject, headers, payload)
--   VALUES ('orders.created', '{"Busway-Tenant": "acme"}', '{"id": 42, "total": "99.50"}');
