-- busway transactional outbox for MariaDB (>= 10.6) and MySQL (>= 8.0): both have
-- SELECT ... FOR UPDATE SKIP LOCKED, so several busway daemons can share the outbox.
--
-- Ids must never be reused (the Nats-Msg-Id is "<source>:<table>:<id>"): InnoDB keeps its
-- AUTO_INCREMENT counter across restarts since MariaDB 10.2.4 / MySQL 8.0.
CREATE TABLE IF NOT EXISTS busway_outbox (
    id           BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    subject      VARCHAR(255)    NOT NULL,
    headers      JSON            NULL,           -- {"name": "value"}
    payload      LONGBLOB        NOT NULL,       -- published byte for byte (JSON text, usually)
    created_at   TIMESTAMP(6)    NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    published_at TIMESTAMP(6)    NULL DEFAULT NULL,   -- set by on_publish = "mark"
    KEY busway_outbox_unpublished (published_at, id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

-- The application, in its own transaction:
--   INSERT INTO busway_outbox (subject, headers, payload)
--   VALUES ('orders.created', '{"Busway-Tenant": "acme"}', '{"id": 42, "total": "99.50"}');
