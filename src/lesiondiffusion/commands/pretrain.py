"""`lesiondiffusion pretrain check|vqgan|lmnet|linet`: thin CLI over ``lesiondiffusion.pretrain``.

Multi-GPU: `torchrun --nproc_per_node=N -m lesiondiffusion pretrain lmnet ...` (DDP, env:// init).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .. import presets
from ..errors import DataCheckError
from ._args import finite_float


def _catalog_path(args: argparse.Namespace) -> None:
    """Catalog folders from --catalog-path and the dataset.json's ``catalog_path`` (no exported variable)."""
    from ..catalog import use_catalog_dirs
    from ..dataset_import import dataset_catalog_path

    if getattr(args, "catalog_path", None):
        use_catalog_dirs(args.catalog_path)
    dataset_catalog_path(args.data)


def _check(args: argparse.Namespace) -> int:
    from ..pretrain.check import check_dataset, find_cases

    _catalog_path(args)
    problems = check_dataset(args.data)
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise DataCheckError(f"dataset {args.data} has {len(problems)} problem(s):\n{lines}")
    from ..pretrain.check import check_dataset_warnings, prompt_coverage

    warnings = check_dataset_warnings(args.data, mapping=getattr(args, "mapping", None))
    counts, coverage = prompt_coverage(args.data)
    for lesion_type, per_attribute in sorted(counts.items()):
        shown = "; ".join(f"{a}: " + ", ".join(f"{v} {n}" for v, n in sorted(c.items(), key=lambda t: -t[1]))
                          for a, c in per_attribute.items() if c)
        print(f"{lesion_type} prompts in the training reports: {shown}")
    warnings += coverage
    for w in warnings:
        print(f"warning: {w}")
    print(f"{args.data}: OK ({len(find_cases(Path(args.data)))} cases"
          + (f", {len(warnings)} warning(s) above)" if warnings else ")"))
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from ..pretrain.check import derive_missing_reports

    if not args.derive_reports:
        raise DataCheckError("pretrain prepare: nothing to do; pass --derive-reports to derive the missing reports "
                             "(the cache itself is prepared by `pretrain vqgan|lmnet|linet`).")
    _catalog_path(args)
    written = derive_missing_reports(Path(args.data), enhancement=args.enhancement, mapping=args.mapping)
    for path, n in written:
        print(f"derived {n} report(s) -> {path}")
    print(f"{len(written)} report file(s) written; checking the dataset")
    return _check(args)


def pretrain_options(args: argparse.Namespace):
    """The run's options; every optimisation option left unset takes the preset's recipe
    (``bundle.PRESETS[preset]["training"]``, tabled in docs/fidelity.md)."""
    from ..bundle import preset_training
    from ..pretrain.common import PretrainOptions
    from ..pretrain.engine import TrainConfig

    recipe = preset_training(args.preset)
    given = {"batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.weight_decay,
             "betas": tuple(args.betas) if args.betas else None}
    chosen = {k: (v if v is not None else recipe[k]) for k, v in given.items()}
    train = TrainConfig(
        steps=args.steps, batch_size=int(chosen["batch_size"]), lr=float(chosen["lr"]),
        weight_decay=float(chosen["weight_decay"]), betas=tuple(float(b) for b in chosen["betas"]),
        warmup_steps=args.warmup_steps, grad_clip=args.grad_clip, ema_decay=args.ema,
        checkpoint_every=args.checkpoint_every, log_every=args.log_every, preview_every=args.preview_every,
        num_workers=args.workers, seed=args.seed, device=args.device, amp=not args.no_amp,
        progress=not args.no_progress,
    )
    extra: dict = {}
    if args.net == "vqgan":
        extra.update(adv_warmup_steps=args.adv_warmup,
                     adv_weight=recipe["adv_weight"] if args.adv_weight is None else args.adv_weight,
                     adv_criterion=args.adv_criterion or recipe["adv_criterion"])
        if args.patch:
            extra["patch"] = tuple(args.patch)
    else:
        extra.update(p_token=args.p_token, p_all=args.p_all)
        if args.net == "lmnet":
            extra["gamma"] = args.gamma
    return PretrainOptions(data=Path(args.data), run_dir=Path(args.output), preset=args.preset,
                           bundle=Path(args.bundle) if args.bundle else None,
                           cache=Path(args.cache) if args.cache else None, encoder=args.encoder,
                           resume=args.resume, train=train, extra=extra)


def _train(args: argparse.Namespace) -> int:
    from ..pretrain import train_linet, train_lmnet, train_vqgan

    _catalog_path(args)
    opts = pretrain_options(args)
    module = {"vqgan": train_vqgan, "lmnet": train_lmnet, "linet": train_linet}[args.net]
    summary = module.train(opts)
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return 0
    losses = ", ".join(f"{k} {v:.4g}" for k, v in summary["losses"].items())
    print(f"{args.net}: {summary['step']} steps done ({losses}); network written to {summary['bundle']}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("pretrain", help="validate a dataset and train VQ-GAN, LMNet, LINet",
                              description="Pretraining from your own CT + lesion mask + report dataset "
                                          "(layout: docs/pretraining.md).")
    sub = p.add_subparsers(dest="pretrain_command", metavar="STAGE")
    sub.required = True
    c = sub.add_parser("check", help="list every problem of a pretraining dataset")
    c.add_argument("data", help="dataset folder (dataset.json, imagesTr, labelsTr, organsTr, reportsTr)")
    c.add_argument("--mapping", default=None, help="organ-map label names: v1 | v2 | auto | a JSON file "
                                                   "(default: dataset.json 'organ_mapping', else auto)")
    c.add_argument("--catalog-path", nargs="+", default=None, metavar="DIR",
                   help="folders with your own catalogs (also read from dataset.json 'catalog_path')")
    c.set_defaults(func=_check)
    pr = sub.add_parser("prepare", help="derive missing reports of a mask-only dataset, then check it",
                        description="Public datasets (LiTS, KiTS, MSD, ...) have masks but no reports: --derive-reports "
                                    "writes reportsTr/{case}.yaml for every case with lesion voxels and no report "
                                    "(existing reports are never touched). The training commands prepare the cache.")
    pr.add_argument("data", help="dataset folder (dataset.json, imagesTr, labelsTr, organsTr)")
    pr.add_argument("--derive-reports", action="store_true", help="derive a report per lesion component")
    pr.add_argument("--enhancement", default="non-contrast CT", help="the dataset's contrast phase (one per dataset)")
    pr.add_argument("--mapping", default=None, help="organ-map label names: v1 | v2 | auto | a JSON file such as "
                                                    "tissue_labels.json (default: dataset.json 'organ_mapping', else auto)")
    pr.add_argument("--catalog-path", nargs="+", default=None, metavar="DIR",
                    help="folders with your own catalogs (also read from dataset.json 'catalog_path')")
    pr.set_defaults(func=_prepare)
    for net, what in (("vqgan", "the VQ-GAN autoencoder"), ("lmnet", "the lesion-mask diffusion network"),
                      ("linet", "the latent inpainting network (uses the bundle's frozen VQ-GAN)")):
        t = sub.add_parser(net, help=f"train {what}")
        t.set_defaults(func=_train, net=net)
        t.add_argument("--data", required=True, help="dataset folder (checked before training)")
        t.add_argument("--catalog-path", nargs="+", default=None, metavar="DIR",
                       help="folders with your own catalogs (also read from dataset.json 'catalog_path')")
        t.add_argument("--preset", choices=("tiny", "paper"), default="tiny")
        t.add_argument("-o", "--output", required=True, help="run folder: checkpoint, metrics.csv, previews/")
        t.add_argument("--bundle", help="bundle to write the network into (created from --preset if absent; "
                                        "default RUN/bundle)")
        t.add_argument("--cache", help="prepared-data folder (default: beside RUN, shared by the three runs)")
        t.add_argument("--encoder", default=None, help="text encoder when the bundle is created here (default: the "
                                                       "preset's, biomedclip for paper, hashing for tiny; "
                                                       "hashing | biomedclip | local-dir:PATH | st:PATH)")
        t.add_argument("--steps", type=int, default=1000)
        t.add_argument("--resume", action="store_true", help="continue RUN exactly from its checkpoint")
        t.add_argument("--batch-size", type=int, default=None, help="per process (default: the preset's, "
                                                                    "paper 1 per GPU, tiny 2)")
        t.add_argument("--device", default="auto", help="auto | cpu | cuda (torchrun: one GPU per process)")
        t.add_argument("--lr", type=finite_float, default=None, help="AdamW learning rate (default: the preset's, 1e-4)")
        t.add_argument("--weight-decay", type=finite_float, default=None, help="AdamW weight decay (default: the preset's, 1e-5)")
        t.add_argument("--betas", type=finite_float, nargs=2, default=None, metavar=("B1", "B2"),
                       help="AdamW betas (default: the preset's; paper 0.99 0.999 = the method's momentum 0.99)")
        t.add_argument("--warmup-steps", type=int, default=presets.value("paper", "training.warmup_steps"),
                       help="linear learning-rate warm-up (default 0: the method's static learning rate)")
        t.add_argument("--grad-clip", type=finite_float, default=presets.value("paper", "training.grad_clip"))
        t.add_argument("--ema", type=finite_float, default=None, metavar="DECAY", help="keep EMA weights (e.g. 0.999) "
                                                                               "and export them")
        t.add_argument("--checkpoint-every", type=int, default=100)
        t.add_argument("--log-every", type=int, default=10)
        t.add_argument("--preview-every", type=int, default=250)
        t.add_argument("--workers", type=int, default=2, help="DataLoader workers per process")
        t.add_argument("--seed", type=int, default=0)
        t.add_argument("--no-amp", action="store_true", help="disable bf16 autocast on CUDA")
        t.add_argument("--no-progress", action="store_true")
        if net == "vqgan":
            t.add_argument("--adv-warmup", type=int, default=presets.value("paper", "training.adv_warmup_steps"),
                           help="steps before the adversarial term")
            t.add_argument("--adv-weight", type=finite_float, default=None, help="adversarial weight (default: the preset's, 0.01)")
            t.add_argument("--adv-criterion", choices=("bce", "least_squares", "hinge"), default=None,
                           help="adversarial loss (default: the preset's; paper bce = the method's log-GAN loss)")
            t.add_argument("--patch", type=int, nargs=3, help="training patch (default: LINet crop size)")
        else:
            t.add_argument("--p-token", type=finite_float, default=presets.value("paper", "training.p_token"),
                           help="per-attribute dropout probability")
            t.add_argument("--p-all", type=finite_float, default=presets.value("paper", "training.p_all"),
                           help="whole-context dropout probability")
            if net == "lmnet":
                t.add_argument("--gamma", type=finite_float, default=presets.value("paper", "training.gamma"),
                               help="weight of the whole-crop noise term (the method's gamma)")
