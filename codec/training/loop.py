"""The one training loop shared by every task (Stage C, LoRA, Stage B, ControlNet …).

Per micro-step: the task turns a batch into clean latents ``x0`` and model inputs; the loop
draws t (official: ``1 - U + 0.001``), noises on the cosine schedule (VP scaling), the model
predicts epsilon (or v = a·ε − b·x0 with ``prediction: v``) from ``noise_condition(λ)``, and the loss is the per-sample MSE times the
P2 or adaptive weight, averaged and divided by ``grad_accum_steps``. Every
``grad_accum_steps`` micro-steps: gradient clipping, AdamW, the warm-up schedule, EMA,
logging, checkpoints, previews. All random draws per sample come from :mod:`.rng`, so 1
and N processes with the same global batch compute the same thing, and a resumed run
continues bit-identically.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..diffusion import CosineSchedule, noise_condition, vp_scalers
from ..interrupts import check_interrupted
from . import checkpoint as ckpt
from . import distributed as D
from .config import ConfigError, TrainConfig
from .data import float_images, stream
from .logs import JsonlLog
from .objectives import loss_weight
from .rng import BatchRandom
from .task import Task

StepHook = Callable[[int], None]


class Ema:
    """Official EMA over the trained parameters: every ``every`` updates ``ema ← β·ema + (1−β)·θ``,
    with β = 0 (a copy) until ``start`` updates have passed."""

    def __init__(self, params: dict[str, torch.Tensor], beta: float, start: int, every: int):
        self.shadow = {k: v.detach().clone().float() for k, v in params.items()}
        self.beta, self.start, self.every = beta, start, every

    @torch.no_grad()
    def update(self, params: dict[str, torch.Tensor], step: int) -> None:
        """Move towards ``params`` (called after update ``step``)."""
        if step % self.every:
            return
        beta = self.beta if step > self.start else 0.0
        for k, v in params.items():
            self.shadow[k].mul_(beta).add_(v.detach().float(), alpha=1 - beta)


def _lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    warm, total, kind = cfg.optim.warmup_updates, cfg.max_steps, cfg.optim.schedule

    def factor(step: int) -> float:
        # official GradualWarmupScheduler(multiplier=1): lr·step/warmup, so the first update runs at lr 0
        if warm and step < warm:
            return step / warm
        if kind == "cosine":
            progress = (step - warm) / max(1, total - warm)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0
    return factor


def _trainable(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p for k, p in module.named_parameters() if p.requires_grad}


class Trainer:
    """Runs one task with one config; :meth:`run` trains to ``max_steps`` (resuming when a checkpoint exists)."""

    def __init__(self, task: Task, cfg: TrainConfig, d: D.Dist, dataset: Any, source: str = "config",
                 echo: Callable[[str], None] | None = None):
        self.task, self.cfg, self.d, self.dataset, self.source = task, cfg, d, dataset, source
        self.out = Path(cfg.output_dir)
        self.echo = echo if echo is not None else (lambda s: None)
        self.schedule = CosineSchedule()
        self.loss_weight = loss_weight(cfg.loss_weight)
        self.fsdp = cfg.distributed.strategy == "fsdp" and d.active
        mp = cfg.mixed_precision
        self.autocast = mp == "bf16" or (mp == "auto" and d.device.type == "cuda")
        if self.fsdp and cfg.ema is not None:
            raise ConfigError(f"{source}: ema is not supported with distributed.strategy fsdp; use ddp or drop ema.")
        if self.fsdp and task.save_buffers:
            raise ConfigError(f"{source}: task {task.name} trains BatchNorm statistics, which fsdp does not gather "
                              "here; use distributed.strategy ddp.")

    # ------------------------------------------------------------------ state
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Full (unsharded) trained tensors of the module, on the CPU; collective under FSDP."""
        names = set(self.trainable_names)
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(self.wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            return {k: v for k, v in full.items() if k in names}
        state = {k: v.detach().cpu().clone() for k, v in _trainable(self.module).items()}
        return state | {k: b.detach().cpu().clone() for k, b in self._buffers().items()}

    def _buffers(self) -> dict[str, torch.Tensor]:
        """Buffers saved with the trained tensors (BatchNorm statistics), for tasks with ``save_buffers``."""
        return dict(self.module.named_buffers()) if self.task.save_buffers else {}

    def _load_trainable(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.trainable_names) - set(state)
        if missing:
            raise ConfigError(f"the checkpoint in {ckpt.checkpoint_dir(self.out)} lacks {len(missing)} trained "
                              f"tensor(s) (e.g. {sorted(missing)[0]}); it belongs to another task or model.")
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(self.wrapped, state, options=StateDictOptions(full_state_dict=True, strict=False))
        else:
            with torch.no_grad():
                for k, p in _trainable(self.module).items():
                    p.copy_(state[k].to(p))
                for k, b in self._buffers().items():
                    if k in state:
                        b.copy_(state[k].to(b))

    def _optim_state(self) -> dict[str, Any]:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(self.wrapped, self.optim,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.optim.state_dict()

    def config_record(self) -> dict[str, Any]:
        """The run's whole config as JSON data: the common keys and the task's own section."""
        record = self.cfg.model_dump(mode="json")
        if self.task.section and self.task.options is not None:
            record[self.task.section] = self.task.options.model_dump(mode="json")
        return record

    def _load_optim(self, state: dict[str, Any]) -> None:
        try:
            if self.fsdp:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

                set_optimizer_state_dict(self.wrapped, self.optim, optim_state_dict=state,
                                         options=StateDictOptions(full_state_dict=True))
            else:
                self.optim.load_state_dict(state)
        except (ValueError, KeyError, RuntimeError) as e:
            raise ConfigError(f"{self.source}: the optimiser state in {ckpt.checkpoint_dir(self.out)} does not fit "
                              f"the parameters this run trains ({e}); it was written by another version of "
                              "cascade-codec or for another model. Choose a new output_dir to start over.") from None

    def save(self) -> None:
        """Write the resumable checkpoint (collective; rank 0 writes)."""
        state = self.trainable_state()
        optim = self._optim_state()
        rng = D.gather_objects(_rng_state(), self.d)
        if not self.d.main:
            D.barrier(self.d)
            return
        tmp = ckpt.begin(self.out)
        self.task.export(state, tmp / ckpt.MODEL_FILE)
        if self.ema is not None:
            self.task.export(self.ema.shadow, tmp / ckpt.EMA_FILE)
        trainer = {"optimizer": optim, "scheduler": self.sched.state_dict(),
                   "loss_weight": self.loss_weight.state_dict(), "rng": rng, "world_size": self.d.world_size}
        ckpt.commit(self.out, tmp, trainer, self.pos, self.config_record())
        keep = self.cfg.checkpoint.keep_every
        if keep and self.pos.step % keep == 0:
            self.task.export(state, self.out / f"step_{self.pos.step:07d}.safetensors")
        D.barrier(self.d)

    def _with_defaults(self, saved: dict[str, Any]) -> dict[str, Any]:
        """A saved config record with the fields added to the config since it was written at their defaults, at
        any depth (a checkpoint made before ``prediction`` existed resumes under the default, ``epsilon``; one made
        before ``data.cache``, under ``false``), in the task's section too."""
        common = {k: v for k, v in saved.items() if k != self.task.section}
        try:
            filled = type(self.cfg).model_validate(common).model_dump(mode="json")
            if self.task.section in saved and self.task.section_model is not None:
                filled[self.task.section] = self.task.section_model.model_validate(
                    saved[self.task.section]).model_dump(mode="json")
        except Exception:  # noqa: BLE001 - not valid any more: compare as saved, the differences are reported
            return saved
        return _overlay(filled, saved)

    def resume(self) -> bool:
        """Load the checkpoint if there is one; returns whether training resumes."""
        if not ckpt.exists(self.out):
            return False
        trainer, pos, saved_cfg = ckpt.load(self.out)
        saved_cfg = self._with_defaults(saved_cfg)
        current = self.config_record()
        if self.task.section not in saved_cfg:  # written before task sections were recorded
            current.pop(self.task.section, None)
        changes = ckpt.config_changes(saved_cfg, current)
        if changes:
            raise ConfigError(f"{self.source}: {ckpt.checkpoint_dir(self.out)} was made with a different config "
                              f"({'; '.join(changes[:5])}); restore those values, or choose a new output_dir to "
                              "start over.")
        self._load_trainable(self.task.import_(ckpt.checkpoint_dir(self.out) / ckpt.MODEL_FILE))
        if self.ema is not None:
            self.ema.shadow = {k: v.float().clone()
                               for k, v in self.task.import_(ckpt.checkpoint_dir(self.out) / ckpt.EMA_FILE).items()}
        self._load_optim(trainer["optimizer"])
        self.sched.load_state_dict(trainer["scheduler"])
        self.loss_weight.load_state_dict(trainer["loss_weight"])
        if trainer.get("world_size") == self.d.world_size:
            _set_rng_state(trainer["rng"][self.d.rank])
        else:
            self.echo(f"note: the checkpoint was written by {trainer.get('world_size')} process(es), this run has "
                      f"{self.d.world_size}; dropout random numbers restart (the data order and noise do not change).")
        self.pos = pos
        return True

    # ------------------------------------------------------------------ loop
    def setup(self) -> None:
        """Build the model, wrap it, make the optimiser and schedule."""
        cfg = self.cfg
        if self.d.device.type == "cuda":
            # every update has the same shapes: let cuDNN time its convolution algorithms once and keep the fastest
            torch.backends.cudnn.benchmark = True
        torch.manual_seed(cfg.seed)
        self.module = self.task.build(self.dataset).to(self.d.device)
        self.trainable_names = list(_trainable(self.module))
        if not self.trainable_names:
            raise RuntimeError(f"bug: task {self.task.name} has nothing to train")
        self.wrapped = D.wrap(self.module, self.d, cfg.distributed.strategy)
        params = [p for p in self.wrapped.parameters() if p.requires_grad]
        o = cfg.optim
        # fused: one kernel for all parameters (CPU and CUDA); the per-tensor loop took 0.4 s per update on the
        # mini codec's 6M parameters on two CPU cores
        fused = not self.fsdp and self.d.device.type in ("cpu", "cuda") and all(p.is_floating_point() for p in params)
        self.optim = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
                                       fused=fused or None)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.optim, _lr_lambda(cfg))
        self.params = params
        self.ema = Ema(_trainable(self.module), cfg.ema.beta, cfg.ema.start, cfg.ema.every) if cfg.ema else None
        self.pos = ckpt.Position()
        # dropout inside the model draws from the global generator, one stream per process
        torch.manual_seed(cfg.seed * 1000 + self.d.rank)

    def _micro_step(self, batch: dict[str, Any], sync: bool) -> tuple[torch.Tensor, torch.Tensor]:
        cfg, d = self.cfg, self.d
        n_local = len(next(iter(v for v in batch.values())))
        rand = BatchRandom(cfg.seed, self.pos.micro, range(d.rank * n_local, (d.rank + 1) * n_local))
        if not self.task.diffusion:  # e.g. an autoencoder: the task computes its own per-sample loss
            no_sync = getattr(self.wrapped, "no_sync", None)
            with no_sync() if (no_sync is not None and not sync) else contextlib.nullcontext():
                with torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                    per_sample = self.task.loss(self.wrapped, batch, rand).float()
                (per_sample.mean() / cfg.grad_accum_steps).backward()
            all_loss = D.all_cat(per_sample.detach(), d)
            return all_loss, all_loss
        lo, hi = cfg.t_range
        t = rand.uniform().mul(-1).add(1).mul(hi - lo).add(lo + 0.001).clamp(0.001, 1.0)  # official at (0, 1)
        x0, inputs = self.task.inputs(batch, rand)
        noise = self.task.noise(x0, rand)
        if cfg.offset_noise:
            noise = noise + rand.normal((x0.shape[1], 1, 1)).to(noise) * cfg.offset_noise
        x0, noise = x0.to(d.device), noise.to(d.device)
        logsnr = self.schedule(t).to(d.device)
        a, b = vp_scalers(logsnr)
        noised = x0 * a.view(-1, 1, 1, 1) + noise * b.view(-1, 1, 1, 1)
        no_sync = getattr(self.wrapped, "no_sync", None)
        quiet = no_sync() if (no_sync is not None and not sync) else contextlib.nullcontext()
        with quiet:
            with torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                pred = self.wrapped(noised, noise_condition(logsnr), **inputs)
            target = noise if cfg.prediction == "epsilon" else a.view(-1, 1, 1, 1) * noise - b.view(-1, 1, 1, 1) * x0
            per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=[1, 2, 3])
            weight = self.loss_weight(logsnr)
            loss = (per_sample * weight).mean() / cfg.grad_accum_steps
            loss.backward()
        all_logsnr = D.all_cat(logsnr.detach(), d)
        all_loss = D.all_cat(per_sample.detach(), d)
        self.loss_weight.update(all_logsnr, all_loss)
        return all_loss, D.all_cat((per_sample * weight).detach(), d)

    def _update(self) -> float:
        clip = self.cfg.optim.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(self.params, clip if clip is not None else float("inf"))
        self.optim.step()
        self.sched.step()
        self.optim.zero_grad(set_to_none=True)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)

    def run(self, hook: StepHook | None = None) -> ckpt.Position:
        """Train until ``max_steps`` updates; ``hook(step)`` runs after every update (tests use it)."""
        from ..progress import progress_bar

        cfg, d = self.cfg, self.d
        self.setup()
        resumed = self.resume()
        log = JsonlLog(self.out, self.pos.step if resumed else None, echo=None) if d.main else None
        if d.main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(self.config_record(), indent=1))
            self.echo(f"{'resuming at update ' + str(self.pos.step) if resumed else 'starting'}: task {self.task.name}, "
                      f"{sum(p.numel() for p in _trainable(self.module).values()):,} trained parameters, "
                      f"{d.world_size} process(es), global batch {cfg.batch_size}, output {self.out}")
        accum = cfg.grad_accum_steps
        global_micro = cfg.batch_size // accum
        cfg.micro_batch(d.world_size)
        bar = progress_bar(cfg.max_steps, f"train {self.task.name}", unit="step", initial=self.pos.step,
                           enabled=None if d.main else False)
        window: list[torch.Tensor] = []
        window_w: list[torch.Tensor] = []
        t_last, samples = time.perf_counter(), 0
        self.module.train()
        batches = stream(self.dataset, global_micro, cfg.seed, cfg.data.shuffle, self.pos.epoch, self.pos.batch, d,
                         0 if cfg.data.cache else cfg.data.num_workers, pin_memory=d.device.type == "cuda")
        if self.pos.step < cfg.max_steps:
            for epoch, index, last, batch in batches:
                check_interrupted()  # Ctrl-C stops at the next batch even if its KeyboardInterrupt was lost
                batch = float_images(batch, d.device)
                self.pos.epoch = epoch
                sync = (self.pos.micro + 1) % accum == 0
                losses, weighted = self._micro_step(batch, sync)
                window.append(losses)
                window_w.append(weighted)
                samples += len(losses)
                self.pos.micro += 1
                self.pos.batch = index + 1
                if not sync:
                    if last:
                        self.pos.epoch, self.pos.batch = epoch + 1, 0
                    continue
                grad_norm = self._update()
                self.pos.step += 1
                bar.update(1)
                if self.ema is not None:
                    self.ema.update(_trainable(self.module), self.pos.step)
                step = self.pos.step
                if step % cfg.log.every == 0 or step == cfg.max_steps:
                    now = time.perf_counter()
                    record = {"step": step, "epoch": self.pos.epoch, "loss": float(torch.cat(window).mean()),
                              "loss_weighted": float(torch.cat(window_w).mean()),
                              "lr": self.sched.get_last_lr()[0], "grad_norm": grad_norm,
                              "samples_per_s": samples / max(now - t_last, 1e-9)}
                    if log is not None:
                        log.write(record)
                        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                    window, window_w, t_last, samples = [], [], now, 0
                if step % cfg.checkpoint.save_every == 0 or step == cfg.max_steps:
                    self.save()
                if cfg.preview.every and (step % cfg.preview.every == 0 or step == 1):
                    self._preview(step)
                if hook is not None:
                    hook(step)
                if step >= cfg.max_steps:
                    break
                if last:
                    self.pos.epoch, self.pos.batch = epoch + 1, 0
        bar.close()
        return self.pos

    def _preview(self, step: int) -> None:
        if self.fsdp or not self.d.main:
            return
        module = D.unwrap(self.wrapped)
        module.eval()
        try:
            path = self.task.preview(module, step, self.out / "previews" / f"step_{step:07d}.png")
        finally:
            module.train()
        if path is not None:
            self.echo(f"preview: {path}")


def _overlay(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``base`` with every value of ``top`` put over it, nested dicts merged key by key."""
    out = dict(base)
    for k, v in top.items():
        out[k] = _overlay(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
