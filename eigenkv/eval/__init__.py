"""Evaluation: perplexity, the KV-GB vs perplexity curve, and the budget planner."""

from eigenkv.eval.perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]
