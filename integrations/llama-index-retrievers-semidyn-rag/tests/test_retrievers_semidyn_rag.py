"""SemiDynamicCorpusRetriever over a real corpus directory, wired into a query engine."""

import json

from conftest import DOCS
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.llms.semidyn_rag import SemiDynamicLLM
from llama_index.postprocessor.semidyn_rag import SemiDynamicCompressPostprocessor
from llama_index.retrievers.semidyn_rag import SemiDynamicCorpusRetriever

from semidyn_rag.corpus import precompress
from semidyn_rag.embedded import minilm_path


def test_corpus_directory_as_retriever_reads_precompressed_latents(compressor, tmp_path, monkeypatch):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"text": t, "n": i}) for i, t in enumerate(DOCS)))
    ckpt = tmp_path / "ckpt"
    compressor.save_pretrained(ckpt)
    precompress(docs, tmp_path / "corpus", compressor, compressor_path=str(ckpt),
                embedder=str(minilm_path()), progress=False)

    retriever = SemiDynamicCorpusRetriever(tmp_path / "corpus", similarity_top_k=2)
    hits = retriever.retrieve("highest mountain")
    assert len(hits) == 2 and "Everest" in hits[0].node.get_content()
    assert hits[0].score >= hits[1].score and hits[0].node.metadata["n"] == 1

    pp = SemiDynamicCompressPostprocessor(store_path=str(tmp_path / "corpus"), min_chunk_tokens=1)
    assert pp.session.compressor.fingerprint == compressor.fingerprint  # the corpus's recorded compressor
    monkeypatch.setattr(pp.session.compressor, "encode",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("precompressed chunks re-encoded")))
    llm = SemiDynamicLLM(session=pp.session, max_new_tokens=4)
    engine = RetrieverQueryEngine.from_args(retriever, llm=llm, node_postprocessors=[pp])
    response = engine.query("Which mountain is the highest?")
    assert all(n.node.metadata["semidyn_cache_hit"] for n in response.source_nodes)
    assert llm.last_usage["latent_slots"] > 0
