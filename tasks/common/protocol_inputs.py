"""Synthetic token inputs of the tasks' FLOPs protocols (`flops_forwards`, `dummy_inputs`), built without data.

  ids_of_length(n_tokens, batch, model_config, device)
                                (input_ids, attention_mask) of `batch` sequences of exactly n_tokens in the
                                model's BERT-style layout ([CLS] ... [SEP], ids from the model config's declared
                                `cls_token_id` / `sep_token_id` / `vocab_size`): a paper protocol that names a
                                sentence counts its length, the ids themselves do not change the count.
  image_batch(model_config, batch_size, device, default_size)
                                (randn(B, C, H, W),) for image models: the size from the model config's
                                `img_size` (int or (H, W)), else the task's own.
"""
from __future__ import annotations

import torch


def ids_of_length(n_tokens: int, batch: int, model_config: dict, device) -> tuple:
    """(input_ids, attention_mask) of `batch` sequences of n_tokens ([CLS] ... [SEP]); the ids themselves do
    not change the count. On `meta` the special ids are not written (meta tensors hold no values)."""
    vocab = model_config["vocab_size"]
    ids = torch.full((batch, n_tokens), 1000 if vocab > 1000 else 7, dtype=torch.long, device=device)
    if device is not None and torch.device(device).type == "meta":
        return ids, torch.ones_like(ids)
    ids[:, 0], ids[:, -1] = model_config["cls_token_id"], model_config["sep_token_id"]
    return ids, torch.ones_like(ids)


def image_batch(model_config: dict, batch_size: int, device, default_size) -> tuple:
    """(randn(B, C, H, W),) for image models: size from the model's img_size (int or (H, W)), else default_size."""
    size = model_config.get("img_size", default_size)
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (torch.randn(batch_size, model_config.get("in_chans", 3), h, w, device=device),)
