"""A tokenizer must not produce ids the model's input embedding does not have (TaskAdapter.check_model).

  token_id_range(tok)   -> ids the tokenizer can produce: max(len(tok), highest id + 1) for transformers
                           tokenizers (added tokens included), `vocab_size` or the encoder size otherwise
  embedding_rows(model) -> (rows, name) of the text input embedding: `get_input_embeddings()` for
                           transformers models, else the smallest nn.Embedding called *word_embeddings /
                           *token_embedding (BLIP's text encoder and decoder, CLIP's token embedding)
  check_vocab(tok, model, source)  an id range larger than the embedding -> BenchError naming both sizes
"""
from __future__ import annotations

from torch import nn

from bench.errors import BenchError

_TEXT_EMBEDDINGS = ("word_embeddings", "token_embedding", "embed_tokens", "wte")


def token_id_range(tok) -> int | None:
    tok = getattr(tok, "tok", tok)          # the tasks' wrappers keep the transformers tokenizer in .tok
    if hasattr(tok, "get_vocab"):
        try:
            vocab = tok.get_vocab()
            return max(len(tok), (max(vocab.values()) + 1) if vocab else 0)
        except (TypeError, ValueError, NotImplementedError):
            pass
    for attr in ("vocab_size", "n_vocab"):
        n = getattr(tok, attr, None)
        if isinstance(n, int):
            return n
    enc = getattr(tok, "encoder", None)
    if isinstance(enc, dict) and enc:
        return max(len(enc), max(v for v in enc.values() if isinstance(v, int)) + 1)
    return None


def embedding_rows(model: nn.Module) -> tuple[int | None, str]:
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        try:
            emb = get()
        except (NotImplementedError, AttributeError):
            emb = None
        if isinstance(emb, nn.Embedding):
            name = next((n for n, m in model.named_modules() if m is emb), "input embedding")
            return emb.num_embeddings, name
    found = [(m.num_embeddings, n) for n, m in model.named_modules()
             if isinstance(m, nn.Embedding) and n.rsplit(".", 1)[-1] in _TEXT_EMBEDDINGS]
    if found:
        return min(found)
    return None, ""


def check_vocab(tok, model: nn.Module, source, what: str = "tokenizer") -> None:
    """BenchError if `tok` can produce ids beyond the rows of the model's text embedding (they would index
    past it: a CUDA assert or an IndexError in the middle of a run)."""
    n_tok = token_id_range(tok)
    rows, name = embedding_rows(model)
    if n_tok is None or rows is None or n_tok <= rows:
        return
    raise BenchError(f"{what} {source} has {n_tok} token ids but the model's input embedding {name} has {rows} rows: "
                     f"ids {rows}..{n_tok - 1} would index past it. Use the tokenizer released with the checkpoint "
                     f"(the same model), or set the card's model_config vocab_size to at least {n_tok} for a model "
                     "trained with this tokenizer.")
