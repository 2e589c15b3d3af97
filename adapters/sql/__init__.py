"""Database adapters: PostgreSQL, MySQL/MariaDB and SQLite sources and sinks.

One module per engine (`postgres`, `mysql`, `sqlite`) holds its config structs, the only import
of its driver, and the `adapter` its entry point names; everything else is shared:

    _config     the keys every engine has (modes, watermark, columns, key, statement...)
    _dialect    the SQL generated per engine: quoting, placeholders, upserts, claims
    _database   the small interface an engine implements, and how errors are classified
    _poller     incremental mode: rows past the watermark; the watermark after the PubAcks
    _outbox     outbox mode: claim, publish, await PubAcks, delete/mark, commit
    _source     the poll loop: interval, wake-ups (LISTEN/NOTIFY), back-off
    _sink       batched writes in one transaction, bisection down to a refused row
    _types      database values as JSON; watermarks that decode to the same types
    _subject    `subject = "orders.{region}"` templates over a row's columns
    _confirm    awaiting every PubAck of a poll before anything is committed

Nothing here is imported by the engine: a deployment without databases never loads a driver.
"""
