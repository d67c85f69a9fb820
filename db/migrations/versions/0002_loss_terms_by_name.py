"""loss terms by name: step_metrics.terms (JSON) replaces the ce/kl/cosine/mse columns

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 12:00:00
"""
import json

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

OLD_TERMS = ("ce", "kl", "cosine", "mse")


def upgrade() -> None:
    with op.batch_alter_table('step_metrics', schema=None) as batch_op:
        batch_op.add_column(sa.Column('terms', sa.JSON(), nullable=False, server_default='{}'))
    conn = op.get_bind()
    rows = conn.execute(sa.text("SELECT id, ce, kl, cosine, mse FROM step_metrics")).fetchall()
    for row in rows:
        terms = {name: value for name, value in zip(OLD_TERMS, row[1:]) if value}
        conn.execute(sa.text("UPDATE step_metrics SET terms = :terms WHERE id = :id")
                     .bindparams(sa.bindparam("terms", type_=sa.JSON)), {"terms": terms, "id": row[0]})
    with op.batch_alter_table('step_metrics', schema=None) as batch_op:
        for name in OLD_TERMS:
            batch_op.drop_column(name)
    # queued distillations used to store out=null for "a folder of the job's own"; the request now keeps its default
    for job_id, settings in conn.execute(sa.text("SELECT id, settings FROM jobs WHERE kind = 'DISTILL'")).fetchall():
        settings = json.loads(settings) if isinstance(settings, str) else settings
        if settings.get("out") is None:
            settings["out"] = "runs/distill"
            conn.execute(sa.text("UPDATE jobs SET settings = :s WHERE id = :id")
                         .bindparams(sa.bindparam("s", type_=sa.JSON)), {"s": settings, "id": job_id})


def downgrade() -> None:
    with op.batch_alter_table('step_metrics', schema=None) as batch_op:
        for name in OLD_TERMS:
            batch_op.add_column(sa.Column(name, sa.Float(), nullable=False, server_default='0'))
    conn = op.get_bind()
    for row_id, terms in conn.execute(sa.text("SELECT id, terms FROM step_metrics")).fetchall():
        terms = json.loads(terms) if isinstance(terms, str) else terms
        conn.execute(sa.text("UPDATE step_metrics SET ce = :ce, kl = :kl, cosine = :cosine, mse = :mse WHERE id = :id"),
                     {**{name: float(terms.get(name, 0.0)) for name in OLD_TERMS}, "id": row_id})
    with op.batch_alter_table('step_metrics', schema=None) as batch_op:
        batch_op.drop_column('terms')
