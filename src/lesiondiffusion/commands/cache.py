"""``lesiondiffusion cache build|verify``: synthesise N preprocessed cases to disk for offline training.

The trainer then reads the cache (config ``mode: offline``) with no generator loaded. The build is
resumable and atomic; ``--shard K/N`` (or ``torchrun``, which sets RANK/WORLD_SIZE) lets N processes,
GPUs or nodes fill one cache; see ``lesiondiffusion.store.OfflineCache``.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict
from pathlib import Path

from ..errors import ConfigError, LesionDiffusionError


def _build(args: argparse.Namespace) -> int:
    from ..nnunet_integration.config import check_device, load_config
    from ..nnunet_integration.data import FactorySpec
    from ..nnunet_integration.trainers import cache_identity
    from ..store import OfflineCache, Shard

    shard = Shard.parse(args.shard) if args.shard else Shard.from_env()
    if args.n < 1:
        raise LesionDiffusionError(f"-n {args.n}: give the number of synthetic cases to build (>= 1).")
    name, pre, plans_file, pm, dataset_json = _plans(args)
    cm = pm.get_configuration(args.configuration)
    cfg = load_config(args.config)
    device = args.device or cfg.generator.device_for_rank(_local_rank(shard))
    if args.device:  # before any work: a producer on a missing GPU would fail after loading everything
        check_device(device, "command line", key="--device", fix="pass --device cpu")
    else:
        check_device(device, cfg.source)
    if cfg.generator.backend == "lesiondiffusion" and cfg.mode == "offline" and not cfg.generator.bundle:
        raise ConfigError(f"{cfg.source}: key 'generator.bundle' is not set; building a cache with the LesionDiffusion "
                          "backend needs a model bundle (or set generator.backend: rule_based).")
    data_folder = pre / cm.data_identifier
    if not data_folder.is_dir():
        raise LesionDiffusionError(f"{data_folder} not found: preprocess configuration {args.configuration} first.")
    out = _output_folder(args, cfg, name, pre, pm, plans_file, data_folder)
    identifiers = _template_identifiers(args, pre, data_folder)
    spec = FactorySpec.for_dataset(cfg, pm, args.configuration, dataset_json, str(data_folder), identifiers,
                                   device=device)
    identity = cache_identity(pm, args.configuration, spec.crop_size)
    identity.update(generator_identity(cfg))
    identity["fold"] = args.fold
    manifest = OfflineCache(out, identity).build(spec.build, args.n, seed=cfg.seed, lazy=True,
                                                 progress=not args.quiet, shard=shard)
    if manifest is None:
        print(f"shard {shard}: done ({shard.quota(args.n) if shard else args.n} cases); other shards are still "
              f"building {out}; the last one to finish writes the manifest ('lesiondiffusion cache verify {out}' "
              "writes it from whatever is there)")
        return 0
    print(f"{manifest['n_cases']} synthetic cases in {out} ({len(manifest['failures'])} failed syntheses skipped); "
          f"train with 'mode: offline' in {cfg.source}")
    return 0


def _plans(args: argparse.Namespace):  # noqa: ANN202 - (dataset name, preprocessed folder, plans file, PlansManager, dataset.json)
    """The dataset's nnU-Net plans (with --configuration in them) and preprocessed dataset.json."""
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    if not nnUNet_preprocessed.is_set():
        raise LesionDiffusionError("nnUNet_preprocessed is not set; export it (and nnUNet_raw) as for nnU-Net training.")
    try:
        name = maybe_convert_to_dataset_name(args.dataset)
    except RuntimeError as exc:
        raise LesionDiffusionError(f"--dataset {args.dataset}: {exc}") from None
    pre = Path(nnUNet_preprocessed.get()) / name
    plans_file = pre / f"{args.plans}.json"
    if not plans_file.is_file():
        raise LesionDiffusionError(f"{plans_file} not found: run 'nnUNetv2_plan_and_preprocess -d {args.dataset}' first "
                                   "or pass --plans.")
    plans = json.loads(plans_file.read_text())
    dataset_json = json.loads((pre / "dataset.json").read_text())
    pm = PlansManager(plans)
    if args.configuration not in pm.available_configurations:
        raise LesionDiffusionError(f"--configuration {args.configuration} is not in {plans_file} "
                                   f"(available: {', '.join(pm.available_configurations)}).")
    return name, pre, plans_file, pm, dataset_json


def _output_folder(args: argparse.Namespace, cfg, name: str, pre: Path, pm, plans_file: Path,  # noqa: ANN001
                   data_folder: Path) -> Path:
    """-o, else offline.cache_dir, else the default under the preprocessed dataset; refused when it holds
    one of the build's inputs."""
    from nnunetv2.paths import nnUNet_raw

    from ..io import refuse_overwrite_input
    from ..nnunet_integration.trainers import default_cache_dir

    out = Path(args.output) if args.output else (
        Path(cfg.offline.cache_dir) if cfg.offline.cache_dir else default_cache_dir(str(pre), pm.plans_name, args.configuration))
    inputs: dict[str, str | os.PathLike | None] = {"--config": args.config, "generator.bundle": cfg.generator.bundle,
                                                   "preprocessed data": data_folder, "plans": plans_file}
    if nnUNet_raw.is_set():
        inputs["raw dataset"] = os.path.join(nnUNet_raw.get(), name)
    for k, folder in enumerate(cfg.templates.folders):
        inputs[f"templates.folders[{k}]"] = folder
    for e in cfg.catalogs:
        if Path(e.name).suffix in (".yaml", ".yml"):
            inputs[f"catalog {e.name}"] = e.name
    refuse_overwrite_input(out, names=inputs)
    return out


def _template_identifiers(args: argparse.Namespace, pre: Path, data_folder: Path) -> list[str]:
    """The preprocessed cases used as templates: --fold's training split, or every case (--fold all)."""
    if args.fold == "all":
        identifiers = None
    else:
        splits = pre / "splits_final.json"
        if not splits.is_file():
            raise LesionDiffusionError(f"--fold {args.fold}: {splits} does not exist yet (nnU-Net writes it when training "
                                       "starts); use --fold all or start a training once.")
        identifiers = json.loads(splits.read_text())[int(args.fold)]["train"]
    if identifiers is None:
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

        try:
            identifiers = sorted(infer_dataset_class(str(data_folder)).get_identifiers(str(data_folder)))
        except (AssertionError, RuntimeError, ValueError) as exc:  # nnU-Net asserts on an empty/mixed folder
            raise LesionDiffusionError(f"{data_folder}: no readable preprocessed cases ({exc}). Run "
                                       f"'nnUNetv2_plan_and_preprocess -d {args.dataset} -c {args.configuration}' first.") from None
    if not identifiers:
        raise LesionDiffusionError(f"{data_folder}: no preprocessed cases to use as templates. Run "
                                   f"'nnUNetv2_plan_and_preprocess -d {args.dataset} -c {args.configuration}' first.")
    return identifiers


def generator_identity(cfg) -> dict:  # noqa: ANN001 - LesionDiffusionConfig
    """Everything that decides what a cached case holds: the bundle by content (a re-initialised or
    re-trained bundle at the same path differs), every generator option, the catalogs by content, the
    templates and the seed. The device is left out: shards on different GPUs build one cache."""
    from ..catalog import load_catalog
    from ..store import file_digest, folder_digest

    bundle = cfg.generator.bundle
    bundle_dir = Path(os.path.expandvars(str(bundle))).expanduser() if bundle else None
    generator = {k: v for k, v in asdict(cfg.generator).items() if k not in ("backend", "bundle", "device", "options")}
    return {
        "backend": cfg.generator.backend,
        "bundle": bundle,
        "bundle_sha256": folder_digest(bundle_dir) if bundle_dir is not None and bundle_dir.exists() else None,
        "generator": generator,  # every other generator field (hu_correction, ...), present and future
        "generator_options": dict(cfg.generator.options),
        "catalogs": [{**asdict(e), "sha256": file_digest(load_catalog(e.name).path)[1]} for e in cfg.catalogs],
        "templates": asdict(cfg.templates),
        "context_margin": cfg.store.context_margin,
        "seed": cfg.seed,
    }


def _local_rank(shard) -> int | None:
    """The GPU index of this process under torchrun; None for a process started by hand."""
    if shard is None or "LOCAL_RANK" not in os.environ:
        return None
    return int(os.environ["LOCAL_RANK"])


def _verify(args: argparse.Namespace) -> int:
    from ..store import MANIFEST, OfflineCache

    manifest, problems = OfflineCache(args.cache).verify(args.n)
    for line in problems:
        print(f"rejected {line}")
    print(f"{manifest['n_cases']} valid synthetic cases in {args.cache} ({len(manifest['failures'])} failed syntheses "
          f"recorded, {len(problems)} rejected into rejected/); {MANIFEST} written")
    if args.n is not None and manifest["n_cases"] < args.n:
        print(f"only {manifest['n_cases']} of the {args.n} cases requested: re-run the same 'lesiondiffusion cache "
              "build' (every shard) to fill the gaps, then verify again")
        return 1
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("cache", help="offline cache of synthetic nnU-Net training cases")
    sub = p.add_subparsers(dest="cache_command", metavar="ACTION")
    sub.required = True
    b = sub.add_parser("build", help="synthesise N preprocessed cases to disk (resumable)")
    b.add_argument("--config", required=True, help="lesiondiffusion.yaml")
    b.add_argument("--dataset", required=True, help="nnU-Net dataset name or id")
    b.add_argument("-n", type=int, required=True, help="number of synthetic cases")
    b.add_argument("--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    b.add_argument("-c", "--configuration", default="3d_fullres", help="nnU-Net configuration (default 3d_fullres)")
    b.add_argument("--fold", default="all", help="use the training split of this fold for templates (default: all cases)")
    b.add_argument("-o", "--output", help="cache folder (default: offline.cache_dir or "
                   "$nnUNet_preprocessed/DATASET/lesiondiffusion_cache/PLANS__CONFIG)")
    b.add_argument("--device", help="override generator.device")
    b.add_argument("--shard", help="K/N: build only shard K of N (N processes, GPUs or nodes fill one cache); "
                   "default under torchrun: RANK/WORLD_SIZE, with generator.device 'cuda' meaning cuda:LOCAL_RANK")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=_build)
    v = sub.add_parser("verify", help="check every case of a cache, set bad ones aside and write the manifest "
                       "(e.g. after a sharded build on several nodes)")
    v.add_argument("cache", help="cache folder")
    v.add_argument("-n", type=int, help="number of cases the manifest lists (default: all valid); exit 1 if fewer")
    v.set_defaults(func=_verify)
