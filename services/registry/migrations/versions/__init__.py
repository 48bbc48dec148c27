"""Alembic revisions, one file each, with upgrade and downgrade."""
