"""Memory-bounded response losses: chunked (logits in) and fused (hidden states and lm_head weights in)."""

from llmkd.losses.kernels.chunked import chunked_logit_loss, fused_logit_distillation

__all__ = ["chunked_logit_loss", "fused_logit_distillation"]
