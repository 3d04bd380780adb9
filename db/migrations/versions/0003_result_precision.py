"""The precision each result was served in

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06 06:30:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable, no default: results made before this revision were served in a precision nobody recorded.
    with op.batch_alter_table('results', schema=None) as batch_op:
        batch_op.add_column(sa.Column('served_in', sa.String(length=16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('results', schema=None) as batch_op:
        batch_op.drop_column('served_in')
