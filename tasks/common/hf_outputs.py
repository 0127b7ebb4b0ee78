"""The declared model output (bench.api.ModelOutput) of a transformers model's call, for the token tasks
(GLUE, WikiText-2) whose `forward` methods such as VTrans's distillation read."""
from __future__ import annotations

from bench.api import ModelOutput


def hf_forward(model, inputs: dict, output_hidden_states: bool = False) -> ModelOutput:
    """`model(**inputs)` as a ModelOutput: its logits, and its hidden states when asked for (the flag is passed
    only then, so a plain call is the model's default forward)."""
    out = model(**inputs, **({"output_hidden_states": True} if output_hidden_states else {}))
    return ModelOutput(out.logits, out.hidden_states if output_hidden_states else None)


def token_shape(batch) -> tuple:
    """(samples, tokens) of a token batch's input ids."""
    return tuple(batch["input_ids"].shape[:2])
