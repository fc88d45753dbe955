"""SemiDynamicCompressPostprocessor on real llama-index-core nodes (tiny models)."""

import torch
from conftest import build_index as _index
from llama_index.core.schema import MetadataMode
from llama_index.postprocessor.semidyn_rag import SemiDynamicCompressPostprocessor


def test_nodes_keep_ids_scores_metadata_and_no_tensors(embed_model, session):
    index = _index(embed_model)
    pp = SemiDynamicCompressPostprocessor(session=session, min_chunk_tokens=1)
    retrieved = index.as_retriever(similarity_top_k=2).retrieve("highest mountain")
    out = pp.postprocess_nodes(retrieved)
    assert [n.node.node_id for n in out] == [n.node.node_id for n in retrieved]
    assert [n.score for n in out] == [n.score for n in retrieved]
    for before, after in zip(retrieved, out):
        assert after.node.get_content() == before.node.get_content()
        assert after.node.relationships == before.node.relationships
        assert {k: after.node.metadata[k] for k in before.node.metadata} == before.node.metadata
        assert after.node.metadata["semidyn_compressed"] is True
        assert after.node.metadata["semidyn_n_latents"] >= 1
        # hidden from the LLM and the embedder
        assert "semidyn" not in after.node.get_content(metadata_mode=MetadataMode.LLM)
        assert "semidyn" not in after.node.get_content(metadata_mode=MetadataMode.EMBED)
        assert all(not isinstance(v, torch.Tensor) for v in after.node.metadata.values())
    # the docstore's nodes are untouched and tensor-free
    for node in index.docstore.docs.values():
        assert not any(k.startswith("semidyn") for k in node.metadata)
        assert all(not isinstance(v, torch.Tensor) for v in node.metadata.values())




def test_latent_budget_raises_the_scale(embed_model, session):
    index = _index(embed_model)
    retrieved = index.as_retriever(similarity_top_k=3).retrieve("tower")
    free = SemiDynamicCompressPostprocessor(session=session, min_chunk_tokens=1).postprocess_nodes(retrieved)
    total = sum(n.node.metadata["semidyn_n_latents"] for n in free)
    tight = SemiDynamicCompressPostprocessor(session=session, min_chunk_tokens=1, max_latents=max(3, total // 3))
    out = tight.postprocess_nodes(retrieved)
    used = sum(n.node.metadata.get("semidyn_n_latents", 0) for n in out if n.node.metadata["semidyn_compressed"])
    assert used <= max(3, total // 3)
