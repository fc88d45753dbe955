"""Fixtures for the integrations' tests: the core suite's tiny models, MiniLM, a small index."""

import pytest
from llama_index.core import Document, StorageContext, VectorStoreIndex
from llama_index.embeddings.huggingface import HuggingFaceEmbedding

from semidyn_rag.embedded import minilm_path
from semidyn_rag.session import CompressionSession
from semidyn_rag.store import LatentStore
from tests.conftest import TEXTS, compressor, make_compressor, tiny_config, tiny_dirs  # noqa: F401

DOCS = [
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It was built in 1889.",
    "Mount Everest is Earth's highest mountain above sea level, located in the Mahalangur Himal of the Himalayas.",
    "Photosynthesis is the process by which green plants use sunlight to turn water and carbon dioxide into sugar.",
    "The Great Wall of China is a series of fortifications built across the historical northern borders of China.",
]


@pytest.fixture(scope="session")
def embed_model():
    return HuggingFaceEmbedding(model_name=str(minilm_path()), device="cpu")


@pytest.fixture
def session(compressor, tmp_path):  # noqa: F811 (a fixture argument, not a redefinition)
    with LatentStore(tmp_path / "latents.sqlite") as store:
        yield CompressionSession(compressor, store)


def build_index(embed_model, faiss_store=False):
    """A small VectorStoreIndex over DOCS (in-memory vectors, or a FAISS vector store)."""
    docs = [Document(text=t, metadata={"source": f"doc{i}", "lang": "en"}, id_=f"doc{i}") for i, t in enumerate(DOCS)]
    if faiss_store:
        import faiss
        from llama_index.vector_stores.faiss import FaissVectorStore

        store = FaissVectorStore(faiss_index=faiss.IndexFlatIP(384))
        ctx = StorageContext.from_defaults(vector_store=store)
        return VectorStoreIndex.from_documents(docs, storage_context=ctx, embed_model=embed_model)
    return VectorStoreIndex.from_documents(docs, embed_model=embed_model)
