"""The training loop: one optimizer step = gradient accumulation over micro-batches, clipping, AdamW.

Read top to bottom: the Trainer builds its parts, `train_step` is one optimizer step, `fit` runs steps until
the end and decides when to log, evaluate, checkpoint and stop. The parts own everything else: the model
(.model_setup: llama_pt.model made on the meta device, only this rank's pipeline stage materialized, part by
part, each sharded by llama_pt.parallel's plan as it gets its values; adapters, blocks by activation mode; the
initial values those of one process's `Llama` for train.seed whatever the layout), the data (.data_setup: this
data-parallel rank's part of every global batch), the gradient reduction and optimizer step (a data-parallel
engine: all-reduce, or DeepSpeed ZeRO), the schedule (.optim), the arithmetic (.precision), checkpoints and
RNG (.checkpointing), faults (.fault_policy), downstream accuracy (.downstream, lm-eval on a local task every
train.downstream_every steps), reporting (.run_log, global rank 0 only). Resume restores weights, optimizer
moments, the step and the loader counter, so the losses after a restart on the same layout are bitwise those
of an uninterrupted run; checkpoints load at another TP/DP layout too (llama_pt.parallel.checkpoint_layout).

The loss (`train_step`): every target of a pretraining window counts, and each micro-batch's loss is its mean.
Instruction windows (task=sft) count their response tokens only: the loss is the sum over the scored targets
of the GLOBAL batch divided by their number N, so every response token weighs the same however they fall into
micro-batches and data-parallel ranks. The engines average the micro-batch losses over the G micro-batches and
D ranks of a step, so each micro-batch's loss is its sum divided by N / (G D), N counted before the first
forward (one all-reduce over DP). With train.document_mask the model gets each token's document and position
(llama_pt.data.batch: the examples of instruction windows, EOS-separated documents of pretraining windows).

Pipeline parallelism (parallel.pipeline_parallel > 1): the model is this rank's stage, and `train_step` runs
the schedule (llama_pt.parallel.pipeline: GPipe, 1F1B, interleaved 1F1B) instead of the loop over
micro-batches; the loss exists on the last stage, its mean is agreed over PP and DP after the schedule, and a
skipped step discards every stage's gradients (docs/parallelism.md, "Pipeline parallelism").

Faults (docs/fault_tolerance.md): a stop signal (.preemption) ends the loop after the current step
with a checkpoint; a step whose loss or gradient norm is bad is skipped and too many in a row roll the
run back to the last checkpoint; a watchdog thread writes this rank's heartbeat and ends the process if
it waits too long in a collective.
"""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

from ..adapters.apply import apply_peft
from ..config import RunConfig, count_parameters, flops_per_token
from ..config.pipeline import describe_split
from ..data.batch import read_micro_batch, scored_targets
from ..generate import sample_text
from ..model import Llama
from ..ops.documents import document_positions
from ..parallel import CheckpointLayout, PlainDataParallel, full_state_dict, make_loss_fn
from ..parallel.pipeline import StageLink, StageTimeline, run_schedule, schedule_actions
from ..parallel.pipeline.stages import stage_split
from ..tokenizer import Tokenizer
from .checkpointing import CheckpointManager, checkpoint_to_resume, peft_record
from .data_setup import TrainData, build_train_data
from .downstream import build_downstream
from .distributed import DistContext, single_process
from .fault_policy import FaultPolicy
from .metrics import mfu, peak_flops
from .model_setup import build_model
from .optim import build_optimizer, learning_rate
from .precision import Precision, resolve_precision
from .preemption import StopSignals
from .run_log import RunLogger
from .step_guard import StepGuard, TrainingDiverged


def autocast_context(device: torch.device, precision: Precision):
    """bf16 autocast over fp32 master weights (the all-reduce engine); plain fp32 otherwise."""
    if precision.bf16:
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


class Trainer:
    def __init__(self, run: RunConfig, config_dict: dict[str, Any], ctx: Optional[DistContext] = None):
        self.run, self.config_dict = run, config_dict
        self.ctx = ctx or single_process(run)
        self.pstate, self.device = self.ctx.pstate, self.ctx.device
        self.out_dir = Path(run.train.out_dir)
        self.faults = FaultPolicy(run.fault, self.out_dir, self.ctx.env.rank, self.ctx.distributed, self.device)
        try:
            self._build(run)
        except BaseException:
            self.faults.close()
            raise

    def _build(self, run: RunConfig) -> None:
        self.precision = resolve_precision(self.device, run.train.precision)
        self.data: TrainData = build_train_data(run, dp_rank=self.pstate.dp_rank, dp_size=self.pstate.dp_size)
        self.downstream = build_downstream(run, self.data.tokenizer_path)  # its task checked before any step
        self.resume_from = checkpoint_to_resume(self.out_dir / "checkpoints", run.train.resume)
        model = build_model(run, self.pstate, self.device, resuming=self.resume_from is not None)
        self.loss_fn = make_loss_fn(self.pstate)
        self.optimizer = build_optimizer(model, run.optim)
        self.engine = self._build_engine(model)
        self.link = self._stage_link() if self.pstate.pp_size > 1 else None
        self.timeline: Optional[StageTimeline] = None  # this stage's last step (pipeline only)
        self.autocast = contextlib.nullcontext if self.zero else autocast_context(self.device, self.precision)
        self.checkpoints = CheckpointManager(self.out_dir / "checkpoints", self.engine,
                                             lambda: dict(self.model.named_parameters()),
                                             CheckpointLayout(self.pstate, self.device), run.model, run.peft,
                                             run.train.keep_last)
        self.step = 0
        self.stop_signals: Optional[StopSignals] = None
        self.flops_per_token = flops_per_token(run.model, run.train.seq_len)
        self.peak = peak_flops(self.device)
        self.faults.watch_collectives()

    @property
    def zero(self) -> bool:
        """DeepSpeed ZeRO (parallel.zero_stage 1 or 2) once there is a process group; all-reduce otherwise."""
        return self.ctx.distributed and self.run.parallel.zero_stage > 0

    @property
    def model(self) -> torch.nn.Module:
        return self.engine.module

    @property
    def guard(self) -> StepGuard:
        return self.faults.guard

    def _build_engine(self, model: torch.nn.Module):
        t, p = self.run.train, self.run.parallel
        gas = self.run.grad_accumulation_steps(self.pstate.dp_size)
        if self.zero:
            from ..parallel.zero import ZeroDataParallel
            return ZeroDataParallel(model, self.optimizer, self.pstate, t.micro_batch_size, gas,
                                    self.run.optim.grad_clip, bf16=self.precision.bf16)
        return PlainDataParallel(model, self.optimizer, self.pstate, gas, self.run.optim.grad_clip, p.overlap)

    def _stage_link(self) -> StageLink:
        """Transfers to the neighbouring stages: activations [micro-batch, seq (/ t under SP), dim] in the
        model's dtype."""
        t, p = self.run.train, self.pstate
        seq = t.seq_len // p.tp_size if p.config.sequence_parallel and p.tp_size > 1 else t.seq_len
        dtype = next(self.model.parameters()).dtype
        return StageLink(p, (t.micro_batch_size, seq, self.run.model.dim), dtype, self.device)

    # ---- checkpoints ---------------------------------------------------------------------------
    def trainer_state(self) -> dict[str, Any]:
        return {"step": self.step, "loader": self.data.loader.state_dict(), "guard": self.faults.state_dict(),
                "model_config": self.run.model.to_dict(), "peft": peft_record(self.run.peft),
                "config": self.config_dict,
                "layout": {"world_size": self.ctx.env.world_size, "tensor_parallel": self.pstate.tp_size,
                           "data_parallel": self.pstate.dp_size, "pipeline_parallel": self.pstate.pp_size,
                           "zero_stage": self.run.parallel.zero_stage}}

    def save(self) -> Path:
        self.faults.beat(self.step, "checkpoint save")
        return self.checkpoints.save(self.step, self.trainer_state())

    def restore(self, path: Path, verified: bool = False, roll_back: bool = False) -> None:
        """Load a checkpoint; ``verified``: its checksums were just checked (by latest_valid_checkpoint).
        ``roll_back``: weights, optimizer, step and RNG only; the data position and the step guard's window
        stay where they are (the bad batches are not replayed)."""
        self.faults.beat(self.step, "checkpoint load")
        state = self.checkpoints.restore(path, verified)
        self.step = state["step"]
        if not roll_back:
            self.data.loader.load_state_dict(state["loader"])
            if "guard" in state:
                self.faults.load_state_dict(state["guard"])

    def roll_back(self, log: RunLogger) -> None:
        """After fault.max_bad_steps skipped steps in a row: back to the newest valid checkpoint."""
        bad, last_bad = self.faults.bad_in_row, self.step
        self.faults.beat(self.step, "roll-back")
        path = self.checkpoints.latest_valid(log=log.message)
        if path is None:
            raise TrainingDiverged(f"{bad} bad steps in a row up to step {last_bad} (fault.max_bad_steps="
                                   f"{self.run.fault.max_bad_steps}) and no checkpoint in "
                                   f"{self.checkpoints.folder} to roll back to")
        self.faults.rolled_back()
        self.restore(path, verified=True, roll_back=True)
        log.log(self.step, {"rolled_back_from": last_bad, "rolled_back_to": path.name})
        log.message(f"{bad} bad steps in a row up to step {last_bad}: rolled back to {path} (step {self.step}); "
                    f"training goes on with the data after the bad batches")

    # ---- one step ------------------------------------------------------------------------------
    def train_step(self, micro_batches: list[torch.Tensor]) -> dict[str, Any]:
        """One optimizer step over this rank's micro-batches. Returns the global mean loss, lr, grad norm,
        `skipped` (why the update was skipped, or None) and `stop` (all ranks agreed to stop after this
        step because one of them received a stop signal: self.stop_signals)."""
        stop_requested = self.stop_signals is not None and self.stop_signals.requested
        self.model.train()
        normalizer = self._loss_normalizer(micro_batches)
        if self.link is not None:
            skipped, stop, mean_loss = self._pipeline_forward_backward(micro_batches, normalizer, stop_requested)
        else:
            skipped, stop, mean_loss = self._forward_backward(micro_batches, normalizer, stop_requested)
        lr = learning_rate(self.step, self.run.train.steps, self.run.optim)
        self.faults.beat(self.step + 1, "optimizer step")
        grad_norm = self.engine.step(lr)
        self.step += 1
        skipped = self.faults.after_update(mean_loss, grad_norm, skipped)
        return {"loss": mean_loss, "lr": lr, "grad_norm": grad_norm, "skipped": skipped, "stop": stop}

    def _forward_backward(self, micro_batches: list[torch.Tensor], normalizer: Optional[float],
                          stop_requested: bool) -> tuple[Optional[str], bool, float]:
        """Every micro-batch's forward and backward (no pipeline); the skip and stop decisions are taken
        before the last backward, once the global loss is known. Returns (skipped, stop, mean loss)."""
        n = len(micro_batches)
        loss_sum = torch.zeros((), device=self.device)
        skipped, stop, mean_loss = None, False, math.nan
        for i, batch in enumerate(micro_batches):
            self.faults.beat(self.step + 1, f"forward/backward {i + 1}/{n}")
            micro = read_micro_batch(batch.to(self.device, non_blocking=True), self.run.train.document_mask,
                                     self.data.eos_id)
            layout = {} if micro.documents is None else {"positions": document_positions(micro.documents),
                                                         "documents": micro.documents}
            with self.autocast():
                logits = self.engine.forward(micro.inputs, **layout)
            loss = self.loss_fn(logits, micro.targets, scored=micro.scored, normalizer=normalizer)
            loss_sum += loss.detach().float()
            if i == n - 1:  # the global loss is known before the last backward: decide now
                mean_loss = self._global_mean(loss_sum / n)
                skipped, stop = self.faults.decide(self.step + 1, mean_loss, stop_requested)
                if skipped is not None:
                    loss = loss * math.nan  # non-finite gradients: every engine then skips the update
            self.engine.backward(loss, last=i == n - 1)
        return skipped, stop, mean_loss

    def _pipeline_forward_backward(self, micro_batches: list[torch.Tensor], normalizer: Optional[float],
                                   stop_requested: bool) -> tuple[Optional[str], bool, float]:
        """This stage's part of the pipeline schedule over the micro-batches (llama_pt.parallel.pipeline). The
        loss exists on the last stage only; its global mean is agreed over PP and DP after the schedule, and a
        skipped step (a bad loss anywhere) turns every stage's gradients non-finite, so that the global norm
        (summed over the stages) skips the update on all of them."""
        p, cfg, t = self.pstate, self.run.parallel, self.run.train
        micros = [read_micro_batch(b.to(self.device, non_blocking=True), t.document_mask, self.data.eos_id)
                  for b in micro_batches]
        layouts = [{} if mb.documents is None else {"positions": document_positions(mb.documents),
                                                    "documents": mb.documents} for mb in micros]
        m = len(micros)

        def forward(chunk: int, i: int, hidden: Optional[torch.Tensor]) -> torch.Tensor:
            self.faults.beat(self.step + 1, f"pipeline stage {p.pp_rank}: forward {i + 1}/{m} of chunk {chunk}")
            with self.autocast():
                return self.engine.forward(micros[i].inputs, hidden=hidden, chunk=chunk, **layouts[i])

        def loss(i: int, logits: torch.Tensor) -> torch.Tensor:
            return self.loss_fn(logits, micros[i].targets, scored=micros[i].scored, normalizer=normalizer)

        def backward(out: torch.Tensor, grad: Optional[torch.Tensor], last: bool) -> None:
            self.faults.beat(self.step + 1, f"pipeline stage {p.pp_rank}: backward")
            if grad is None:
                self.engine.backward(out, last=last)
            else:
                self.engine.backward_from(out, grad, last=last)

        actions = schedule_actions(cfg.pipeline_schedule, p.pp_size, p.pp_rank, m, cfg.virtual_stages)
        self.timeline = StageTimeline(p.pp_rank)
        self.link.bytes_sent = 0
        losses = run_schedule(actions, p.pp_size, p.pp_rank, cfg.virtual_stages, m, self.link, forward, loss,
                              backward, self.timeline)
        loss_sum = torch.stack(losses).float().sum() if losses else torch.zeros((), device=self.device)
        mean_loss = self._global_mean(loss_sum / m)
        skipped, stop = self.faults.decide(self.step + 1, mean_loss, stop_requested)
        if skipped is not None:
            self.engine.discard_gradients()
        return skipped, stop, mean_loss

    def _loss_normalizer(self, micro_batches: list[torch.Tensor]) -> Optional[float]:
        """N / (G D) for a step whose windows have a loss mask (N: their scored targets over the global batch,
        at least 1), None for pretraining windows (each micro-batch's mean)."""
        if micro_batches[0].dim() == 2:
            return None
        total = torch.tensor(sum(scored_targets(b) for b in micro_batches), dtype=torch.float64, device=self.device)
        if self.pstate.dp_size > 1:
            dist.all_reduce(total, group=self.pstate.dp_group)
        return max(total.item(), 1.0) / (len(micro_batches) * self.pstate.dp_size)

    def _global_mean(self, local_mean: torch.Tensor) -> float:
        """The global batch's mean loss (equal micro-batch counts per data-parallel rank); with a pipeline, the
        last stage's, on every stage (the others contribute zero)."""
        if self.pstate.pp_size > 1:
            dist.all_reduce(local_mean, group=self.pstate.pp_group)
        if self.pstate.dp_size > 1:
            dist.all_reduce(local_mean, group=self.pstate.dp_group)
            local_mean /= self.pstate.dp_size
        return local_mean.item()

    def evaluate(self) -> Optional[dict[str, float]]:
        if self.data.valid is None:
            return None
        return self.data.valid.evaluate(self.model, self.autocast, self.run.train.eval_batches, self.pstate)

    def sample(self) -> Optional[str]:
        """A continuation of train.sample_prompt, by rank 0 (sharded models are gathered into a plain one)."""
        t = self.run.train
        if not t.sample_tokens:
            return None
        model = self.model
        if self.ctx.distributed:
            full = full_state_dict(self.model, self.pstate)  # a collective over TP: every rank takes part
            if not self.ctx.is_coordinator:
                return None
            model = apply_peft(Llama(self.run.model), self.run.peft).to(self.device)
            model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in full.items()})
        tokenizer = Tokenizer(self.data.tokenizer_path)
        return sample_text(model, tokenizer, t.sample_prompt, max_new_tokens=t.sample_tokens, seed=t.seed)

    # ---- the run -------------------------------------------------------------------------------
    def fit(self, resumed_from: Optional[Path] = None, stop: Optional[StopSignals] = None) -> dict[str, Any]:
        """Train until train.steps (or train.exit_interval, or a stop signal); call restore() first to resume."""
        t = self.run.train
        log = RunLogger(self.out_dir, t.steps, self.step, self.config_dict, self.run.logging.get("wandb", {}),
                        enabled=self.ctx.is_coordinator)
        self._log_start(log, resumed_from)
        window = _ThroughputWindow()
        batches: Iterator[list[torch.Tensor]] = iter(self.data.loader)
        self.stop_signals = stop
        stopped_by = ""
        while self.step < t.steps:
            with window.timing():
                metrics = self.train_step(next(batches))
            log.advance()
            skipped, stop_agreed = metrics.pop("skipped"), metrics.pop("stop")
            is_last = self.step == t.steps
            log_due = bool(t.log_every) and (self.step % t.log_every == 0 or is_last)
            if skipped is not None:
                log.message(f"step {self.step} skipped, no update: {skipped}")
                if not log_due or self.faults.should_roll_back:
                    log.log(self.step, {**metrics, "skipped": skipped})
            if self.faults.should_roll_back:
                self.roll_back(log)
                continue
            if log_due:
                log.log(self.step, {**metrics, **self._throughput(window.take()),
                                    **({"skipped": skipped} if skipped is not None else {})})
            if t.eval_every and (self.step % t.eval_every == 0 or is_last):
                self._evaluate_and_log(log)
            if t.downstream_every and (self.step % t.downstream_every == 0 or is_last):
                self._downstream_and_log(log)
            if not is_last and stop_agreed:
                stopped_by = stop.name if stop is not None and stop.requested else "a stop signal on another rank"
            elif not is_last and t.exit_interval and self.step % t.exit_interval == 0:
                stopped_by = f"train.exit_interval={t.exit_interval}"
            if (t.ckpt_every and (self.step % t.ckpt_every == 0 or is_last)) or stopped_by:
                self._save_and_log(log)
            if stopped_by:
                log.message(f"exiting at step {self.step} ({stopped_by}); train.resume=auto continues from here")
                break
        self.faults.beat(self.step, "finished" if not stopped_by else "stopped")
        sample = None if stopped_by else self.sample()
        if sample is not None:
            log.message(f"sample: {sample!r}")
        curve = log.close()
        return {"step": self.step, "loss_curve": curve, "out_dir": self.out_dir, "sample": sample,
                "finished": not stopped_by, "stopped_by": stopped_by}

    def _log_start(self, log: RunLogger, resumed_from: Optional[Path]) -> None:
        t = self.run.train
        log.message(f"model: {count_parameters(self.run.model):,} parameters on {self.device}; "
                    f"{self.run.grad_accumulation_steps(self.pstate.dp_size)} micro-batches of "
                    f"{t.micro_batch_size} per step; {self.precision.name}; {self.describe_layout()}\n"
                    f"data (epochs over {t.steps} steps):\n{self.data.epoch_table}")
        if self.ctx.distributed:
            log.message(f"process groups: {self.pstate.describe()}")
        if self.pstate.pp_size > 1:
            log.message(f"pipeline split ({self.run.parallel.pipeline_schedule}): "
                        f"{describe_split(stage_split(self.pstate), self.pstate.pp_size)}")
        if self.precision.note:
            log.message(self.precision.note)
        if resumed_from is not None:
            log.message(f"resumed from {resumed_from} at step {self.step}")

    def _throughput(self, window: tuple[int, float]) -> dict[str, float]:
        """tokens/s, step time and MFU over the training steps of the window (no evaluation, no checkpoints)."""
        steps, seconds = window
        tps = steps * self.run.train.global_batch_tokens / seconds
        out = {"tokens_per_s": tps, "step_time_s": seconds / steps}
        utilisation = mfu(tps, self.flops_per_token, self.ctx.env.world_size, self.peak)
        if utilisation is not None:
            out["mfu"] = utilisation
        return out

    def _evaluate_and_log(self, log: RunLogger) -> None:
        self.faults.beat(self.step, "evaluation")
        started = time.perf_counter()
        valid = self.evaluate()
        if valid is not None:
            log.log(self.step, {**valid, "eval_s": time.perf_counter() - started})

    def _downstream_and_log(self, log: RunLogger) -> None:
        """Accuracy on train.downstream_task (every rank computes it; rank 0 logs)."""
        self.faults.beat(self.step, "downstream evaluation")
        started = time.perf_counter()
        scores = self.downstream.evaluate(self.model, self.autocast, self.pstate)
        log.log(self.step, {**scores, "downstream_s": time.perf_counter() - started})

    def _save_and_log(self, log: RunLogger) -> None:
        if self.checkpoints.saved_at == self.step:
            return
        started = time.perf_counter()
        path = self.save()
        log.log(self.step, {"ckpt_s": time.perf_counter() - started})
        log.message(f"saved {path}")

    def describe_layout(self) -> str:
        p = self.pstate
        dp = "all-reduce" if not self.zero else f"DeepSpeed ZeRO-{self.run.parallel.zero_stage}"
        pp = f" x PP={p.pp_size} ({p.config.pipeline_schedule})" if p.pp_size > 1 else ""
        return (f"{self.ctx.env.world_size} process(es): TP={p.tp_size}"
                f"{' +SP' if p.config.sequence_parallel and p.tp_size > 1 else ''} x DP={p.dp_size} ({dp}){pp}")

    def close(self) -> None:
        self.engine.close()
        self.faults.close()


class _ThroughputWindow:
    """Steps and seconds spent in training steps since the last `take()`."""

    def __init__(self):
        self.steps, self.seconds = 0, 0.0

    @contextlib.contextmanager
    def timing(self):
        started = time.perf_counter()
        yield
        self.seconds += time.perf_counter() - started
        self.steps += 1

    def take(self) -> tuple[int, float]:
        window = (self.steps, self.seconds)
        self.steps, self.seconds = 0, 0.0
        return window
