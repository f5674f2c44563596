"""A Hugging Face Trainer run whose causal-LM loss never builds the logits:
one call, crossent.integrations.transformers.patch.  python examples/loop_hf_trainer.py"""
import torch
import transformers

from crossent.integrations.transformers import patch

config = transformers.LlamaConfig(vocab_size=32000, hidden_size=128, intermediate_size=256,
                                  num_hidden_layers=2, num_attention_heads=4)
model = transformers.LlamaForCausalLM(config)  # or AutoModelForCausalLM.from_pretrained(...)
patch(model)  # training loss from the hidden states and lm_head.weight; generate() unchanged

ids = torch.randint(0, config.vocab_size, (16, 64))
data = [{"input_ids": x, "labels": x} for x in ids]  # -100 in labels: not counted
args = transformers.TrainingArguments(
    "out", per_device_train_batch_size=4, gradient_accumulation_steps=4, max_steps=2,
    report_to=[], save_strategy="no", use_cpu=True)
transformers.Trainer(model=model, args=args, train_dataset=data).train()
