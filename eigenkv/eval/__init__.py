"""Evaluation: perplexity, the KV-GB vs perplexity curve, the budget planner, lm-evaluation-harness tasks
(``eigenkv.eval.tasks``, needs the ``tasks`` extra) and the LoRA recovery curve (``eigenkv.eval.recovery``,
needs the ``finetune`` extra); those two are imported on use, so the optional packages stay optional."""

from eigenkv.eval.perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]
