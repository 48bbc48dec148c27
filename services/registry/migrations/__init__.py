"""Alembic environment of the registry database (shipped inside the package).

Use `poe registry migrate` (or `alembic -c <this folder>/alembic.ini upgrade head` with
POE_DATABASE_URL set).
"""
