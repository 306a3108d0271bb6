"""``lesiondiffusion bundle``: create a randomly initialised model bundle, show one, or add phrase
embeddings to its cache."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import BundleError


def register(subparsers: argparse._SubParsersAction) -> None:
    # no heavy imports here: every `lesiondiffusion` command builds this parser, and importing
    # lesiondiffusion.bundle pulls in torch + MONAI (seconds); handlers import what they need
    p = subparsers.add_parser("bundle", help="create, inspect or extend a model bundle")
    sub = p.add_subparsers(dest="bundle_command", metavar="ACTION")
    sub.required = True
    i = sub.add_parser("init", help="randomly initialised bundle from a preset (tests, smoke runs, training start)")
    i.add_argument("--preset", default="tiny", help="network sizes: tiny or paper (default tiny; see docs/bundle.md)")
    i.add_argument("-o", "--output", type=Path, required=True, metavar="DIR", help="bundle folder to create")
    i.add_argument("--encoder", default=None, help="text encoder (default: the preset's, biomedclip for paper, hashing for tiny): hashing[:DIM], biomedclip, local-dir:/path, open_clip:NAME, st:/path; see docs/bundle.md")
    i.add_argument("--seed", type=int, default=0, help="weight initialisation seed (default 0)")
    i.add_argument("--force", action="store_true", help="replace an existing bundle in DIR")
    i.set_defaults(func=_init)
    s = sub.add_parser("info", help="print a bundle's configuration and check its files")
    s.add_argument("bundle", type=Path, metavar="DIR")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=_info)
    e = sub.add_parser("embed", help="add phrases to a bundle's embedding cache (needs the bundle's encoder)")
    e.add_argument("bundle", type=Path, metavar="DIR")
    e.add_argument("--encoder", help="encoder spec (default: the bundle's config.yaml encoder.spec)")
    e.add_argument("--phrase", action="append", default=[], help="a phrase such as 'shape: round-like' (repeatable)")
    e.add_argument("--catalog", action="append", default=[], help="add every phrase of this catalog (name or path)")
    e.set_defaults(func=_embed)


def _init(args: argparse.Namespace) -> int:
    from ..bundle import CONFIG_FILE, Bundle

    out: Path = args.output
    if (out / CONFIG_FILE).exists() and not args.force:
        raise BundleError(f"{out} already holds a bundle ({out / CONFIG_FILE}); pass --force to replace it or choose another -o.")
    if out.exists() and any(out.iterdir()) and not (out / CONFIG_FILE).exists():
        raise BundleError(f"{out} exists and is not empty; bundles are created in a new or empty folder.")
    bundle = Bundle.init(args.preset, args.encoder, seed=args.seed)
    bundle.save(out)
    s = bundle.summary()
    print(
        f"created {args.preset} bundle in {out}: encoder {s['encoder']['id']} ({len(bundle.cache.phrases)} phrases cached), "
        f"parameters vqgan {s['parameters']['vqgan']:,} / lmnet {s['parameters']['lmnet']:,} / linet {s['parameters']['linet']:,}; "
        "weights are random until trained with `lesiondiffusion pretrain`."
    )
    return 0


def _info(args: argparse.Namespace) -> int:
    import yaml

    from ..bundle import Bundle

    summary = Bundle.load(args.bundle).summary()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(yaml.safe_dump(summary, sort_keys=False).rstrip())
        print("status: all files present, versions and tensor shapes match config.yaml; config values, weights and text embeddings are finite")
    return 0


def _embed(args: argparse.Namespace) -> int:
    from ..bundle import EMBEDDINGS_DIR, Bundle
    from ..catalog import load_catalog

    bundle = Bundle.load(args.bundle)
    bundle.attach_encoder(args.encoder)
    phrases = list(args.phrase)
    for name in args.catalog:
        phrases.extend(load_catalog(name).phrases())
    if not phrases:
        raise BundleError("nothing to embed: pass --phrase 'attribute: value' and/or --catalog NAME.")
    added = bundle.cache.add(phrases)
    bundle.cache.save(args.bundle / EMBEDDINGS_DIR)
    print(f"{added} new phrase(s) embedded with {bundle.cache.encoder_id}; cache holds {len(bundle.cache.phrases)}.")
    return 0
