"""crossent where training code lives.

* :mod:`crossent.integrations.transformers`: ``patch(model)`` makes a Hugging Face causal
  LM (Llama, Mistral, Qwen2/3, Gemma 1/2/3) train with :func:`crossent.torch.linear_cross_entropy`,
  never building the ``(tokens, vocab)`` logits (extra ``crossent[hf]``).
* :mod:`crossent.integrations.conventions`: the "same" cross-entropy as torch, Megatron-LM,
  optax and Keras compute it, and a term-by-term account of why two of them differ.

Nothing here is imported by ``import crossent``; each module imports its framework itself.
"""
