"""Shared pieces of the LangChain integration's tests: documents, a word-overlap retriever, the
LCEL chain under test and a hook on the decoder's ``generate``. Fixtures (``compressor``,
``session``: the core suite's tiny models) come from ``integrations/conftest.py``."""

from __future__ import annotations

import re

import torch
from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import RunnableLambda, RunnableParallel, RunnablePassthrough

from semidyn_rag.testing import CaptureGenerate as Capture  # noqa: F401 (re-exported to the tests)

TEXTS = [
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It was built in 1889.",
    "Mount Everest is Earth's highest mountain above sea level, located in the Mahalangur Himal of the Himalayas.",
    "Photosynthesis is the process by which green plants use sunlight to turn water and carbon dioxide into sugar.",
    "The Great Wall of China is a series of fortifications built across the historical northern borders of China.",
]
PROMPT = ChatPromptTemplate.from_messages([("human", "Context:\n{context}\n\nQuestion: {question}")])


def documents() -> list[Document]:
    return [Document(id=f"doc{i}", page_content=t, metadata={"source": f"doc{i}", "lang": "en", "n": i})
            for i, t in enumerate(TEXTS)]


class WordRetriever(BaseRetriever):
    """The ``k`` documents sharing most words with the query (ties: list order)."""

    docs: list[Document]
    k: int = 2

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        words = set(re.findall(r"\w+", query.lower()))
        ranked = sorted(self.docs, key=lambda d: -len(words & set(re.findall(r"\w+", d.page_content.lower()))))
        return ranked[: self.k]


def format_docs(docs: list[Document]) -> str:
    return "\n\n".join(d.page_content for d in docs)


def rag_chain(retriever, compressor, llm):
    """question -> {"docs": compressed documents, "question", "answer": AIMessage}."""

    def retrieve(q: str):
        return compressor.compress_documents(retriever.invoke(q), q)

    async def aretrieve(q: str):
        return await compressor.acompress_documents(await retriever.ainvoke(q), q)

    inputs = RunnableLambda(lambda x: {"context": format_docs(x["docs"]), "question": x["question"]})
    return RunnableParallel(docs=RunnableLambda(retrieve, afunc=aretrieve), question=RunnablePassthrough()).assign(
        answer=inputs | PROMPT | llm)


def expected_embeds(session, prompt: str, texts: list[str]) -> tuple[torch.Tensor, list]:
    """What the decoder should receive for ``prompt`` holding the compressed ``texts`` (in that
    order): the chat template's token embeddings with each text replaced by its registered
    latents. Derived here from the tokenizer and the embedding table, not from the session."""
    dec = session.compressor.decoder
    spliced = prompt
    for t in texts:
        spliced = spliced.replace(t, dec.placeholder)
    ids = dec.tokenizer(dec.apply_chat(spliced), add_special_tokens=False)["input_ids"]
    contexts = [session.registered(t) for t in texts]
    with torch.no_grad():
        emb = dec.model.get_input_embeddings()(torch.tensor(ids))
    rows, it = [], iter(contexts)
    for i, tid in enumerate(ids):
        rows.append(next(it).latents.to(emb.dtype) if tid == dec.placeholder_id else emb[i : i + 1])
    assert next(it, None) is None, "a text did not become a placeholder"
    return torch.cat(rows), contexts
