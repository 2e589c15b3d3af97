"""Database adapters: PostgreSQL, MySQL/MariaDB and SQLite sources and sinks."""
