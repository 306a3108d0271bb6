"""What the three trainers share around the engine: options, opening/creating the bundle, preparing the
cache once (rank 0, others wait), the phrase table for text conditioning, and writing the trained
network back into the bundle.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from lesiondiffusion.bundle import CONFIG_FILE, METHOD_CONDITIONING, Bundle
from lesiondiffusion.errors import LesionDiffusionError
from lesiondiffusion.report import LesionReport

from .engine import DistInfo, Engine, Task, TrainConfig, setup_distributed
from .prepare import Manifest, PrepConfig, prepare_dataset

log = logging.getLogger(__name__)

NETS = ("vqgan", "lmnet", "linet")


@dataclass
class PretrainOptions:
    """Command-line options of `lesiondiffusion pretrain {vqgan,lmnet,linet}` as data."""

    data: Path
    run_dir: Path
    preset: str = "tiny"
    bundle: Path | None = None          # default: RUN/bundle
    cache: Path | None = None           # default: RUN/../prepared_<key> (shared by the three runs)
    encoder: str | None = None          # only used when the bundle is created here; None: the preset's
    resume: bool = False
    train: TrainConfig = field(default_factory=TrainConfig)
    extra: dict[str, Any] = field(default_factory=dict)   # task-specific (loss weights, dropout ...)

    @property
    def bundle_path(self) -> Path:
        return Path(self.bundle) if self.bundle else Path(self.run_dir) / "bundle"


def _barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def open_bundle(opts: PretrainOptions, info: DistInfo) -> Any:
    """Load the bundle, creating it from the preset first when the folder has no config.yaml."""
    path = opts.bundle_path
    if info.main and not (path / CONFIG_FILE).exists():
        if path.exists() and any(path.iterdir()):
            raise LesionDiffusionError(f"{path} exists, is not empty and has no {CONFIG_FILE}; it is not a bundle. "
                                       "Pass --bundle with a bundle folder or a new path.")
        log.info("creating bundle %s from preset %r (encoder %s)", path, opts.preset, opts.encoder or "preset default")
        Bundle.init(opts.preset, encoder=opts.encoder, seed=opts.train.seed, for_training=True).save(path)
    _barrier(info)
    bundle = Bundle.load(path)
    if bundle.config.preset != opts.preset:
        raise LesionDiffusionError(f"{path} was made from preset {bundle.config.preset!r} but --preset is "
                                   f"{opts.preset!r}. Use --preset {bundle.config.preset} or another --bundle.")
    return bundle


def prep_config(bundle: Any) -> PrepConfig:
    cfg = bundle.config
    return PrepConfig(spacing_mm=tuple(cfg.spacing_mm), hu_window=tuple(cfg.hu_window),
                      lmnet_crop=tuple(cfg.crop.lmnet_size), linet_crop=tuple(cfg.crop.linet_size),
                      # random shift of the lesion inside its crop: an eighth of the crop keeps it inside
                      jitter=max(1, min(min(cfg.crop.lmnet_size), min(cfg.crop.linet_size)) // 8))


def prepare(opts: PretrainOptions, bundle: Any, info: DistInfo) -> Manifest:
    """Prepare the cache on rank 0 (reused when up to date); every rank then reads the manifest."""
    pcfg = prep_config(bundle)
    cache = Path(opts.cache) if opts.cache else Path(opts.run_dir).parent / f"prepared_{pcfg.key()}"
    if info.main:
        prepare_dataset(opts.data, cache, pcfg, progress=opts.train.progress)
    _barrier(info)
    return Manifest.load(cache)


class PhraseTable:
    """Phrase -> row index, and the [P, dim] embedding matrix of every phrase the dataset uses.

    Built once in the main process so DataLoader workers only pass integer ids around.
    """

    def __init__(self, bundle: Any, phrases: list[str]) -> None:
        uniq = sorted(set(phrases))
        missing = [p for p in uniq if p not in bundle.cache]
        if missing:
            # reports may use vocabulary the bundle has not cached yet: embed with the bundle's encoder
            if bundle.cache.encoder is None:
                bundle.attach_encoder()
            bundle.cache.add(missing)
        self.added = bool(missing)
        self.index = {p: i for i, p in enumerate(uniq)}
        self.table = bundle.cache.embed(uniq).float()

    def context(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table.to(ids.device)[ids]


def dataset_phrases(manifest: Manifest, kind: str) -> list[str]:
    out: list[str] = []
    for les in manifest.lesions:
        rep = LesionReport.from_dict(les["report"], source=les["file"])
        out.extend(rep.mask_phrases() if kind == "mask" else rep.image_phrases())
    return out


def save_network(bundle: Any, engine: Engine, net: str, opts: PretrainOptions, save_embeddings: bool) -> None:
    """Write the trained (EMA if enabled) weights of ``net`` into the bundle, plus a provenance note."""
    module = engine.model_for_export(net)
    getattr(bundle, net).load_state_dict({k: v.detach().cpu() for k, v in module.state_dict().items()})
    if net == "vqgan" and (bundle.config.latent_norm is not None or "linet" in bundle.config.notes):
        # LINet (and its latent standardisation) was trained on the old VQ-GAN's latents
        log.warning("the VQ-GAN changed: LINet in %s was trained on the previous VQ-GAN's latents and is marked "
                    "untrained; run `lesiondiffusion pretrain linet` again", opts.bundle_path)
        bundle.config.latent_norm = None
        bundle.config.notes.pop("linet", None)
    if net in ("lmnet", "linet"):  # trained on the method's split (data.LesionCropDataset, dataset_phrases)
        bundle.config.conditioning[net] = METHOD_CONDITIONING[net]
    bundle.config.notes[net] = (f"trained by `lesiondiffusion pretrain {net}` for {engine.step} steps on "
                                f"{Path(opts.data).resolve()} (run {Path(opts.run_dir).resolve()})")
    if all(n in bundle.config.notes for n in NETS):  # no longer a random bundle
        bundle.config.notes.pop("initialisation", None)
    parts = [net] + (["text_embeddings"] if save_embeddings else [])
    bundle.save(opts.bundle_path, parts=parts)
    log.info("wrote %s into bundle %s", net, opts.bundle_path)


def run_pretraining(opts: PretrainOptions, build_task: Callable[[Any, Manifest, PretrainOptions], Task],
                    net: str) -> dict[str, Any]:
    """Open/create the bundle, prepare the cache, train, write the network into the bundle."""
    info = setup_distributed(opts.train.device)
    try:
        if info.main:
            Path(opts.run_dir).mkdir(parents=True, exist_ok=True)
        bundle = open_bundle(opts, info)
        manifest = prepare(opts, bundle, info)
        task = build_task(bundle, manifest, opts)
        engine = Engine(task, opts.train, opts.run_dir, info)
        summary = engine.run(resume=opts.resume)
        if info.main:
            save_network(bundle, engine, net, opts, save_embeddings=getattr(task, "phrases_added", False))
        _barrier(info)
        summary["bundle"] = str(opts.bundle_path)
        return summary
    finally:
        if info.owns_group and dist.is_initialized():
            dist.destroy_process_group()
