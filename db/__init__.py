"""The results database: SQLModel tables, the engine factory, migrations and small CRUD functions.

The single source of truth for jobs and results, read by the dashboard and the CLI alike.
SQLite under BOOMERANG_HOME by default; PostgreSQL when DATABASE_URL says so.
"""
