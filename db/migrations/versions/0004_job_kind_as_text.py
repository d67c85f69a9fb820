"""jobs.kind: the job registry's name as text (was the enum jobkind), so a new kind needs no migration

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06 22:00:00
"""
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

def upgrade() -> None:
    # the enum stored member names (DISTILL); the registry's names are the values (distill)
    if op.get_bind().dialect.name == 'postgresql':
        op.execute("ALTER TABLE jobs ALTER COLUMN kind TYPE VARCHAR USING lower(kind::text)")
        op.execute("DROP TYPE IF EXISTS jobkind")
    else:  # SQLite: VARCHAR has no length limit and the enum made no CHECK constraint; only the values change
        op.execute("UPDATE jobs SET kind = lower(kind)")


def downgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.execute("CREATE TYPE jobkind AS ENUM ('DISTILL', 'EVAL', 'EXPORT')")
        op.execute("ALTER TABLE jobs ALTER COLUMN kind TYPE jobkind USING upper(kind)::jobkind")
    else:
        op.execute("UPDATE jobs SET kind = upper(kind)")
