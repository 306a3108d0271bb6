"""nnU-Net v2 trainers that pretrain on LesionDiffusion synthetic lesions, then fine-tune on real data.

``nnUNetTrainerLesionDiffusion``: the first ``schedule.pretrain_fraction`` of the epochs draw each
training sample from the synthetic store with ``synthetic_probability``, the rest train on real
data only; one run, one flag. ``nnUNetTrainerLesionDiffusionSynthOnly`` trains on synthetic cases
only (validation stays real). Shorter and CPU-sized variants live in ``variants/`` (as nnU-Net's
``variants/training_length``). See ``data.py`` for the data-flow design and ``lesiondiffusion.store``
for the producer/offline cache.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import tempfile
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from lesiondiffusion.errors import ConfigError, LesionDiffusionError
from lesiondiffusion.io import atomic_write_text
from lesiondiffusion.store import (FAULT_ENV, OfflineCacheReader, ProducerCrashed, SampleStore, SharedCounters,
                                   StoreStats, ThrottleController, check_spool_space, spool_base)

from .config import CONFIG_FILENAME, LesionDiffusionConfig, check_device, config_path_for, load_config
from .data import FactorySpec, MixedDataset, initial_patch_size, synthetic_context

log = logging.getLogger(__name__)

DEBUG_ENV = "LESIONDIFFUSION_DEBUG"   # set: a LesionDiffusion fault in training raises with its full traceback


def producer_threads(device: str | None) -> int | None:
    """Torch threads of the producer process: for a CPU generator the cores the training loop's torch
    threads leave free (at least one), so it does not oversubscribe the cores it shares with training;
    None (torch's default) for a GPU generator."""
    if device is None or not str(device).startswith("cpu"):
        return None
    return max(1, (os.cpu_count() or 1) - torch.get_num_threads())


def default_cache_dir(preprocessed_dataset_folder: str, plans_name: str, configuration: str) -> Path:
    return Path(preprocessed_dataset_folder) / "lesiondiffusion_cache" / f"{plans_name}__{configuration}"


def cache_identity(plans_manager: PlansManager, configuration: str, crop_size: tuple[int, ...]) -> dict[str, Any]:
    """What an offline cache depends on; the trainer refuses a cache built for other plans."""
    cm = plans_manager.get_configuration(configuration)
    return {"dataset": plans_manager.dataset_name, "plans": plans_manager.plans_name, "configuration": configuration,
            "spacing": [float(s) for s in cm.spacing], "normalization": list(cm.normalization_schemes),
            "crop_size": [int(s) for s in crop_size]}


class nnUNetTrainerLesionDiffusion(nnUNetTrainer):
    """Synthetic-lesion pretraining for a share of the epochs, then real fine-tuning (one run)."""

    synthetic_only: bool = False

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.ld_config: LesionDiffusionConfig | None = None
        self.ld_store: SampleStore | None = None
        self.ld_reader: OfflineCacheReader | None = None
        self.ld_counters: SharedCounters | None = None
        self.ld_probability = mp.get_context("spawn").Value("d", 0.0)
        self.ld_phase: str | None = None
        self._ld_stats_prev = StoreStats()
        self.ld_last_stats: StoreStats | None = None   # the last epoch's store statistics (all ranks)
        self.ld_throttle: ThrottleController | None = None
        self._ld_train_dataset: MixedDataset | None = None

    # ------------------------------------------------------------------ configuration and schedule
    @property
    def ld_rank_world(self) -> tuple[int, int]:
        """(rank, world size) under ``nnUNetv2_train -num_gpus N`` (DDP); (0, 1) in a single process."""
        if self.is_ddp:
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    @property
    def pretrain_epochs(self) -> int:
        if self.synthetic_only:
            return self.num_epochs
        assert self.ld_config is not None
        return int(round(self.num_epochs * self.ld_config.schedule.pretrain_fraction))

    def phase_for_epoch(self, epoch: int) -> tuple[str, float]:
        """('pretrain'|'finetune', synthetic probability) of an epoch."""
        assert self.ld_config is not None
        if self.synthetic_only:
            return "synthetic_only", 1.0
        if epoch < self.pretrain_epochs:
            return "pretrain", float(self.ld_config.synthetic_probability)
        return "finetune", float(self.ld_config.schedule.finetune_synthetic_probability)

    def load_lesiondiffusion_config(self) -> LesionDiffusionConfig:
        path = config_path_for(self.preprocessed_dataset_folder_base)
        cfg = load_config(path)
        if self.synthetic_only:
            cfg.store.on_miss = "wait"  # synthetic-only must never fall back to real cases
        return cfg

    def _save_config(self) -> None:
        assert self.ld_config is not None
        if self.local_rank != 0:  # one writer per output folder under DDP
            return
        text = f"# lesiondiffusion config used by {self.__class__.__name__} (from {self.ld_config.source})\n"
        text += self.ld_config.to_yaml()
        target = Path(self.output_folder) / CONFIG_FILENAME
        if target.exists() and target.read_text() != text:
            self.print_to_log_file(f"WARNING: the lesiondiffusion config differs from the one saved at {target} "
                                   "by an earlier run of this fold; the new one replaces it.")
        atomic_write_text(target, text)

    # ------------------------------------------------------------------ data
    def _ld_setup(self) -> None:
        if self.is_cascaded:
            # a cascade stage's input has the previous stage's segmentation as extra channels; a
            # synthetic case has no such prediction, and the ground truth in its place would leak labels
            raise ConfigError(
                f"{self.__class__.__name__} does not support the cascade configuration '{self.configuration_name}' "
                f"(previous stage '{self.configuration_manager.previous_stage_name}'): synthetic cases have no "
                "previous-stage segmentation. Train '3d_fullres', '3d_lowres' or '2d' with this trainer, or the "
                "cascade with plain nnUNetTrainer.")
        cfg = self.ld_config = self.load_lesiondiffusion_config()
        self.print_to_log_file("LesionDiffusion configuration:\n" + cfg.to_yaml(), add_timestamp=False)
        self._save_config()
        first_phase, _ = self.phase_for_epoch(self.current_epoch)
        self.print_to_log_file(f"LesionDiffusion schedule: {self.pretrain_epochs} of {self.num_epochs} epochs with "
                               f"synthetic data; starting at epoch {self.current_epoch} in phase '{first_phase}'")
        crop = initial_patch_size(self.configuration_manager)
        needs_synthetic = any(self.phase_for_epoch(e)[1] > 0 for e in range(self.current_epoch, self.num_epochs))
        if not needs_synthetic:
            self.print_to_log_file("LesionDiffusion: no synthetic epochs left; no generator is loaded")
            self.ld_counters = SharedCounters()
            return
        if cfg.mode == "offline":
            root = Path(cfg.offline.cache_dir) if cfg.offline.cache_dir else default_cache_dir(
                self.preprocessed_dataset_folder_base, self.plans_manager.plans_name, self.configuration_name)
            ident = cache_identity(self.plans_manager, self.configuration_name, crop)
            self.ld_counters = SharedCounters()
            self.ld_reader = OfflineCacheReader(root, self.ld_counters, expect={
                k: ident[k] for k in ("plans", "configuration", "spacing")})
            self.print_to_log_file(f"LesionDiffusion: offline cache {root} with {len(self.ld_reader.files)} cases "
                                   "(no generator loaded)")
            return
        tr_keys, _ = self.do_split()
        # one producer per DDP rank: on the rank's own GPU for 'cuda', or the dedicated 'cuda:N' of the YAML
        rank, world = self.ld_rank_world
        device = cfg.generator.device_for_rank(self.local_rank if self.is_ddp else None)
        spec = FactorySpec.for_dataset(cfg, self.plans_manager, self.configuration_name, self.dataset_json,
                                       self.preprocessed_dataset_folder, tr_keys, device=device)
        if cfg.templates.dataset_healthy and (spec.raw_folder is None or not os.path.isdir(spec.raw_folder)):
            raise ConfigError(f"{cfg.source}: key 'templates.dataset_healthy' is true but the raw dataset "
                              f"{spec.raw_folder or '$nnUNet_raw/' + self.plans_manager.dataset_name} is not available; "
                              "set nnUNet_raw (templates are read in HU with their organsTr maps) or list "
                              "templates.folders and set dataset_healthy: false.")
        check_device(device, cfg.source)
        # pre-flight: a spool folder too small for the queue (a 64 MiB /dev/shm in a container) would kill
        # the producer after the first few cases; estimate a case as its context box of float32 CT + int16 labels
        context = synthetic_context(crop, cfg.store.context_margin)
        case_bytes = int(np.prod([2 * c for c in context])) * 6
        check_spool_space(spool_base(cfg.store.spool_dir), (cfg.store.size + cfg.store.batch) * case_bytes,
                          f"store.size {cfg.store.size} + store.batch {cfg.store.batch} cases of about "
                          f"{case_bytes / 2**20:.1f} MiB", cfg.source)
        base = cfg.seed + 1000003 * self.current_epoch
        self.ld_store = SampleStore(spec.build, size=cfg.store.size, reuse=cfg.store.reuse,
                                    refresh=cfg.store.refresh, worker=cfg.store.worker, nice=cfg.store.nice,
                                    seed=base + rank, stride=world, batch=cfg.store.batch,
                                    spool_dir=cfg.store.spool_dir, threads=producer_threads(device)).start()
        self.ld_counters = self.ld_store.counters
        if world > 1:
            self.print_to_log_file(f"LesionDiffusion: rank {rank} of {world} has its own producer, generator on "
                                   f"{device}, seeds {base + rank} + {world} k (rank r: {base} + r + {world} k)")
        if cfg.store.warmup:
            got = self.ld_store.wait_for(cfg.store.warmup, cfg.store.warmup_timeout_s)
            self.print_to_log_file(f"LesionDiffusion: store warm-up reached {got}/{cfg.store.warmup} cases")
        if cfg.store.budget is not None and cfg.store.on_miss == "real":
            self.ld_throttle = ThrottleController(self.ld_store.throttle, cfg.store.budget)
        elif cfg.store.budget is not None:  # no real fallback: throttling would only make training wait
            self.print_to_log_file("LesionDiffusion: store.budget is not applied when every sample must be "
                                   "synthetic (on_miss: wait); the producer runs unthrottled")

    def get_tr_and_val_datasets(self):
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        if self.ld_config is None:  # e.g. a tool calls this outside training: plain nnU-Net behaviour
            return dataset_tr, dataset_val
        source: Any
        if self.ld_reader is not None:
            source = self.ld_reader
        elif self.ld_store is not None:
            workers = max(1, get_allowed_n_proc_DA())
            source = self.ld_store.client(pool_size=max(1, int(np.ceil(self.ld_config.store.size / workers))),
                                          on_miss=self.ld_config.store.on_miss)
        else:
            return dataset_tr, dataset_val
        self.ld_probability.value = self.phase_for_epoch(self.current_epoch)[1]
        self._ld_train_dataset = MixedDataset(dataset_tr, source, self.ld_probability)
        return self._ld_train_dataset, dataset_val

    # ------------------------------------------------------------------ faults: one line, traceback in the log
    def run_training(self):
        """nnU-Net's loop; a LesionDiffusion fault (producer crash, damaged cache, bad configuration) ends it in
        one line naming the cause and the fix, with the full traceback in the training log (or here, with
        LESIONDIFFUSION_DEBUG=1). nnU-Net's own errors and Ctrl-C pass through unchanged."""
        fault = Path(tempfile.gettempdir()) / f"lesiondiffusion_fault_{os.getpid()}.txt"
        fault.unlink(missing_ok=True)
        os.environ[FAULT_ENV] = str(fault)  # data-loading workers inherit it (see store.record_fault)
        try:
            super().run_training()
        except Exception as exc:
            line = self._ld_fault_line(exc, fault)
            if line is None or os.environ.get(DEBUG_ENV):
                raise

            try:
                self.print_to_log_file("LesionDiffusion: training stopped; full traceback:\n" + traceback.format_exc(),
                                       also_print_to_console=False)
                where = f"the full traceback is in {self.log_file}"
            except Exception:  # no log file yet (a fault before nnU-Net opened it)
                where = f"set {DEBUG_ENV}=1 for the full traceback"
            self._ld_shutdown()
            raise SystemExit(f"LesionDiffusion: training stopped: {line} ({where}; {DEBUG_ENV}=1 prints it here)") \
                from None
        finally:
            fault.unlink(missing_ok=True)

    def _ld_fault_line(self, exc: BaseException, fault: Path) -> str | None:
        """Cause and fix of a LesionDiffusion fault in one line, or None for anything else."""
        if fault.is_file():  # a worker recorded why it died (damaged cache case, ...)
            text = fault.read_text(encoding="utf-8", errors="replace").strip().splitlines()
            if text:
                return text[0]
        crash: BaseException | None = exc if isinstance(exc, ProducerCrashed) else None
        if crash is None and self.ld_store is not None:
            try:
                self.ld_store.check()
            except ProducerCrashed as found:
                crash = found
        if crash is not None:
            return self._ld_crash_line(str(crash))
        if isinstance(exc, LesionDiffusionError):  # its message already names file, key and fix
            return str(exc)
        return None

    def _ld_crash_line(self, text: str) -> str:
        source = self.ld_config.source if self.ld_config is not None else CONFIG_FILENAME
        resume = "then resume with the same nnUNetv2_train command plus --c"
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        last = lines[-1] if lines else "no message"
        if "exited unexpectedly" in text:
            return (f"the lesion producer process {last.split('(', 1)[-1].rstrip(').')}. If nobody stopped it, it ran "
                    f"out of memory: lower store.size or store.batch, or set generator.device to a GPU in {source}; "
                    f"{resume}.")
        if "No space left" in text or "ENOSPC" in text or "Errno 28" in text:
            spool = self.ld_store.spool if self.ld_store is not None else "the spool folder"
            return (f"the spool folder {spool} is full ({last}). Set store.spool_dir in {source} to a folder with "
                    f"more free space, or lower store.size; {resume}.")
        return f"the lesion producer failed: {last}. Fix the generator settings in {source}; {resume}."

    # ------------------------------------------------------------------ training hooks
    def on_train_start(self):
        self._ld_setup()
        try:
            super().on_train_start()
        except BaseException:
            self._ld_shutdown()
            raise

    def on_train_epoch_start(self):
        phase, p = self.phase_for_epoch(self.current_epoch)
        if phase != self.ld_phase:
            self.print_to_log_file(f"LesionDiffusion: epoch {self.current_epoch} starts phase '{phase}' "
                                   f"(synthetic probability {p:g})")
            if phase == "finetune" and p == 0 and self.ld_store is not None:
                self.ld_store.stop()  # frees the generator (and its GPU memory) for the real fine-tuning
                self.print_to_log_file("LesionDiffusion: producer stopped for the fine-tuning phase")
        self.ld_phase = phase
        self.ld_probability.value = p
        if self.ld_throttle is not None:
            self.ld_throttle.reset_clock()  # validation and checkpointing are not training iterations
        super().on_train_epoch_start()

    def train_step(self, batch: dict) -> dict:
        if self.ld_store is not None and self.ld_phase != "finetune":
            self.ld_store.check()  # a crashed producer stops training with its traceback
            if self.ld_throttle is not None:
                self.ld_throttle.tick()
        return super().train_step(batch)

    def on_train_epoch_end(self, train_outputs):
        super().on_train_epoch_end(train_outputs)
        self._ld_log_store_stats()

    def _ld_log_store_stats(self) -> None:
        """Log this epoch's store statistics, summed over the DDP ranks (a collective: every rank calls it)."""
        if self.ld_counters is None:
            return
        now = self.ld_store.stats() if self.ld_store is not None else self.ld_counters.snapshot()
        delta = now.minus(self._ld_stats_prev)
        self._ld_stats_prev = now
        rank, world = self.ld_rank_world
        if world > 1:  # every rank has its own producer and counters: log their sum
            parts: list[Any] = [None] * world
            dist.all_gather_object(parts, delta)
            delta = StoreStats.total(parts)
        if delta.requests or self.ld_phase != "finetune":
            ranks = f", sum over {world} ranks" if world > 1 else ""
            self.print_to_log_file(f"LesionDiffusion store ({self.ld_phase}{ranks}): {delta.summary()}")
            if self.ld_throttle is not None and self.ld_phase != "finetune":
                self.print_to_log_file(f"LesionDiffusion throttle (rank 0): {self.ld_throttle.summary()}; it allowed "
                                       f"{delta.produced} synthetic cases this epoch{ranks}")
                if delta.produced == 0:
                    why = (f"the {100 * self.ld_throttle.budget:g}% budget allowed no synthesis this epoch"
                           if self.ld_throttle.duty < 1.0 else
                           "no synthesis finished this epoch although the budget did not throttle the producer")
                    self.print_to_log_file(
                        f"LesionDiffusion: {why} (0 new synthetic cases{ranks}): {delta.reused} draws reused stored "
                        f"cases and {delta.missed} fell back to real cases. Raise store.budget, or use a GPU generator "
                        "or an offline cache, for more synthetic cases.")
        self.ld_last_stats = delta

    def on_train_end(self):
        try:
            super().on_train_end()
        finally:
            self._ld_shutdown()

    def _ld_shutdown(self) -> None:
        if self.ld_store is not None:
            self.ld_store.close()
            self.ld_store = None

    def save_checkpoint(self, filename: str) -> None:
        super().save_checkpoint(filename)
        # the config travels with the checkpoint: the same file next to every checkpoint of the fold
        if self.ld_config is not None and self.local_rank == 0 and not self.disable_checkpointing:
            target = Path(filename).parent / CONFIG_FILENAME
            if not target.exists():
                self._save_config()


class nnUNetTrainerLesionDiffusionSynthOnly(nnUNetTrainerLesionDiffusion):
    """Every training sample is synthetic (waits for the producer rather than use a real case)."""

    synthetic_only = True


__all__ = [n for n in list(globals()) if n.startswith("nnUNetTrainer")]
