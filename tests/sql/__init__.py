"""Tests of the database adapters against real PostgreSQL, MariaDB and SQLite."""
