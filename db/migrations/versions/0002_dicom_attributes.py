"""DICOM attributes of scans, and the count of skipped non-image objects of a job

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-08 09:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

SCAN_COLUMNS = ('study_instance_uid', 'series_instance_uid', 'sop_instance_uid', 'modality', 'series_description')


def upgrade() -> None:
    # Nullable, no defaults: existing rows are not DICOM scans, and adding them is instant.
    with op.batch_alter_table('scans', schema=None) as batch_op:
        for name in SCAN_COLUMNS:
            batch_op.add_column(sa.Column(name, sa.Text(), nullable=True))
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('skipped', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('skipped')
    with op.batch_alter_table('scans', schema=None) as batch_op:
        for name in reversed(SCAN_COLUMNS):
            batch_op.drop_column(name)
