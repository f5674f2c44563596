"""Tiny transformers causal-LM models built from configs (no weights are downloaded), shared
by the integration reviews."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, SEQ = 97, 10
COMMON = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48,
          "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
          "max_position_embeddings": 64}


def make(config_name: str = "LlamaConfig", model_name: str = "LlamaForCausalLM",
         seed: int = 0, **extra):
    """A ``model_name`` in training mode from ``config_name(**COMMON, **extra)`` (``extra``
    may override ``COMMON``), its head scaled by 8: near-uniform logits at init would test
    little."""
    config = getattr(transformers, config_name)(**{**COMMON, **extra})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).train()
    head = model.get_output_embeddings()
    if head is not None:
        with torch.no_grad():
            head.weight.mul_(8.0)
    return model
