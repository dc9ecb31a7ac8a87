"""The training loop on Hugging Face Accelerate: CPU, one GPU or many (``accelerate launch``; DDP, FSDP2 or
DeepSpeed ZeRO-2 or ZeRO-3, see :mod:`.sharding`).

Data order is a permutation seeded by (seed, epoch); each optimizer step takes the next global batch
(batch_size × processes rows) and rank r takes its slice, so a run resumes at an exact position and
a multi-process run sees the same global batches as a single process with the same global batch.
Adapter draws are seeded by (seed, micro-batch), identical on every rank.
"""

from __future__ import annotations

import dataclasses

import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..data import answer_label_rows, file_records, fit_and_val, load_task, split_files
from ..evaluation import average_log_probs, compute_metrics, write_json_atomic
from ..evaluation.predict import predict_examples
from ..methods import get_method
from ..models import load_base_model
from ..scoring import default_protocol, make_scorer
from ..memory_estimate import estimate_training_memory, numel
from ..peak_memory import PeakMemory
from ..seeding import mix_seed
from ..layout import RunFolder
from .checkpoint import atomic_dir, existing_dir, load_checkpoint, rng_state, save_checkpoint
from .config import TrainConfig, resolve
from .recipes import RECIPES, StepContext
from .sharding import engine_for, held_parameters

__all__ = ["TrainModule", "train", "versions"]


class TrainModule(nn.Module):
    """Model + scorer as one module, so DDP syncs the encoder head's gradients with the adapter's."""

    def __init__(self, method, model: nn.Module, scorer: nn.Module) -> None:
        super().__init__()
        self.method, self.model, self.scorer = method, model, scorer

    def forward(self, batch: dict[str, Any], num_samples: int) -> dict[str, Any]:
        out = self.method.train_outputs(self.model, self.scorer, batch, num_samples)
        return {"log_probs": out.log_probs, "kl_flow": out.kl_flow, "kl_cond": out.kl_cond}

    @property
    def _no_split_modules(self) -> list[str]:
        """What FSDP's transformer-based auto wrap makes a unit each: the model's blocks, then the model
        itself (its embeddings and head), so a forward of the model alone (validation) un-shards them."""
        return [*(getattr(self.model, "_no_split_modules", None) or []), type(self.model).__name__]


def versions() -> dict[str, str]:
    import accelerate, peft, transformers  # noqa: E401

    from .. import __version__

    out = {"bayeslora": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
           "peft": peft.__version__, "accelerate": accelerate.__version__, "python": platform.python_version()}
    try:
        import zuko

        out["zuko"] = zuko.__version__
    except (ImportError, AttributeError):
        pass
    return out


@dataclass
class Position:
    epoch: int = 0
    batch: int = 0  # next global batch within the epoch
    step: int = 0  # optimizer steps so far


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """transformers' non-reentrant block checkpointing (the reentrant kind re-runs the shared posterior
    draw's backward once per block, which the sampler refuses); no KV cache while training."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"--gradient-checkpointing: {type(model).__name__} does not support gradient checkpointing")
    if hasattr(model, "activation_checkpointing_enable"):  # the name transformers uses from 5.2x on
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False


def _limit(examples: list, limit: Optional[int]) -> list:
    return examples if limit is None else examples[:limit]


def _optimizer(cfg: TrainConfig, method, module: TrainModule) -> torch.optim.Optimizer:
    no_decay = {f"model.{n}" for n in method.no_decay_parameters(module.model)}
    lr_factors = {f"model.{n}": f for n, f in method.lr_factors(module.model, cfg.lr).items()}
    lr_factors.update({f"scorer.{n}": cfg.head_lr_factor for n, _ in module.scorer.named_parameters()})
    everything = RECIPES[cfg.recipe].decays_variational
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    keyed: dict[tuple[float, float], list] = {}
    for n, p in params:
        decay = cfg.weight_decay if everything or n not in no_decay else 0.0
        keyed.setdefault((lr_factors.get(n, 1.0), decay), []).append(p)
    # AdamW decays by lr × weight_decay: divide by the factor so a faster group is not decayed harder
    groups = [{"params": ps, "lr": cfg.lr * f, "weight_decay": d / f} for (f, d), ps in keyed.items()]
    # the fused kernel updates every tensor at once (a Bayesian adapter has ~10x LoRA's tensor count)
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for _, p in params)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, fused=fused or None)


def _scheduler(cfg: TrainConfig, optimizer, steps_per_epoch: int, total_steps: int):
    factor = RECIPES[cfg.recipe].lr_factor(cfg, steps_per_epoch, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def run_data_files(cfg: TrainConfig, data_dir: Optional[str] = None) -> dict[str, list[dict[str, Any]]]:
    """The files a run's fit and val rows come from, with their sha256 (as ``config.json`` records them)."""
    data_dir = data_dir or cfg.data_dir
    return {split: file_records(split_files(cfg.task, split, data_dir, file))
            for split, file in (("train", cfg.train_file), ("val", cfg.val_file or cfg.train_file))}


def check_run_data(cfg: TrainConfig, recorded: dict[str, Any], data_dir: Optional[str] = None,
                   where: str = "config.json") -> None:
    """Refuse data whose bytes differ from what the run trained on: its val slice would be other rows than
    the ones it was selected on, so a calibration or a resumed epoch would quietly use other data."""
    now = run_data_files(cfg, data_dir)
    for split, files in recorded.items():
        before = [f["sha256"] for f in files]
        after = now.get(split, [])
        if before != [f["sha256"] for f in after]:
            changed = next((a["path"] for a, b in zip(after, files) if a["sha256"] != b["sha256"]),
                           ", ".join(str(f["path"]) for f in after) or "(none)")
            raise ValueError(f"{changed}: not the {split} data this run trained on (its sha256 differs from the one "
                             f"recorded in {where}); restore its original bytes (if only the data folder moved, pass --data-dir)")


def rehome_run(folder: RunFolder, here: TrainConfig) -> None:
    """Take a run that moved (its folder, or the data folder or files it read) as the same run. Where its
    record still names this folder and data with the bytes it trained on, nothing is touched; otherwise other
    data bytes are refused, naming the file, and ``config.json`` records where its folder and data are now
    (absolute), so resuming, calibrating and scoring it read them there without ``--data-dir``."""
    from ..data.files import default_data_dir
    from .config import LOCATION_ONLY, absolute_path

    config = folder.read_config()
    recorded = config.get("data_files", {})
    try:
        check_run_data(TrainConfig.from_dict(config["train"], str(folder.config)), recorded)
        data_there = True
    except (OSError, ValueError):  # its data folder or files are gone, or hold other bytes there now
        data_there = False
    if data_there and Path(config["train"]["output"]).resolve() == folder.root.resolve():
        return
    check_run_data(here, recorded, where=str(folder.config))
    now = {key: getattr(here, key) for key in LOCATION_ONLY}
    now["output"] = absolute_path(str(folder.root))
    now["data_dir"] = absolute_path(str(here.data_dir or default_data_dir()))
    for key in ("train_file", "val_file"):
        now[key] = now[key] and absolute_path(now[key])
    placed = dataclasses.replace(here, **{key: now[key] for key in ("data_dir", "train_file", "val_file")})
    write_json_atomic(folder.config, {**config, "train": {**config["train"], **now},
                                      "data_files": run_data_files(placed)})  # absolute, as train records them


def fit_and_val_sets(cfg: TrainConfig, data_dir: Optional[str] = None) -> tuple[list, list]:
    """The rows a run fits on and its ``val`` rows (checkpoint selection, post-hoc calibration).

    The seeded val slice carved from train, or ``--val-file``; both cut by ``--max-*-examples``.
    ``data_dir`` overrides the run's recorded one (the data moved).
    """
    data_dir = data_dir or cfg.data_dir
    if cfg.val_file is None:  # fit on train less the seeded val slice, select on the slice
        fit, val = fit_and_val(cfg.task, data_dir, cfg.train_file)
    else:
        fit = load_task(cfg.task, "train", data_dir, cfg.train_file)
        val = load_task(cfg.task, "train", data_dir, cfg.val_file)
    fit, val = _limit(fit, cfg.max_train_examples), _limit(val, cfg.max_val_examples)
    if not val:
        raise ValueError(f"task {cfg.task!r}: the val slice is empty (too few training rows); pass --val-file")
    return fit, val


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False, overwrite: Optional[bool] = None) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.cfg, self.folder = cfg, RunFolder(cfg.output)
        # cpu=True without an accelerator, so a multi-process launch on CPUs takes the gloo backend
        self.acc = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
        if not resume and overwrite is not None:
            self._make_room(overwrite)
        self.engine = engine_for(self.acc)  # how state is spread over ranks: .sharding
        set_seed(cfg.seed)
        self.method = get_method(cfg.method, cfg.method_options)
        self.recipe = RECIPES[cfg.recipe]
        loaded = load_base_model(cfg.model, dtype=cfg.dtype, kind=cfg.model_kind, quantize=cfg.quantize)
        self.kind, self.tokenizer = loaded.kind, loaded.tokenizer
        if cfg.gradient_checkpointing:
            if not self.method.supports_gradient_checkpointing:
                raise ValueError(f"--gradient-checkpointing is not supported by --method {cfg.method}: its "
                                 "backward would recompute blocks with other weights than the forward's")
            enable_gradient_checkpointing(loaded.model)
        protocol = cfg.scoring or default_protocol(loaded.kind)
        # the vocabulary rows a label-scored head reads: a method may restrict its lm_head adapter to them
        answer_rows = answer_label_rows(loaded.tokenizer) if protocol == "labels" else None
        model = self.method.build(loaded.model, {**cfg.lora(), "answer_rows": answer_rows})
        scorer = make_scorer(loaded.kind, model, protocol)
        self.cfg = cfg = dataclasses.replace(cfg, scoring=scorer.protocol)  # recorded as resolved
        self.module = TrainModule(self.method, model, scorer).to(self.acc.device)
        self.collator = scorer.make_collator(self.tokenizer, cfg.max_length)
        self.train_set, self.val_set = fit_and_val_sets(cfg)
        self.global_batch = cfg.batch_size * self.acc.num_processes
        n = len(self.train_set)
        per_epoch = n // self.global_batch if self.acc.num_processes > 1 else math.ceil(n / self.global_batch)
        self.batches_per_epoch = per_epoch
        if per_epoch == 0:
            raise ValueError(f"{n} training examples do not fill one global batch of {self.global_batch}")
        self.steps_per_epoch = math.ceil(per_epoch / cfg.grad_accum)
        self.total_steps = cfg.max_steps or self.steps_per_epoch * cfg.epochs
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self.optimizer = _optimizer(cfg, self.method, self.module)
        self.scheduler = _scheduler(cfg, self.optimizer, self.steps_per_epoch, self.total_steps)
        self.memory = self._estimate_memory()
        self.history: list[dict[str, Any]] = []
        self.position = Position()
        self.engine.before_prepare(self.module, self.optimizer, cfg)
        self.wrapped, self.optimizer = self.acc.prepare(self.module, self.optimizer)
        self.engine.after_prepare(self.module)
        if resume:  # after prepare: FSDP re-keys the optimizer, ZeRO partitions it
            check_run_data(cfg, self.folder.read_config().get("data_files", {}), where=str(self.folder.config))
            if self.acc.is_main_process:  # resumed from a folder or with data that moved: record where they are now
                rehome_run(self.folder, cfg)
            state, weights = load_checkpoint(self.folder.root, self.module,
                                             self.engine.checkpointable(self.module, self.optimizer),
                                             self.scheduler, rank=self.acc.process_index)
            self.engine.after_load(self.module, weights)
            self.position = Position(**state["position"])
            self.history = state["history"]
        if not resume:
            self._write_run_config()

    def _make_room(self, overwrite: bool) -> None:
        """Refuse to train over a run (its old evaluations would sit beside the new adapter); ``overwrite``
        deletes what it wrote first. Every rank looks before any writes (the first write follows
        ``prepare``, which all ranks reach), so all refuse alike; only the main process deletes."""
        found = self.folder.run_entries()
        names = ", ".join(p.name for p in found)
        if found and not self.folder.holds_run():
            raise ValueError(f"--output {self.cfg.output} is not a bayeslora run but has files a run writes ({names}): "
                             "choose another --output (nothing was deleted)")
        if found and not overwrite:
            raise ValueError(f"--output {self.cfg.output} holds a run already ({names}): "
                             "pass --resume to continue it, --overwrite to replace it, or another --output")
        if found and self.acc.is_main_process:
            self.folder.remove_run()
        self.acc.wait_for_everyone()

    def _estimate_memory(self):
        """Printed before training (per process), recorded in config.json: see :mod:`bayeslora.memory_estimate`."""
        cfg = self.cfg
        per_item = 1 if self.module.scorer.protocol == "labels" else max(len(ex.choices) for ex in self.train_set)
        batch = self.collator(self.train_set[:64])  # the longest of the first rows, padded as training pads
        seq = max(t.shape[-1] for t in batch.values() if torch.is_tensor(t) and t.dim() >= 2)
        rows = cfg.batch_size * per_item * cfg.train_samples  # the scorers run S copies of each batch row
        head_positions = self.module.scorer.head_positions(self.module.model, batch)
        estimate = estimate_training_memory(
            self.module.model, rows=rows, seq=seq, train_samples=cfg.train_samples,
            activation_bytes=2 if cfg.mixed_precision in ("bf16", "fp16") else None,
            checkpointing=cfg.gradient_checkpointing, head_positions=head_positions,
            base_shards=self.engine.base_shards, optimizer_shards=self.engine.optimizer_shards)
        self.acc.print(f"{estimate.describe()} (per process; {rows} rows of {seq} tokens, the longest of the "
                       "first 64 training items)")
        return estimate

    # ------------------------------------------------------------------------------ records
    def _write_run_config(self) -> None:
        if not self.acc.is_main_process:
            return
        self.folder.root.mkdir(parents=True, exist_ok=True)
        cfg = self.cfg
        files = run_data_files(cfg)
        write_json_atomic(self.folder.config, {
            "train": cfg.to_dict(), "versions": versions(), "seed": cfg.seed, "data_files": files,
            "model_kind": self.kind, "num_processes": self.acc.num_processes,
            "distributed": self.acc.distributed_type.value, "n_train": len(self.train_set),
            "n_val": len(self.val_set), "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
            "epochs_to_run": self.epochs,  # --max-steps replaces --epochs: the epochs its steps take
            # whole tensors, also where ZeRO-3 partitioned the base as it loaded
            "trainable_parameters": sum(numel(p) for p in self.module.parameters() if p.requires_grad),
            "parameters": sum(numel(p) for p in self.module.parameters()),
            "parameters_held_per_process": held_parameters(self.module),  # less under FSDP and ZeRO-3
            "memory_estimate_bytes": self.memory.to_dict(),
        })

    def _save_adapter(self, epoch: int) -> str:
        name = RunFolder.adapter_name(epoch)

        def write(tmp: Path) -> None:
            self.method.save(self.module.model, tmp)
            self.module.scorer.save(tmp)

        (self.folder.root / name).parent.mkdir(parents=True, exist_ok=True)
        atomic_dir(self.folder.root / name, write)
        return name

    def _select(self) -> None:
        rule = self.cfg.select
        chosen = self.history[-1] if rule == "last" else min(self.history, key=lambda h: h["val"]["nll"])
        write_json_atomic(self.folder.selection,
                          {"rule": rule, "epoch": chosen["epoch"], "adapter": chosen["adapter"]})

    # ------------------------------------------------------------------------------ steps
    def _global_batches(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(mix_seed(self.cfg.seed, epoch))
        order = torch.randperm(len(self.train_set), generator=g).tolist()
        return [order[i * self.global_batch:(i + 1) * self.global_batch] for i in range(self.batches_per_epoch)]

    def _local(self, rows: list[int]) -> dict[str, Any]:
        rank, size = self.acc.process_index, self.acc.num_processes
        per = math.ceil(len(rows) / size)
        mine = rows[rank * per:(rank + 1) * per]
        batch = self.collator([self.train_set[i] for i in mine])
        return {k: v.to(self.acc.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _loss(self, batch: dict[str, Any], epoch: int, step: int):
        out = self.wrapped(batch, self.cfg.train_samples)
        ctx = StepContext(epoch, step, self.steps_per_epoch, self.total_steps, len(self.train_set))
        return self.recipe.loss(out, batch, ctx, self.cfg)

    def _optimizer_step(self, micro_batches: list[list[int]], epoch: int, index: int) -> dict[str, float]:
        logs = {"loss": 0.0, "nll": 0.0, "kl_flow": 0.0, "kl_cond": 0.0}
        total = sum(len(rows) for rows in micro_batches)
        for j, rows in enumerate(micro_batches):
            self.method.before_step(self.module.model, mix_seed(self.cfg.seed, epoch, index + j))
            weight = len(rows) / total  # a short last micro-batch counts by its rows, as in one big batch
            last = j == len(micro_batches) - 1
            with self.engine.no_sync(self.wrapped, last):
                parts = self._loss(self._local(rows), epoch, self.position.step)
                self.engine.backward(parts.loss * weight, last)
            logs["loss"] += float(parts.loss.detach()) * weight
            logs["nll"] += float(parts.nll) * weight
            for key in ("kl_flow", "kl_cond"):
                value = getattr(parts, key)
                logs[key] += 0.0 if value is None else float(value.detach()) * weight
        self.engine.step(self.module, self.wrapped, self.optimizer, self.cfg.max_grad_norm)
        self.scheduler.step()
        self.position.step += 1
        return logs

    def evaluate_val(self) -> dict[str, Any]:
        method, model = self.method, self.module.model
        mode = method.default_mode
        result = predict_examples(method, model, self.module.scorer, self.val_set, self.collator, mode=mode,
                                  samples=self.cfg.samples, batch_size=self.cfg.eval_batch_size,
                                  seed=self.cfg.seed, device=self.acc.device)
        log_p_bar = average_log_probs(result.log_probs.transpose(0, 1), result.mask)
        metrics = compute_metrics(log_p_bar, result.labels, result.mask, kind="log_probs")
        return {**metrics, "mode": mode, "samples": result.log_probs.shape[1]}

    # ------------------------------------------------------------------------------ run
    def fit(self) -> list[dict[str, Any]]:
        from tqdm.auto import tqdm

        cfg, pos = self.cfg, self.position
        bar = tqdm(total=self.total_steps, initial=pos.step, disable=not (cfg.progress and self.acc.is_main_process),
                   desc="train", dynamic_ncols=True)
        self.module.train()
        while pos.step < self.total_steps and pos.epoch < self.epochs:
            batches = self._global_batches(pos.epoch)
            started, first_step, seen = time.perf_counter(), pos.step, 0
            peak = PeakMemory(self.acc.device).start()
            while pos.batch < len(batches) and pos.step < self.total_steps:
                group = batches[pos.batch:pos.batch + cfg.grad_accum]
                logs = self._optimizer_step(group, pos.epoch, pos.batch)
                seen += sum(len(rows) for rows in group)  # global rows, every process's share
                pos.batch += len(group)
                bar.update(1)
                bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items()})
                if cfg.save_steps and pos.step % cfg.save_steps == 0 and pos.batch < len(batches):
                    self._checkpoint()
            self._timing = {"train_seconds": time.perf_counter() - started, "timed_steps": pos.step - first_step,
                            "timed_examples": seen, "peak_memory_bytes": peak.bytes()}
            self._end_epoch(pos.epoch)
            pos.epoch, pos.batch = pos.epoch + 1, 0
            self._checkpoint()
        bar.close()
        return self.history

    def _end_epoch(self, epoch: int) -> None:
        self.method.check_health(self.module.model)  # every rank, before anything is validated or saved
        # a sharded forward is a collective: under FSDP every rank validates (the same rows), rank 0 writes
        val = self.evaluate_val() if self.acc.is_main_process or self.engine.validates_on_every_rank else None
        if self.acc.is_main_process:
            adapter = self._save_adapter(epoch)
            # timing: this epoch's optimizer steps in this process (after a resume, only the steps it ran)
            entry = {"epoch": epoch, "step": self.position.step, "val": val, "adapter": adapter,
                     "posterior": self.method.epoch_stats(self.module.model), **getattr(self, "_timing", {})}
            self.history.append(entry)
            write_json_atomic(self.folder.history, self.history)
            self._select()
            self.acc.print(f"epoch {epoch}: val acc {val['acc']:.4f} ece {val['ece']:.4f} nll {val['nll']:.4f}"
                           f" brier {val['brier']:.4f}")
            for module, values in entry["posterior"].items():
                self.acc.print(f"  {module}: lambda {values['lambda']:.3g} mean sigma_U "
                               f"{values['sigma_u_mean']:.3g} |E[W]| {values['mean_norm']:.3g} "
                               f"|E[W]-W0| {values['deviation_norm']:.3g} "
                               f"(prior draw {values['prior_norm']:.3g})")
        self.acc.wait_for_everyone()
        self.history = _broadcast(self.acc, self.history)

    def _checkpoint(self) -> None:
        states = [rng_state()]
        optimizer_state = self.engine.checkpointable(self.module, self.optimizer).state_dict()  # may gather
        weights = self.engine.trainable_state(self.module)  # (every rank: collectives)
        if self.acc.num_processes > 1:  # every rank's dropout RNG, so a resume replays each one
            from accelerate.utils import gather_object

            states = gather_object(states)
        if self.acc.is_main_process:
            position = {"epoch": self.position.epoch, "batch": self.position.batch, "step": self.position.step}
            save_checkpoint(self.folder.root, weights, optimizer_state, self.scheduler,
                            {"position": position, "history": self.history}, rng_states=states)
        self.acc.wait_for_everyone()


def _broadcast(acc, obj):
    if acc.num_processes == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    holder = [obj]
    broadcast_object_list(holder, from_process=0)
    return holder[0]


def train(cfg: TrainConfig, resume: bool = False, overwrite: Optional[bool] = None) -> list[dict[str, Any]]:
    """Train (or resume) a run; returns the per-epoch history written to ``history.json``.

    ``overwrite``: False refuses an output folder that holds a run, True deletes that run first; None (the
    library's callers, which own their folders: compare, bench, quickstart) trains into it as it is."""
    if resume:
        folder = RunFolder(cfg.output).checkpoint
        if not (existing_dir(folder) / "state.json").exists():
            raise FileNotFoundError(f"{cfg.output}: nothing to resume (no {folder.name}/state.json)")
    return Trainer(resolve(cfg, check_unread=not resume), resume=resume, overwrite=overwrite).fit()
