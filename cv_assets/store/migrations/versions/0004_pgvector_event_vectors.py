"""PostgreSQL with pgvector: event vectors also in a `vector(512)` column with an HNSW index.

The JSON `embedding` column stays the contract on every backend; on PostgreSQL where the
`vector` extension is available, a trigger copies each 512-d JSON vector into
`embedding_vector` (JSON arrays and pgvector's text form are the same), so no writer needs
to know the column exists, and an HNSW index (cosine) serves nearest-neighbour search.
Elsewhere (SQLite, PostgreSQL without pgvector) this revision changes nothing.

Revision ID: 0004
Revises: 0003
"""

from alembic import op
from sqlalchemy import text

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

DIMENSIONS = 512


def _pgvector_available() -> bool:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return False
    return bind.execute(text("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'")).first() is not None


def upgrade() -> None:
    if not _pgvector_available():
        return
    op.execute("CREATE EXTENSION IF NOT EXISTS vector")
    op.execute(f"ALTER TABLE event_embeddings ADD COLUMN embedding_vector vector({DIMENSIONS})")
    # Vectors of another size (a non-CLIP fallback embedder) keep only their JSON form.
    op.execute(f"""
        CREATE FUNCTION cv_assets_event_vector() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF json_array_length(NEW.embedding::json) = {DIMENSIONS} THEN
                NEW.embedding_vector := NEW.embedding::vector({DIMENSIONS});
            ELSE
                NEW.embedding_vector := NULL;
            END IF;
            RETURN NEW;
        END $$""")
    op.execute("""
        CREATE TRIGGER event_embeddings_vector BEFORE INSERT OR UPDATE OF embedding ON event_embeddings
        FOR EACH ROW EXECUTE FUNCTION cv_assets_event_vector()""")
    op.execute("UPDATE event_embeddings SET embedding = embedding")  # vectors written before this revision
    op.execute("CREATE INDEX ix_event_embeddings_vector_hnsw ON event_embeddings "
               "USING hnsw (embedding_vector vector_cosine_ops)")


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER IF EXISTS event_embeddings_vector ON event_embeddings")
    op.execute("DROP FUNCTION IF EXISTS cv_assets_event_vector()")
    op.execute("DROP INDEX IF EXISTS ix_event_embeddings_vector_hnsw")
    op.execute("ALTER TABLE event_embeddings DROP COLUMN IF EXISTS embedding_vector")
