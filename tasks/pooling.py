"""Mean-pooled sequence classifiers for the project's decoder-only models (finetune.pooling: mean).

transformers' LlamaForSequenceClassification and GPT2ForSequenceClassification read the class out at the
last non-pad token. These read it out from the mean of the final hidden states over the example's real
tokens (attention_mask): every position of a short snippet speaks. In bench/finetune.py (README) that
beat the last token at vocabulary 1024 and tied it on val at 4096, with less spread across seeds. Same
weights and head (`score`, no bias) as the last-token classes: only the read-out differs.

This file is self-contained (torch and transformers only) because a saved model carries it: the classes
are registered for AutoModelForSequenceClassification, so save_pretrained copies this file next to the
weights and records it in config.json's auto_map, and anyone can load the model with
`AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True)`. Without
trust_remote_code, transformers would load the last-token class instead: same weights, wrong read-out.
"""

from __future__ import annotations

import torch
from transformers import GPT2ForSequenceClassification, LlamaForSequenceClassification
from transformers.modeling_outputs import SequenceClassifierOutputWithPast


class MeanPooledMixin:
    """forward() of a *ForSequenceClassification model with the last-token read-out replaced by the mean."""

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs) -> SequenceClassifierOutputWithPast:
        kwargs.pop("use_cache", None)  # nothing is generated: no cache to keep
        body = getattr(self, self.base_model_prefix)
        hidden = body(input_ids, attention_mask=attention_mask, use_cache=False, **kwargs).last_hidden_state
        if attention_mask is None:  # no padding in the batch: every position is real
            attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        real = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * real).sum(dim=1) / real.sum(dim=1).clamp(min=1.0)
        logits = self.score(pooled)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=logits, config=self.config)
        return SequenceClassifierOutputWithPast(loss=loss, logits=logits)


class LlamaMeanPooledForSequenceClassification(MeanPooledMixin, LlamaForSequenceClassification):
    pass


class GPT2MeanPooledForSequenceClassification(MeanPooledMixin, GPT2ForSequenceClassification):
    pass


MEAN_POOLED = {  # model_type -> class
    "llama": LlamaMeanPooledForSequenceClassification,
    "gpt2": GPT2MeanPooledForSequenceClassification,
}
for _cls in MEAN_POOLED.values():
    _cls.register_for_auto_class("AutoModelForSequenceClassification")
