"""The training loop shared by the three pretraining tasks: device/DDP setup, bf16 autocast, AdamW,
gradient clipping, optional EMA, atomic checkpoints with exact resume, CSV/TensorBoard logging,
tqdm progress and periodic previews. A task (train_vqgan/train_lmnet/train_linet) supplies the
networks, one ``step(batch)`` and the export into a bundle.
"""

from __future__ import annotations

import abc
import csv
import datetime
import logging
import math
import os
import pickle
import random
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lesiondiffusion.errors import LesionDiffusionError
from lesiondiffusion.io import atomic_path, write_json

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping settings. `lesiondiffusion pretrain` fills batch size, lr, weight decay
    and betas from the preset's recipe (``bundle.preset_training``: paper = the method's AdamW with
    momentum 0.99 and batch 1 per GPU); the defaults here are the tiny preset's."""

    steps: int = 1000
    batch_size: int = 2
    lr: float = 1e-4
    weight_decay: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0             # linear LR warm-up; constant afterwards (so resume never depends on --steps)
    grad_clip: float = 1.0            # max global grad norm; <= 0 disables
    ema_decay: float | None = None    # e.g. 0.999; the EMA weights are the ones exported
    checkpoint_every: int = 100
    log_every: int = 10
    preview_every: int = 250          # also at the end; <= 0: no previews
    num_workers: int = 2
    seed: int = 0
    device: str = "auto"              # auto | cpu | cuda | cuda:N
    amp: bool = True                  # bf16 autocast, CUDA only
    progress: bool = True


# --------------------------------------------------------------------------------------------------
# distributed helpers
# --------------------------------------------------------------------------------------------------


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False          # this process group was created here (and is destroyed here)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1 (env:// init; nccl on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LesionDiffusionError(f"--device {device} requested but CUDA is not available; use --device cpu.")
    if device == "cuda":
        dev = torch.device("cuda", local if world > 1 else torch.cuda.current_device())
    else:
        dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = False
    if world > 1 and not dist.is_initialized():
        # generous timeout: the other ranks wait at a barrier while rank 0 prepares the cache once
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", init_method="env://",
                                timeout=datetime.timedelta(hours=3))
        owns = True
    return DistInfo(rank=rank, world=world, local_rank=local, device=dev, owns_group=owns)


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` that can start part-way through an epoch (exact resume of data order)."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.start = 0

    def set_start(self, start: int) -> None:
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


def _rng_state() -> dict[str, Any]:
    # Plain data only (ints, lists, tensors): checkpoints are read with torch.load(weights_only=True), which
    # refuses numpy arrays and any other pickled object, so a shared checkpoint can never run code.
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [int(version), list(mt), gauss],
             "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                       "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, mt, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in mt), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), int(n["pos"]), int(n["has_gauss"]),
                         float(n["cached_gaussian"])))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------------
# task interface
# --------------------------------------------------------------------------------------------------


class Task(abc.ABC):
    """What a trainer supplies to the engine.

    ``trainable``: name -> module (each wrapped in DDP when distributed, saved in checkpoints);
    ``optim_groups``: optimiser name -> module names it updates; ``frozen``: modules only moved to the
    device. ``step`` computes the losses and calls ``engine.optimize(name, loss)`` per optimiser.
    """

    name = "task"
    trainable: dict[str, nn.Module]
    frozen: dict[str, nn.Module]
    optim_groups: dict[str, list[str]]

    @abc.abstractmethod
    def dataset(self) -> Dataset: ...

    @abc.abstractmethod
    def step(self, batch: dict[str, torch.Tensor], engine: "Engine") -> dict[str, float]: ...

    def preview(self, engine: "Engine", path: Path) -> None:
        """Write a PNG preview (rank 0 only). Optional."""

    def export(self, engine: "Engine") -> None:
        """Write the trained network (EMA weights when enabled) where the user asked. Optional."""


# --------------------------------------------------------------------------------------------------
# engine
# --------------------------------------------------------------------------------------------------


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A run's checkpoint as plain data. ``weights_only=True``: tensors, numbers, strings, lists and dicts
    only, so a checkpoint someone else wrote (or replaced) can never run code when it is loaded."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message opens with advice to re-run torch.load with weights_only=False, the one thing never to
        # do with a checkpoint you do not trust; keep only its line that names what was refused
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        reason = next((ln for ln in lines if not ln.startswith(("Weights only load failed", "Please file an issue",
                                                                "Check the documentation"))), type(exc).__name__)
        raise LesionDiffusionError(
            f"{path} is not a plain-data checkpoint: it holds pickled Python objects that could run code when "
            f"loaded ({reason[:200]}), so it was not loaded. Only resume from checkpoints written by this version "
            "of `lesiondiffusion pretrain` that you trust, or start a new run with another -o folder.") from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise LesionDiffusionError(
            f"{path} cannot be read as a checkpoint ({type(exc).__name__}: {str(exc)[:200]}); it is damaged or not "
            "a checkpoint. Delete it to restart the run from step 0, or start a new run with another -o "
            "folder.") from None
    if not isinstance(state, dict) or not {"task", "step", "world", "models", "rng"} <= set(state):
        raise LesionDiffusionError(f"{path} is not a lesiondiffusion pretraining checkpoint (missing keys); "
                                   "start a new run with another -o folder.")
    return state


class Engine:
    """Runs a ``Task`` for ``cfg.steps`` optimiser steps in ``run_dir`` (checkpoint, metrics, previews)."""

    def __init__(self, task: Task, cfg: TrainConfig, run_dir: str | os.PathLike, dist_info: DistInfo | None = None):
        self.task = task
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.dist = dist_info or setup_distributed(cfg.device)
        self.device = self.dist.device
        self.step = 0
        self.epoch = 0
        for mod in list(task.trainable.values()) + list(task.frozen.values()):
            mod.to(self.device)
        for mod in task.frozen.values():
            mod.eval()
            mod.requires_grad_(False)
        # DDP wrappers are what forward passes use; `raw` gives the plain module for saving/EMA
        self.models: dict[str, nn.Module] = {}
        for name, mod in task.trainable.items():
            if self.dist.enabled:
                ids = [self.device.index] if self.device.type == "cuda" else None
                self.models[name] = nn.parallel.DistributedDataParallel(mod, device_ids=ids)
            else:
                self.models[name] = mod
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler] = {}
        warm = max(0, cfg.warmup_steps)
        for oname, mnames in task.optim_groups.items():
            params = [p for m in mnames for p in task.trainable[m].parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas)
            self.optimizers[oname] = opt
            self.schedulers[oname] = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s, w=warm: min(1.0, (s + 1) / w) if w > 0 else 1.0)
        self.ema: dict[str, torch.optim.swa_utils.AveragedModel] = {}
        if cfg.ema_decay:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            for name, mod in task.trainable.items():
                if name in getattr(task, "ema_modules", list(task.trainable)):
                    self.ema[name] = AveragedModel(mod, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay),
                                                   use_buffers=True)
        self._tb = None
        self._pending: dict[str, list[float]] = {}

    # ---- helpers used by tasks ------------------------------------------------------------------
    def autocast(self):
        if self.device.type == "cuda" and self.cfg.amp:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return nullcontext()

    def raw(self, name: str) -> nn.Module:
        return self.task.trainable[name]

    def model_for_export(self, name: str) -> nn.Module:
        """EMA weights when EMA is on, else the trained module."""
        return self.ema[name].module if name in self.ema else self.task.trainable[name]

    def optimize(self, name: str, loss: torch.Tensor) -> float:
        """Backward, clip, step and schedule one optimiser; returns the pre-clip grad norm."""
        opt = self.optimizers[name]
        opt.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"{self.task.name}: loss is {loss.item()} at step {self.step}; lower --lr or check the data "
                "(NaN in the prepared cache?). The last checkpoint is kept.")
        loss.backward()
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)) if self.cfg.grad_clip > 0 \
            else float("nan")
        opt.step()
        self.schedulers[name].step()
        return norm

    # ---- checkpoint -----------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / CHECKPOINT

    def state_dict(self) -> dict[str, Any]:
        rng = _rng_state()
        if self.dist.enabled:
            all_rng: list[Any] = [None] * self.dist.world
            dist.all_gather_object(all_rng, rng)
        else:
            all_rng = [rng]
        return {
            "task": self.task.name, "step": self.step, "world": self.dist.world,
            "models": {k: m.state_dict() for k, m in self.task.trainable.items()},
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
            "ema": {k: e.state_dict() for k, e in self.ema.items()},
            "rng": all_rng, "config": asdict(self.cfg),
        }

    def save_checkpoint(self) -> None:
        state = self.state_dict()  # collective: every rank takes part
        if self.dist.main:
            with atomic_path(self.checkpoint_path, suffix=".pt") as tmp:
                torch.save(state, tmp)
            log.info("checkpoint at step %d -> %s", self.step, self.checkpoint_path)
        if self.dist.enabled:
            dist.barrier()

    def load_checkpoint(self) -> None:
        path = self.checkpoint_path
        state = read_checkpoint(path)
        if state.get("task") != self.task.name:
            raise LesionDiffusionError(f"{path} is a {state.get('task')!r} checkpoint, not {self.task.name!r}; "
                                       "use the run folder of the same network.")
        if state["world"] != self.dist.world:
            raise LesionDiffusionError(f"{path} was written by {state['world']} processes but this run has "
                                       f"{self.dist.world}; resume with the same --nproc_per_node for an exact "
                                       "continuation.")
        for k, m in self.task.trainable.items():
            m.load_state_dict(state["models"][k])
        for k, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        for k, s in self.schedulers.items():
            s.load_state_dict(state["schedulers"][k])
        for k, e in self.ema.items():
            e.load_state_dict(state["ema"][k])
        self.step = int(state["step"])
        _set_rng_state(state["rng"][self.dist.rank])
        log.info("resumed %s from %s at step %d", self.task.name, path, self.step)

    # ---- logging --------------------------------------------------------------------------------
    def _log_scalars(self, scalars: dict[str, float]) -> None:
        for k, v in scalars.items():
            self._pending.setdefault(k, []).append(float(v))
        if self.step % max(1, self.cfg.log_every) and self.step != self.cfg.steps:
            return
        means = {k: float(np.mean(v)) for k, v in sorted(self._pending.items())}
        self._pending.clear()
        if self.dist.enabled:  # average over ranks so the log describes the global batch
            t = torch.tensor(list(means.values()), dtype=torch.float64, device=self.device)
            dist.all_reduce(t)
            means = dict(zip(means, (t / self.dist.world).tolist()))
        if not self.dist.main:
            return
        means["lr"] = next(iter(self.optimizers.values())).param_groups[0]["lr"]
        path = self.run_dir / "metrics.csv"
        new = not path.exists()
        with path.open("a", newline="") as fh:
            w = csv.writer(fh)
            if new:
                w.writerow(["step", "name", "value"])
            for k, v in means.items():
                w.writerow([self.step, k, f"{v:.6g}"])
        if self._tb is not None:
            for k, v in means.items():
                self._tb.add_scalar(f"{self.task.name}/{k}", v, self.step)
        log.debug("step %d %s", self.step, means)

    def _truncate_metrics(self) -> None:
        """After a resume, drop rows logged after the checkpoint (they will be logged again)."""
        path = self.run_dir / "metrics.csv"
        if not path.exists():
            return
        with path.open(newline="") as fh:
            rows = list(csv.reader(fh))
        keep = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= self.step]
        with atomic_path(path) as tmp:
            with tmp.open("w", newline="") as fh:
                csv.writer(fh).writerows(keep)

    def _open_tensorboard(self) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional; CSV is always written
            return
        self._tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self.step or None)

    def preview(self) -> None:
        if not self.dist.main:
            return
        path = self.run_dir / "previews" / f"{self.task.name}_step{self.step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        for m in self.models.values():
            m.eval()
        try:
            with torch.no_grad(), self.autocast():
                self.task.preview(self, path)
        finally:
            for m in self.models.values():
                m.train()

    def _check_ranks_in_sync(self) -> None:
        """Every rank must hold the same parameters after DDP training (catches unsynchronised updates
        such as the VQ codebook's EMA); one float64 checksum per module. Buffers are not compared:
        BatchNorm running statistics legitimately differ per rank (DDP re-broadcasts rank 0's)."""
        sums = torch.tensor([sum(float(p.detach().double().sum()) for p in m.parameters())
                             for m in self.task.trainable.values()], dtype=torch.float64, device=self.device)
        gathered = [torch.zeros_like(sums) for _ in range(self.dist.world)]
        dist.all_gather(gathered, sums)
        for r, g in enumerate(gathered):
            if not torch.allclose(g, gathered[0], rtol=1e-9, atol=0):
                raise RuntimeError(f"{self.task.name}: rank {r} weights differ from rank 0 after training "
                                   f"(checksums {g.tolist()} vs {gathered[0].tolist()}); DDP state is out of sync.")
        if self.dist.main:
            log.info("%s: weights identical on all %d ranks", self.task.name, self.dist.world)

    # ---- main loop ------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> dict[str, Any]:
        """Train until ``cfg.steps``; returns a summary (final step, last logged losses)."""
        from tqdm import tqdm

        cfg = self.cfg
        if self.dist.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.dist.enabled:
            dist.barrier()
        has_ckpt = self.checkpoint_path.exists()
        if has_ckpt and not resume:
            raise LesionDiffusionError(
                f"{self.checkpoint_path} exists from an earlier run. Pass --resume to continue it, or "
                "choose a new -o folder (runs are never overwritten).")
        seed_everything(cfg.seed + 1000 * self.dist.rank)  # ranks draw different noise
        if resume and has_ckpt:
            self.load_checkpoint()
            if self.dist.main:
                self._truncate_metrics()
        elif resume:
            log.warning("--resume given but %s has no checkpoint; starting from step 0", self.run_dir)
        if self.dist.main:
            write_json(self.run_dir / "train_config.json", {"task": self.task.name, **asdict(cfg)})
            self._open_tensorboard()

        dataset = self.task.dataset()
        sampler = ResumableSampler(dataset, self.dist.world, self.dist.rank, cfg.seed)
        per_epoch = math.ceil(sampler.num_samples / cfg.batch_size)
        # the loader's own generator: creating an iterator then draws nothing from the global RNG,
        # so resuming mid-epoch leaves the training RNG stream exactly as in an uninterrupted run
        gen = torch.Generator().manual_seed(cfg.seed)
        for m in self.models.values():
            m.train()

        start = self.step
        bar = tqdm(total=cfg.steps, initial=start, desc=f"{self.task.name}", unit="step",
                   disable=not (cfg.progress and self.dist.main), dynamic_ncols=True)
        last: dict[str, float] = {}
        while self.step < cfg.steps:
            self.epoch, skip = divmod(self.step, per_epoch)
            sampler.set_epoch(self.epoch)
            sampler.set_start(skip * cfg.batch_size)
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(self.epoch)
            loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
                                pin_memory=self.device.type == "cuda", drop_last=False, generator=gen,
                                persistent_workers=False)
            for batch in loader:
                batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
                last = self.task.step(batch, self)
                for name, ema in self.ema.items():
                    ema.update_parameters(self.task.trainable[name])
                self.step += 1
                bar.update(1)
                bar.set_postfix({k: f"{v:.4g}" for k, v in list(last.items())[:3]})
                self._log_scalars(last)
                if cfg.preview_every > 0 and self.step % cfg.preview_every == 0:
                    self.preview()
                if self.step % max(1, cfg.checkpoint_every) == 0 or self.step == cfg.steps:
                    self.save_checkpoint()
                if self.step >= cfg.steps:
                    break
        bar.close()
        if self.dist.enabled:
            self._check_ranks_in_sync()
        if self.step > start and cfg.preview_every > 0 and self.step % cfg.preview_every:
            self.preview()  # the final state, unless the loop just drew it
        if self._tb is not None:
            self._tb.close()
        return {"step": self.step, "losses": last}


def export_all(engine: Engine, fn: Callable[[], None]) -> None:
    """Run an export on rank 0 only, then wait for it on every rank."""
    if engine.dist.main:
        fn()
    if engine.dist.enabled:
        dist.barrier()
