"""FLOPs per lesion of each LesionDiffusion stage, the floor time they imply at a given peak, and utilisation.

Stages per lesion at a preset's default crops (``bundle.crop``; crops only grow for lesions larger than
them): LMNet x DDIM steps x guidance (a guided step runs the conditional and the null branch as one
doubled batch), VQ-GAN encode of the image crop, LINet x steps x guidance on its latent, VQ-GAN decode.

Counting uses ``torch.utils.flop_counter.FlopCounterMode`` on the ``meta`` device: networks and inputs
have shapes but no storage, so the paper preset at full size (128^3 image crop, 4 x 64^3 latent) is
counted exactly in well under a second on any machine, with nothing scaled. The counter covers
convolutions, matrix products and attention (what dominates a UNet); normalisation, activations and
the scheduler's elementwise update are not counted, which makes the floor a slight underestimate.
Counting on ``meta`` also matters for attention: on real CPU tensors PyTorch dispatches
``scaled_dot_product_attention`` to a CPU flash kernel that the counter has no formula for, so it would
silently drop the attention FLOPs (72 % of a tiny LINet step); on ``meta`` it is counted as the
matrix products it is.

``--measure`` also times the same stages on ``--device`` (real tensors, random weights, bf16 autocast
on CUDA, best of ``--repeats``): one guided UNet call per network and one encode + decode, so per lesion
``t = t_vq + steps x (t_lmnet + t_linet)``. Utilisation = floor / measured. The paper preset needs
minutes per guided step on a CPU, so on CPU only the presets in ``--measure-presets`` (default tiny)
are timed.

    python benchmarks/flops.py                                   # counts for tiny + paper, tiny timed on CPU
    python benchmarks/flops.py --device cuda --measure-presets tiny,paper --batch 1,8 --steps 50,200
    python benchmarks/flops.py --peak-tflops 0.1                 # utilisation against a CPU-sized peak
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import time
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from lesiondiffusion.bundle import Bundle, BundleConfig, preset_config
from lesiondiffusion.text import make_encoder

H100_BF16_DENSE_TFLOPS = 989.0  # H100 SXM bf16 dense tensor-core peak (H200: same compute)


@dataclass
class StageFlops:
    """FLOPs of one network call at batch 1 (guided UNet calls count both branches)."""

    lmnet_step: float
    linet_step: float
    vq_encode: float
    vq_decode: float

    def per_lesion(self, steps: int) -> dict[str, float]:
        return {"lmnet": steps * self.lmnet_step, "vq_encode": self.vq_encode,
                "linet": steps * self.linet_step, "vq_decode": self.vq_decode}


def bundle_config(preset: str) -> BundleConfig:
    enc = make_encoder("hashing")  # only its dimension matters here; no network is downloaded
    return preset_config(preset, enc.id, "hashing", enc.dim)


def _inputs(cfg: BundleConfig, batch: int, device: torch.device | str, guided: bool):
    """Network inputs at the default crops, batch ``batch`` (doubled for the guided UNet calls)."""
    lat = tuple(s // cfg.vq_factor for s in cfg.crop.linet_size)
    nb = 2 * batch if guided else batch
    return {
        "lmnet": torch.randn(nb, 4, *cfg.crop.lmnet_size, device=device),
        "linet": torch.randn(nb, cfg.latent_channels + 1, *lat, device=device),
        "ctx": torch.zeros(nb, 8, cfg.text_dim, device=device),
        "t": torch.full((nb,), 500, device=device, dtype=torch.long),
        "image": torch.rand(batch, 1, *cfg.crop.linet_size, device=device) * 2 - 1,
    }


def count(preset: str) -> tuple[BundleConfig, StageFlops]:
    """Exact FLOP counts of one lesion's network calls (meta device: shapes only, no compute)."""
    cfg = bundle_config(preset)
    guided = cfg.schedule.guidance_scale != 1.0
    flops = {}
    with torch.device("meta"), torch.inference_mode():
        nets = Bundle.build_networks(cfg)
        x = _inputs(cfg, 1, "meta", guided)
        calls = {
            "lmnet_step": lambda: nets["lmnet"](x["lmnet"], timesteps=x["t"], context=x["ctx"]),
            "linet_step": lambda: nets["linet"](x["linet"], timesteps=x["t"], context=x["ctx"]),
            "vq_encode": lambda: nets["vqgan"].encode_stage_2_inputs(x["image"]),
        }
        for name, call in calls.items():
            with FlopCounterMode(display=False) as fc:
                out = call()
            flops[name] = float(fc.get_total_flops())
            if name == "vq_encode":
                z = out
        with FlopCounterMode(display=False) as fc:
            nets["vqgan"].decode_stage_2_outputs(z)
        flops["vq_decode"] = float(fc.get_total_flops())
    return cfg, StageFlops(**flops)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(preset: str, device: torch.device, batch: int, repeats: int) -> dict[str, float]:
    """Seconds per lesion of one call of each stage at batch ``batch`` (best of ``repeats``)."""
    cfg = bundle_config(preset)
    bundle = Bundle.init(preset, "hashing", seed=0, phrases=["organ: kidney"]).to(device)
    guided = cfg.schedule.guidance_scale != 1.0
    x = _inputs(cfg, batch, device, guided)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    calls = {
        "lmnet_step": lambda: bundle.lmnet(x["lmnet"], timesteps=x["t"], context=x["ctx"]),
        "linet_step": lambda: bundle.linet(x["linet"], timesteps=x["t"], context=x["ctx"]),
        "vq": lambda: bundle.vqgan.decode_stage_2_outputs(bundle.vqgan.encode_stage_2_inputs(x["image"])),
    }
    out = {}
    with torch.inference_mode(), amp:
        for name, call in calls.items():
            call()  # warm-up: kernels, allocator, autotuning
            _sync(device)
            best = float("inf")
            for _ in range(repeats):
                t = time.perf_counter()
                call()
                _sync(device)
                best = min(best, time.perf_counter() - t)
            out[name] = best / batch
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del bundle
    return out


def sampler_overhead(preset: str, device: torch.device, steps: int = 20) -> dict[str, float]:
    """Seconds per DDIM step spent outside the networks (guidance batching, input concatenation, the
    scheduler update): both samplers run with a stand-in network that returns zeros instantly."""
    from lesiondiffusion import sampling as S

    cfg = bundle_config(preset)
    lat = tuple(s // cfg.vq_factor for s in cfg.crop.linet_size)
    g = cfg.schedule.guidance_scale
    zero = lambda inp, timesteps, context: torch.zeros_like(inp[:, :1] if inp.shape[1] == 4 else inp[:, :-1])  # noqa: E731
    ctx = torch.zeros(1, 8, cfg.text_dim, device=device)
    out = {}
    with torch.inference_mode():
        cond = torch.rand(1, 3, *cfg.crop.lmnet_size, device=device)
        noise = torch.randn(1, 1, *cfg.crop.lmnet_size, device=device)
        z0 = torch.randn(1, cfg.latent_channels, *lat, device=device)
        mask = (torch.rand(1, 1, *lat, device=device) > 0.5).float()
        runs = {"lmnet": lambda sch: S.sample_mask(zero, cond, ctx, sch, noise, g),
                "linet": lambda sch: S.inpaint_latent(zero, z0, mask, ctx, sch, torch.randn_like(z0), g)}
        for name, run in runs.items():
            sch = S.make_ddim(cfg.schedule, name, steps)
            run(sch)
            _sync(device)
            t = time.perf_counter()
            run(sch)
            _sync(device)
            out[name] = (time.perf_counter() - t) / steps
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="tiny,paper")
    p.add_argument("--steps", default="", help="extra DDIM step counts beside each preset's default, e.g. 50,200")
    p.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS,
                   help="peak of the device the floor is computed for (default: H100/H200 bf16 dense)")
    p.add_argument("--measure", action="store_true", help="also time the stages on --device")
    p.add_argument("--measure-presets", default=None, help="presets to time (default: all on CUDA, tiny on CPU)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", default="1", help="lesions per network batch for the timing, e.g. 1,8")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads for CPU timing")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else "-"
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"GPU {gpu}; floor at {args.peak_tflops:g} TFLOP/s")
    timed = set((args.measure_presets or ("tiny,paper" if device.type == "cuda" else "tiny")).split(","))
    extra = [int(s) for s in args.steps.split(",") if s]
    for preset in args.presets.split(","):
        t0 = time.perf_counter()
        cfg, fl = count(preset)
        lat = tuple(s // cfg.vq_factor for s in cfg.crop.linet_size)
        g = cfg.schedule.guidance_scale
        print(f"\n== {preset}: LMNet crop {tuple(cfg.crop.lmnet_size)}, image crop {tuple(cfg.crop.linet_size)}, latent "
              f"{cfg.latent_channels} x {lat}, guidance {g:g} ({'2 branches' if g != 1.0 else '1 branch'} per step); "
              f"counted in {time.perf_counter() - t0:.2f} s on meta")
        print(f"   per call (GFLOP): LMNet step {fl.lmnet_step / 1e9:.2f}, LINet step {fl.linet_step / 1e9:.2f}, "
              f"VQ encode {fl.vq_encode / 1e9:.2f}, VQ decode {fl.vq_decode / 1e9:.2f}")
        meas = {}
        if args.measure and preset in timed:
            for b in [int(v) for v in args.batch.split(",")]:
                meas[b] = measure(preset, device, b, args.repeats)
        print(f"   {'steps':>5} | {'LMNet':>9} {'VQ enc':>9} {'LINet':>9} {'VQ dec':>9} {'total':>9} (TFLOP/lesion) | "
              f"floor s/lesion" + "".join(f" | batch {b}: measured s/lesion, lesions/s, util" for b in meas))
        for steps in [cfg.schedule.ddim_steps] + [s for s in extra if s != cfg.schedule.ddim_steps]:
            per = fl.per_lesion(steps)
            total = sum(per.values())
            floor = total / (args.peak_tflops * 1e12)
            cells = ""
            for b, m in meas.items():
                sec = m["vq"] + steps * (m["lmnet_step"] + m["linet_step"])
                cells += f" | {sec:9.3f} s {1 / sec:8.2f}/s {100 * floor / sec:6.1f}%"
            print(f"   {steps:5d} | " + " ".join(f"{per[k] / 1e12:9.4f}" for k in ("lmnet", "vq_encode", "linet", "vq_decode"))
                  + f" {total / 1e12:9.4f} | {floor:14.4f}" + cells)
        for b, m in meas.items():
            mem = f", peak {m['peak_gib']:.1f} GiB" if "peak_gib" in m else ""
            print(f"   measured batch {b} ({device}): LMNet step {m['lmnet_step']:.4f} s, LINet step "
                  f"{m['linet_step']:.4f} s, VQ enc+dec {m['vq']:.4f} s per lesion{mem}")
        if args.measure and preset in timed:
            ov = sampler_overhead(preset, device)
            share = ""
            if 1 in meas:
                share = (f" ({100 * ov['lmnet'] / meas[1]['lmnet_step']:.1f}% / "
                         f"{100 * ov['linet'] / meas[1]['linet_step']:.1f}% of a batch-1 network step)")
            print(f"   sampler outside the networks: LMNet {1e3 * ov['lmnet']:.2f} ms/step, LINet "
                  f"{1e3 * ov['linet']:.2f} ms/step{share}")


if __name__ == "__main__":
    main()
