"""Benchmark (not CI): show that the three trainers learn, on a toy dataset whose lesions follow their
reports, with the tiny preset on CPU in minutes.

    python benchmarks/learns.py --out /tmp/learns [--vqgan-steps N --lmnet-steps N --linet-steps N]

Prints: VQ-GAN reconstruction error at the start vs the end; sphericity and convexity of LMNet masks
for "round-like" vs "irregular" prompts at the same locations; mean HU of LINet inpaintings for
"hyperdense" vs "hypodense" prompts at the same locations.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


@dataclass
class _Eval:
    """The three things the tasks' sampling helpers need from an engine, without an optimiser."""

    device: torch.device
    models: dict[str, torch.nn.Module]

    def autocast(self):
        from contextlib import nullcontext

        return nullcontext()

    def model_for_export(self, name: str) -> torch.nn.Module:
        return self.models[name]


def make_bundle(path: Path, spacing: float, lmnet_crop: int, linet_crop: int, seed: int,
                hu_window: tuple[float, float], attention_init: bool = True, attention_std: float = 0.02,
                prediction: dict[str, str] | None = None, attention: dict[str, str] | None = None) -> None:
    """A tiny-preset bundle at a finer spacing and smaller crops: toy lesions span ~9 voxels, and
    every crop holds one lesion with context. ``prediction`` ({"linet": "epsilon"}) and ``attention``
    ({"lmnet": "FFT"}: cross-attention at the coarsest level only) override the preset for ablations."""
    from lesiondiffusion.bundle import Bundle
    from lesiondiffusion.models.lmnet import build_unet, init_attention_outputs

    b = Bundle.init("tiny", encoder="hashing", seed=seed, for_training=attention_init)
    for net, kind in (prediction or {}).items():
        setattr(b.config.schedule, f"{net}_prediction", kind)
    for net, levels in (attention or {}).items():
        getattr(b.config, net)["attention_levels"] = [c == "T" for c in levels]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            setattr(b, net, build_unet(getattr(b.config, net)))
            if attention_init:
                init_attention_outputs(getattr(b, net))
    if attention_init and attention_std != 0.02:  # experiment: a larger start for the text path
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            init_attention_outputs(b.lmnet, attention_std)
            init_attention_outputs(b.linet, attention_std)
    b.config.spacing_mm = (spacing, spacing, spacing)
    b.config.hu_window = hu_window
    b.config.crop.lmnet_size = (lmnet_crop,) * 3
    b.config.crop.linet_size = (linet_crop,) * 3  # its latent (half) must divide by LINet's 2^(levels-1)
    b.save(path)


def _train(net: str, data: Path, out: Path, steps: int, batch: int, extra: dict[str, Any], lr: float) -> float:
    from lesiondiffusion.pretrain import train_linet, train_lmnet, train_vqgan
    from lesiondiffusion.pretrain.common import PretrainOptions
    from lesiondiffusion.pretrain.engine import TrainConfig

    mod = {"vqgan": train_vqgan, "lmnet": train_lmnet, "linet": train_linet}[net]
    opts = PretrainOptions(data=data, run_dir=out / f"run_{net}", bundle=out / "bundle", cache=out / "cache",
                           train=TrainConfig(steps=steps, batch_size=batch, lr=lr, num_workers=0, progress=False,
                                             preview_every=max(steps // 2, 1), checkpoint_every=max(steps // 4, 1),
                                             log_every=25, device="cpu"),
                           extra=extra)
    t0 = time.time()
    mod.train(opts)
    return (time.time() - t0) / 60.0


def vqgan_error(bundle_path: Path, cache: Path, patch: int, n: int = 8) -> tuple[float, float]:
    """(MSE in windowed units, MAE in HU inside the body) on fixed patches, for the bundle's VQ-GAN."""
    from lesiondiffusion.bundle import Bundle

    from lesiondiffusion.pretrain.data import Manifest, VolumePatchDataset

    b = Bundle.load(bundle_path)
    man = Manifest.load(cache)
    ds = VolumePatchDataset(man, (patch,) * 3, seed=123)
    x = torch.stack([ds[i % len(ds)]["image"] for i in range(n)])
    with torch.no_grad():
        recon, _ = b.vqgan(x)
    lo, hi = b.config.hu_window
    body = x > -0.99
    mae_hu = float(((recon - x).abs() * (hi - lo) / 2)[body].mean())
    return float(torch.mean((recon - x) ** 2)), mae_hu


def _prompt(report: dict, **change: str) -> dict:
    from toydata import toy_report

    r = dict(report)
    r.update(change)
    return toy_report(r["shape"], r["density"], r["size_mm"])


def _as_pipeline(mask: np.ndarray, box: np.ndarray, organ: np.ndarray) -> np.ndarray:
    """What synthesis keeps of a sampled mask for an intraparenchymal lesion: the part inside the box
    and the organ, largest connected component (LMNet is trained with weight gamma outside the box)."""
    from scipy import ndimage

    m = mask & box & organ
    lab, n = ndimage.label(m)
    if n > 1:
        m = lab == (1 + int(np.argmax(np.bincount(lab.ravel())[1:])))
    return m


def evaluate(out: Path, n_locations: int, seeds: int, ddim_steps: int | None = None) -> dict[str, Any]:
    from lesiondiffusion.bundle import Bundle
    from lesiondiffusion.evaluation import convexity, sphericity
    from lesiondiffusion.report import LesionReport

    from lesiondiffusion.pretrain.common import PhraseTable
    from lesiondiffusion.pretrain.data import LesionCropDataset, Manifest
    from lesiondiffusion.pretrain.train_linet import LINetTask
    from lesiondiffusion.pretrain.train_lmnet import DiffusionTaskConfig, LMNetTask

    b = Bundle.load(out / "bundle")
    man = Manifest.load(out / "cache")
    spacing = b.config.spacing_mm
    ev = _Eval(torch.device("cpu"), {"lmnet": b.lmnet, "linet": b.linet})
    reports = [les["report"] for les in man.lesions]
    prompts = {
        "round-like": [_prompt(r, shape="round-like") for r in reports],
        "irregular": [_prompt(r, shape="irregular") for r in reports],
        "hyperdense": [_prompt(r, density="hyperdense") for r in reports],
        "hypodense": [_prompt(r, density="hypodense") for r in reports],
    }
    phrases = []
    for plist in prompts.values():
        for p in plist:
            rep = LesionReport.from_dict(p)
            phrases += rep.mask_phrases() + rep.image_phrases()
    table = PhraseTable(b, phrases)
    cfg = DiffusionTaskConfig(crop=tuple(b.config.crop.lmnet_size))
    lm = LMNetTask(b.lmnet, man, table, b.config.schedule, cfg)
    li = LINetTask(b.linet, b.vqgan, man, table, b.config.schedule,
                   DiffusionTaskConfig(crop=tuple(b.config.crop.linet_size)), tuple(b.config.hu_window),
                   latent_norm=b.config.latents)
    mask_ds = LesionCropDataset(man, cfg.crop, table.index, kind="mask", seed=7)
    img_ds = LesionCropDataset(man, li.cfg.crop, table.index, kind="image", seed=7)
    idx = list(range(min(n_locations, len(man.lesions))))

    def batch_of(ds: LesionCropDataset) -> dict[str, torch.Tensor]:
        items = [ds[i] for i in idx]
        return {k: torch.stack([it[k] for it in items]) for k in items[0]}

    def context(name: str, kind: str) -> torch.Tensor:
        lists = []
        for i in idx:
            rep = LesionReport.from_dict(prompts[name][i])
            lists.append(rep.mask_phrases() if kind == "mask" else rep.image_phrases())
        return torch.stack([table.table[[table.index[p] for p in ph]] for ph in lists])

    res: dict[str, Any] = {"locations": len(idx), "seeds": seeds}
    # same location, same noise seed, only the prompt differs: paired differences cancel the location effect
    paired: dict[str, list[tuple[float, float]]] = {}
    mb = batch_of(mask_ds)
    for name in ("round-like", "irregular"):
        sph, conv, empty, vols = [], [], 0, []
        paired[name] = []
        for s in range(seeds):
            masks = lm.generate(ev, mb, context(name, "mask"), seed=1000 + s, steps=ddim_steps).numpy()[:, 0] > 0
            for j, m in enumerate(masks):
                m = _as_pipeline(m, mb["box"][j, 0].numpy() > 0, mb["organ"][j, 0].numpy() > 0)
                if not m.any():
                    empty += 1
                    paired[name].append((np.nan, np.nan))
                    continue
                sph.append(sphericity(m, spacing))
                conv.append(convexity(m, spacing))
                vols.append(float(m.sum()))
                paired[name].append((sph[-1], conv[-1]))
        res[f"lmnet_{name}"] = {"sphericity": float(np.nanmean(sph)), "convexity": float(np.nanmean(conv)),
                                "sphericity_sd": float(np.nanstd(sph)), "convexity_sd": float(np.nanstd(conv)),
                                "empty": empty, "n": len(sph), "mean_voxels": float(np.mean(vols)) if vols else 0.0}
    d = np.asarray(paired["round-like"]) - np.asarray(paired["irregular"])
    ok = ~np.isnan(d).any(axis=1)
    res["lmnet_paired"] = {"sphericity_diff": float(d[ok, 0].mean()), "convexity_diff": float(d[ok, 1].mean()),
                           "sphericity_diff_se": float(d[ok, 0].std(ddof=1) / np.sqrt(ok.sum())),
                           "convexity_diff_se": float(d[ok, 1].std(ddof=1) / np.sqrt(ok.sum())),
                           "round_more_spherical": int((d[ok, 0] > 0).sum()),
                           "round_more_convex": int((d[ok, 1] > 0).sum()),
                           "ties": int((d[ok, 0] == 0).sum()), "pairs": int(ok.sum())}
    real = {k: [] for k in ("round-like", "irregular")}
    for i in idx:
        m = mb["lesion"][idx.index(i), 0].numpy() > 0
        real[reports[i]["shape"]].append((sphericity(m, spacing), convexity(m, spacing)))
    res["real_masks"] = {k: {"sphericity": float(np.mean([a for a, _ in v])), "convexity": float(np.mean([c for _, c in v]))}
                         for k, v in real.items() if v}

    ib = batch_of(img_ds)
    les = ib["lesion"][:, 0].numpy() > 0
    per_lesion: dict[str, list[float]] = {}
    for name in ("hyperdense", "hypodense"):
        means = per_lesion[name] = []
        for s in range(seeds):
            hu = li.inpaint(ev, ib["image"], ib["lesion"], context(name, "image"), seed=2000 + s,
                            steps=ddim_steps).numpy()[:, 0]
            means += [float(hu[j][les[j]].mean()) for j in range(len(idx))]
        res[f"linet_{name}"] = {"mean_hu": float(np.mean(means)), "sd_hu": float(np.std(means)), "n": len(means)}
    dh = np.asarray(per_lesion["hyperdense"]) - np.asarray(per_lesion["hypodense"])
    res["linet_paired"] = {"hu_diff": float(dh.mean()), "hu_diff_se": float(dh.std(ddof=1) / np.sqrt(len(dh))),
                           "hyper_higher": int((dh > 0).sum()), "pairs": len(dh)}
    from lesiondiffusion.pretrain.data import unwindow

    real_hu = unwindow(ib["image"][:, 0].numpy(), b.config.hu_window)
    res["real_lesion_hu"] = {d: float(np.mean([real_hu[j][les[j]].mean() for j, i in enumerate(idx)
                                               if reports[i]["density"] == d])) for d in ("hyperdense", "hypodense")}
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("/tmp/lesiondiffusion_learns"))
    p.add_argument("--cases", type=int, default=32, help="lesion cases (plus 2 healthy)")
    p.add_argument("--vqgan-steps", type=int, default=400)
    p.add_argument("--lmnet-steps", type=int, default=1500)
    p.add_argument("--linet-steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-4, help="VQ-GAN; higher than the 1e-4 default: minutes, not days")
    p.add_argument("--diffusion-lr", type=float, default=1e-3,
                   help="LMNet/LINet: the tiny UNets tolerate it, and a few hundred steps must learn the text path")
    p.add_argument("--ddim-steps", type=int, default=25,
                   help="evaluation sampler steps (bundle default 50): halves evaluation time on CPU")
    p.add_argument("--locations", type=int, default=12)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    p.add_argument("--hu-window", type=float, nargs=2, default=(-200.0, 250.0),
                   help="bundle HU window: soft-tissue contrast of the toy lesions (-40..110 HU) survives")
    p.add_argument("--zero-attention-init", action="store_true",
                   help="ablation: keep MONAI's zero attention output projections (Bundle.init default)")
    p.add_argument("--attention-init-std", type=float, default=0.02,
                   help="std of the attention output projections at init (Bundle.init(for_training=True): 0.02)")
    for net in ("lmnet", "linet"):
        p.add_argument(f"--{net}-prediction", choices=("epsilon", "v_prediction"),
                       help=f"ablation: {net} prediction target (tiny preset: "
                            f"{'epsilon' if net == 'lmnet' else 'v_prediction'})")
        p.add_argument(f"--{net}-attention", metavar="TTT",
                       help=f"ablation: {net} cross-attention per level, T/F from the top (tiny preset: TTT)")
    p.add_argument("--nets", default="vqgan,lmnet,linet", help="which networks to train (rest reused)")
    p.add_argument("--eval-only", action="store_true", help="evaluate the bundle already trained in --out")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(a.threads)
    from toydata import write_toy_dataset

    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    if not (data / "dataset.json").exists():
        write_toy_dataset(data, n_lesion=a.cases, n_healthy=2, shape=(40, 40, 24), spacing=(2.0, 2.0, 3.0), seed=0)
    for name in ("bundle", "bundle_init"):  # bundle_init: the untrained start, for the VQ-GAN baseline
        if not (out / name / "config.yaml").exists():
            make_bundle(out / name, spacing=2.5, lmnet_crop=12, linet_crop=16, seed=0, hu_window=tuple(a.hu_window),
                        attention_init=not a.zero_attention_init, attention_std=a.attention_init_std,
                        prediction={n: k for n in ("lmnet", "linet") if (k := getattr(a, f"{n}_prediction"))},
                        attention={n: k for n in ("lmnet", "linet") if (k := getattr(a, f"{n}_attention"))})
    from lesiondiffusion.bundle import Bundle

    from lesiondiffusion.pretrain.common import prep_config
    from lesiondiffusion.pretrain.data import prepare_dataset

    prepare_dataset(data, out / "cache", prep_config(Bundle.load(out / "bundle")), progress=False)
    if a.eval_only:
        res = evaluate(out, a.locations, a.seeds, a.ddim_steps)
        print(json.dumps({k: v for k, v in res.items() if k.startswith(("lmnet", "linet", "real"))}, indent=1))
        (out / "learns_eval.json").write_text(json.dumps(res, indent=2))
        return 0
    patch = 16  # the smallest input the tiny PatchDiscriminator accepts
    minutes = {}
    nets = a.nets.split(",")
    if "vqgan" in nets:
        minutes["vqgan"] = _train("vqgan", data, out, a.vqgan_steps, a.batch,
                                  {"patch": (patch,) * 3, "adv_warmup_steps": a.vqgan_steps // 2}, a.lr)
    start_err = vqgan_error(out / "bundle_init", out / "cache", patch)
    end_err = vqgan_error(out / "bundle", out / "cache", patch)
    if "lmnet" in nets:
        minutes["lmnet"] = _train("lmnet", data, out, a.lmnet_steps, a.batch, {}, a.diffusion_lr)
    if "linet" in nets:
        minutes["linet"] = _train("linet", data, out, a.linet_steps, a.batch, {}, a.diffusion_lr)
    t0 = time.time()
    res = evaluate(out, a.locations, a.seeds, a.ddim_steps)
    minutes["evaluation"] = (time.time() - t0) / 60
    res["vqgan"] = {"mse_start": start_err[0], "mse_end": end_err[0], "mae_hu_start": start_err[1],
                    "mae_hu_end": end_err[1]}
    res["minutes"] = minutes
    res["machine"] = f"{os.cpu_count()}-core CPU, torch threads {a.threads}, load avg {os.getloadavg()[0]:.1f}"
    (out / "learns.json").write_text(json.dumps(res, indent=2))

    v = res["vqgan"]
    print(f"machine: {res['machine']}")
    print("training minutes: " + ", ".join(f"{k} {m:.1f}" for k, m in minutes.items()))
    print(f"VQ-GAN reconstruction MSE (windowed): start {v['mse_start']:.4f} -> end {v['mse_end']:.4f} "
          f"(x{v['mse_start'] / max(v['mse_end'], 1e-12):.1f} lower); MAE in body {v['mae_hu_start']:.0f} -> "
          f"{v['mae_hu_end']:.0f} HU")
    for name in ("round-like", "irregular"):
        r = res[f"lmnet_{name}"]
        print(f"LMNet '{name}': sphericity {r['sphericity']:.3f} (sd {r['sphericity_sd']:.3f}), convexity "
              f"{r['convexity']:.3f} (sd {r['convexity_sd']:.3f}), n={r['n']}, empty={r['empty']}, "
              f"mean {r['mean_voxels']:.0f} voxels")
    pr = res["lmnet_paired"]
    print(f"  paired round-like minus irregular (same location and noise): sphericity {pr['sphericity_diff']:+.3f} "
          f"(se {pr['sphericity_diff_se']:.3f}), convexity {pr['convexity_diff']:+.3f} "
          f"(se {pr['convexity_diff_se']:.3f}); "
          f"round-like more spherical in {pr['round_more_spherical']}/{pr['pairs']} pairs ({pr['ties']} ties), "
          f"more convex in {pr['round_more_convex']}/{pr['pairs']}")
    for k, r in res["real_masks"].items():
        print(f"  real '{k}' masks: sphericity {r['sphericity']:.3f}, convexity {r['convexity']:.3f}")
    for name in ("hyperdense", "hypodense"):
        r = res[f"linet_{name}"]
        print(f"LINet '{name}': mean lesion HU {r['mean_hu']:.1f} (sd over lesions {r['sd_hu']:.1f}, n={r['n']}); "
              f"real {name} lesions {res['real_lesion_hu'][name]:.1f} HU")
    pl = res["linet_paired"]
    print(f"  paired hyperdense minus hypodense (same lesion and noise): {pl['hu_diff']:+.2f} HU "
          f"(se {pl['hu_diff_se']:.2f}); "
          f"hyperdense higher in {pl['hyper_higher']}/{pl['pairs']} pairs")
    print(f"results: {out / 'learns.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
