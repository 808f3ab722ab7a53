"""Downstream accuracy during pretraining: a local multiple-choice task scored every train.downstream_every
steps, as the LLaMA paper follows its benchmarks through training (Touvron et al. 2023, Sec. 3 and Fig. 2,
"Evolution of performance on question answering and common sense reasoning during training").

The task file is checked and its data read once, when the run starts; each evaluation runs lm-eval's
evaluator (`lm_eval.evaluator.evaluate`) over the live model through `LlamaPtLM`, so the numbers are those
`python -m llama_pt.pretrained eval` gives for a checkpoint of the same step.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from lm_eval.defaults import DEFAULT_OTHER_SEED
from lm_eval.evaluator import evaluate
from lm_eval.tasks import TaskManager

from ..tokenizer import Tokenizer
from .harness import LlamaPtLM
from .tasks import TaskFileError, load_task_file, shipped_tasks


class DownstreamTask:
    """`spec`: a task file, or the name of one shipped in data/eval/; it must be a multiple_choice task."""

    def __init__(self, spec: str, tokenizer: Tokenizer, batch_size: int):
        shipped = shipped_tasks()
        path = shipped.get(spec, Path(spec))
        if not path.is_file():
            raise TaskFileError(f"train.downstream_task={spec}: neither a task file nor a task of data/eval/ "
                                f"({', '.join(shipped)}); lm-eval's own tasks read hub data, not run in the loop")
        cfg = load_task_file(path)
        if cfg["output_type"] != "multiple_choice":
            raise TaskFileError(f"{path}: output_type={cfg['output_type']!r}; train.downstream_task needs a "
                                "multiple_choice task (its acc and acc_norm are logged)")
        self.name = cfg["task"]
        self.tasks = TaskManager(include_defaults=False).load([cfg])
        self.task = self.tasks["tasks"][self.name]
        if self.task.get_config("num_fewshot") is None:
            self.task.set_config(key="num_fewshot", value=0)  # as lm_eval.simple_evaluate does
        self.tokenizer, self.batch_size = tokenizer, batch_size
        logging.getLogger("lm_eval").setLevel(logging.WARNING)  # not two INFO lines per evaluation in the run's log

    def evaluate(self, model: torch.nn.Module, pad_multiple: int = 1) -> dict[str, float]:
        """The task's metrics (acc, acc_norm) over all its items as {"downstream_acc": ..., ...}; few-shot
        examples, if the task has any, drawn as lm_eval.simple_evaluate draws them (the same seed each time)."""
        self.task.set_fewshot_seed(seed=DEFAULT_OTHER_SEED)
        lm = LlamaPtLM(model, self.tokenizer, self.batch_size, pad_multiple=pad_multiple, progress=False)
        results = evaluate(lm, self.tasks, bootstrap_iters=0, log_samples=False)
        return {f"downstream_{key.split(',')[0]}": float(value)
                for key, value in results["results"][self.name].items()
                if key.endswith(",none") and "_stderr" not in key}
