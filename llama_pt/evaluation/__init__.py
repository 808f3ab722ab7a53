"""Evaluation of a model: perplexity (held-out shards in order; the sliding window of strided perplexity), and
the LLaMA paper's downstream evaluation (Touvron et al. 2023, Sec. 3) through EleutherAI's lm-evaluation-harness:

- .perplexity: `evaluate_perplexity` (the trainer's held-out loss), `evaluate_response_loss` (held-out
  instruction examples), `strided_perplexity`;
- .harness: `LlamaPtLM`, a model of ours as an `lm_eval` LM (loglikelihood, rolling, greedy generation);
- .tasks: task files (lm-eval YAML over local JSON, checked before any work), the shipped tasks of
  data/eval/, the paper's suites by name, and running them with `lm_eval.simple_evaluate`;
- .downstream: a local multiple-choice task scored during pretraining (train.downstream_every).

Only .perplexity is imported here: the others import lm_eval (and datasets), which training without
downstream evaluation never needs.
"""
from .perplexity import evaluate_perplexity, evaluate_response_loss, stream_of, strided_perplexity, strided_windows

__all__ = ["evaluate_perplexity", "evaluate_response_loss", "stream_of", "strided_perplexity", "strided_windows"]
