"""Seconds and peak memory per lesion of the LesionDiffusion pipeline (``LesionSynthesizer``).

Part 0 follows one lesion through the shipped tiny bundle (``--bundle``) stage by stage: placement, text
context, crop and resampling, LMNet network and sampler, mask checks, VQ encode, LINet network and
sampler, VQ decode, HU correction, blend, result assembly, the trainer's case crop and the .npz write of
the store's spool, with the share that is not network time (``--stages-only --threads 1``: per-stage
CPU seconds of one core).
Part 1 runs the whole pipeline (placement -> LMNet -> LINet -> blend) on a real CT with a randomly
initialised bundle: DDIM steps, CFG on/off, crop around the box vs whole volume, batch 1 vs N.
Cost is linear in the number of DDIM steps, so each configuration is timed at two step counts and
``t(steps) = fixed + per_step * steps`` gives the other step counts (marked "fit"; "run" = measured).
Part 2 times the networks alone (one UNet step, VQ encode + decode) for each preset at its crop size;
the paper preset is too slow for whole runs on a 2-core CPU, so its per-lesion figures are
fixed + steps x per-step, from one measured step.

    python benchmarks/bench_synthesis.py                       # tiny pipeline + tiny/paper networks, CPU
    python benchmarks/bench_synthesis.py --stages-only --threads 1 --phantom   # per-stage table only
    python benchmarks/bench_synthesis.py --presets tiny        # skip the paper networks (minutes on CPU)
    python benchmarks/bench_synthesis.py --device cuda --pipeline-presets tiny,paper

Random weights change no cost (same operations); mask checks are relaxed and retries disabled so every
lesion costs exactly one LMNet and one LINet sampling run. Peak memory: CPU = peak resident set growth
during the call (sampled every 2 ms); CUDA = torch.cuda.max_memory_allocated growth.

Times are printed as ``wall/cpu``: cpu is this process's CPU time. On a shared, oversubscribed machine the
wall time mostly measures the neighbours; with ``--threads 1`` the CPU time is what the run costs on one
idle core, which is the figure to compare between configurations.
"""

from __future__ import annotations

import argparse
import os
import platform
import threading
import time
from pathlib import Path

import torch

DEFAULT_CT = Path(__file__).resolve().parents[2] / "shared" / "data" / "ct" / "totalsegmentator_example"


class PeakMemory:
    """Peak memory growth (MiB) over a block: CUDA allocator stats, or sampled RSS on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mib = 0.0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            self._base = self._rss()
            self._top = self._base
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.is_set():
            self._top = max(self._top, self._rss())
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_mib = (torch.cuda.max_memory_allocated() - self._base) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self._top = max(self._top, self._rss())
            self.peak_mib = (self._top - self._base) / 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def load_scene(ct_dir: Path | None):
    """The shared example CT, or (``None``) a procedural phantom: machines without ../shared, e.g. a GPU box."""
    from lesiondiffusion.io import load_nifti
    from lesiondiffusion.organs import load_organ_map, organ_map_from_array

    if ct_dir is None:
        from lesiondiffusion.phantoms import make_phantom

        ph = make_phantom((192, 192, 128), (1.5, 1.5, 2.0), seed=0)
        return ph.ct, organ_map_from_array(ph.organs, ph.affine, "v2")
    ct, _, _ = load_nifti(ct_dir / "example_ct_sm.nii.gz")
    organs = load_organ_map(ct_dir / "example_seg.nii.gz", "v2")
    return ct, organs


def pipeline_part(args, device: torch.device) -> None:
    from lesiondiffusion.bundle import Bundle
    from lesiondiffusion.catalog import load_catalog
    from lesiondiffusion.pipeline import LesionSynthesizer, SynthesisConfig

    ct, organs = load_scene(None if args.phantom else args.ct_dir)
    catalog = load_catalog("kidney_tumor")
    fixed = {"size_mm": args.size_mm, "lesion_location": "within the parenchymal organ"}
    reports = [catalog.sample(i, fixed) for i in range(args.batch)]
    steps_list = [int(s) for s in args.steps.split(",")]
    scene = "a phantom" if args.phantom else f"{args.ct_dir.name}/example_ct_sm.nii.gz"
    print(f"\n== Part 1: whole pipeline on {scene} {ct.shape} @ "
          f"{organs.spacing} mm, kidney lesion {args.size_mm} mm, device {device}")
    print(f"{'preset':6} {'mode':6} {'cfg':3} {'batch':5} | " + " | ".join(f"{s:>4} steps s/lesion (wall/cpu)" for s in steps_list)
          + " | fixed s | s/step | peak MiB/lesion")
    for preset in args.pipeline_presets.split(","):
        bundle = Bundle.init(preset, "hashing", seed=0)
        configs = [("crop", 2.5, 1), ("crop", 1.0, 1), ("crop", 2.5, args.batch)]
        if (preset == "tiny" or device.type == "cuda") and not args.skip_whole:
            configs.append(("whole", 2.5, 1))
        for mode, guidance, batch in configs:
            if mode == "whole" and preset != "tiny":
                continue
            base = dict(guidance_scale=guidance, batch_size=batch, use_crop=(mode == "crop"), max_retries=0,
                        min_volume_fraction=0.0, min_organ_fraction=0.0)
            lo_steps, hi_steps = (args.fit_steps_whole if mode == "whole" else args.fit_steps)
            if preset == "paper" and device.type != "cuda":
                lo_steps, hi_steps = 1, 2
            times, cpus, mems = {}, {}, {}
            warm = LesionSynthesizer(bundle, device, SynthesisConfig(ddim_steps=1, **base))
            warm(ct, organs, reports[:batch], catalog, seed=0)  # kernels, allocator, caches
            measure = sorted({lo_steps, hi_steps} | {s for s in steps_list if s <= args.max_direct_steps and mode == "crop" and preset == "tiny" and batch == 1 and guidance != 1.0})
            for steps in measure:
                synth = LesionSynthesizer(bundle, device, SynthesisConfig(ddim_steps=steps, **base))
                dt = dc = float("inf")
                for _ in range(args.repeats if mode == "crop" else 1):  # best of N: neighbours only add time
                    _sync(device)
                    with PeakMemory(device) as mem:
                        t, c = time.perf_counter(), time.process_time()
                        res = synth(ct, organs, reports[:batch], catalog, seed=0)
                        _sync(device)
                        dt, dc = min(dt, time.perf_counter() - t), min(dc, time.process_time() - c)
                failed = [r.failure for r in res if not r.ok]
                if failed:
                    print(f"   note: {len(failed)} lesion(s) failed ({failed[0]}); timing still covers their networks")
                times[steps] = dt / batch
                cpus[steps] = dc / batch
                mems[steps] = mem.peak_mib / batch

            def fit(values):
                per = (values[hi_steps] - values[lo_steps]) / (hi_steps - lo_steps)
                return values[lo_steps] - per * lo_steps, per

            (fw, pw), (fc, pc) = fit(times), fit(cpus)
            cells = []
            for s in steps_list:
                if s in times:
                    cells.append(f"{times[s]:7.2f}/{cpus[s]:7.2f} run")
                else:
                    cells.append(f"{fw + pw * s:7.2f}/{fc + pc * s:7.2f} fit")
            crop = res[0].info.get("image_crop") if res and res[0].info else None
            print(f"{preset:6} {mode:6} {'on' if guidance != 1.0 else 'off':3} {batch:5} | " + " | ".join(cells)
                  + f" | {fw:6.2f}/{fc:6.2f} | {pw:6.3f}/{pc:6.3f} | {max(mems.values()):7.1f} (crop {crop})")


class StageClock:
    """Exclusive wall and CPU seconds per named stage: wrappers push a stage on entry and pop it on exit,
    so nested stages (the LMNet network inside its sampler) are charged to the innermost one and every
    second of the call lands in exactly one row. Installed by the benchmark only (the pipeline carries no
    hooks), so production calls pay nothing."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.stack: list[str] = []
        self._last = (0.0, 0.0)

    def _now(self) -> tuple[float, float]:
        _sync(self.device)  # GPU: a stage's kernels are charged to it, not to whatever synchronises next
        return time.perf_counter(), time.process_time()

    def _charge(self, now: tuple[float, float]) -> None:
        if self.stack:
            top = self.stack[-1]
            self.wall[top] = self.wall.get(top, 0.0) + now[0] - self._last[0]
            self.cpu[top] = self.cpu.get(top, 0.0) + now[1] - self._last[1]
        self._last = now

    def push(self, name: str) -> None:
        self._charge(self._now())
        self.stack.append(name)

    def pop(self) -> None:
        self._charge(self._now())
        self.stack.pop()

    def wrap(self, name: str, fn):
        import functools

        @functools.wraps(fn)
        def timed(*a, **k):
            self.push(name)
            try:
                return fn(*a, **k)
            finally:
                self.pop()
        return timed


NETWORK_STAGES = ("LMNet network", "VQ encode", "LINet network", "VQ decode")
STAGE_ORDER = ("placement", "text context", "crop + resampling", "LMNet network", "LMNet sampler (DDIM, inputs)",
               "mask checks", "VQ encode", "LINet network", "LINet sampler (DDIM, inputs)", "VQ decode",
               "HU correction", "blend", "result assembly", "case crop (trainer)", "writing (.npz spool)",
               "other (pipeline glue)")


def instrument(synth, clock: StageClock):
    """Wrap the pipeline's stages with ``clock`` (monkeypatching module globals and the instance);
    returns a function that undoes it."""
    import lesiondiffusion.mask_acceptance as MA
    import lesiondiffusion.pipeline as P

    b = synth.bundle
    undo = []

    def patch(obj, attr, name):
        old = getattr(obj, attr)
        had_own = attr in vars(obj)
        setattr(obj, attr, clock.wrap(name, old))
        undo.append(lambda: setattr(obj, attr, old) if had_own else delattr(obj, attr))

    patch(P, "place_lesion", "placement")  # the name the pipeline calls
    patch(b, "context", "text context")
    for attr in ("_prepare",):
        patch(synth, attr, "crop + resampling")
    patch(P, "_forward_region", "crop + resampling")
    patch(MA, "sample_to_grid", "crop + resampling")  # called by the mask checks
    patch(P.CropGeometry, "back", "crop + resampling")  # the generated patch back onto the CT grid
    patch(P, "sample_mask", "LMNet sampler (DDIM, inputs)")
    patch(b.lmnet, "forward", "LMNet network")
    patch(synth, "_accept_mask", "mask checks")
    patch(b.vqgan, "encode_stage_2_inputs", "VQ encode")
    patch(P, "inpaint_latent", "LINet sampler (DDIM, inputs)")
    patch(b.linet, "forward", "LINet network")
    patch(b.vqgan, "decode_stage_2_outputs", "VQ decode")
    patch(P, "correct_hu", "HU correction")
    patch(P, "blend", "blend")
    patch(synth, "_result", "result assembly")

    def restore():
        for u in reversed(undo):
            u()
    return restore


def case_from_result(result, context: int = 24):
    """What the trainer's factory does after synthesis (``SyntheticCaseFactory._case`` without the plans):
    crop the lesion with context, int16 label, float32 data, foreground locations."""
    import numpy as np

    from lesiondiffusion.store import SyntheticCase

    mask = np.asarray(result.lesion_mask) > 0
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(0) - context, 0)
    hi = np.minimum(idx.max(0) + 1 + context, mask.shape)
    sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    seg = mask[sl].astype(np.int16)[None]
    data = np.array(result.image[sl], dtype=np.float32)[None]
    return SyntheticCase("synth_0", data, seg, {"class_locations": {1: np.argwhere(seg > 0)}}, {"seed": 0})


def stages_part(args, device: torch.device) -> dict[str, tuple[float, float]]:
    """Per-stage seconds of one lesion through the whole pipeline with the shipped (or given) bundle."""
    import tempfile

    from lesiondiffusion.bundle import Bundle
    from lesiondiffusion.catalog import load_catalog
    from lesiondiffusion.pipeline import LesionSynthesizer, SynthesisConfig
    from lesiondiffusion.store import save_case

    ct, organs = load_scene(None if args.phantom else args.ct_dir)
    catalog = load_catalog("kidney_tumor")
    report = [catalog.sample(0, {"size_mm": args.size_mm, "lesion_location": "within the parenchymal organ"})]
    bundle = Bundle.load(args.bundle, device=device)
    synth = LesionSynthesizer(bundle, device, SynthesisConfig(ddim_steps=args.stage_steps, max_retries=0,
                                                              min_volume_fraction=0.0, min_organ_fraction=0.0))
    synth(ct, organs, report, catalog, seed=0)  # warm-up: kernels, allocator, phrase cache
    runs = []
    spool = Path(tempfile.mkdtemp(prefix="ld_stage_", dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None))
    for r in range(args.repeats):
        clock = StageClock(device)
        restore = instrument(synth, clock)
        try:
            clock.push("other (pipeline glue)")
            res = synth(ct, organs, report, catalog, seed=r)
            clock.pop()
        finally:
            restore()
        if res[0].ok:
            clock.push("case crop (trainer)")
            case = case_from_result(res[0])
            clock.pop()
            clock.push("writing (.npz spool)")
            save_case(spool / f"case_{r}.npz", case)
            clock.pop()
        else:
            print(f"   note: the lesion failed ({res[0].failure}); its networks are still timed")
        runs.append(clock)
    for p in spool.glob("*"):
        p.unlink()
    spool.rmdir()
    # the run with the least time (CPU time on a CPU, wall on a GPU): neighbours only ever add time
    share = (lambda c: c.cpu) if device.type == "cpu" else (lambda c: c.wall)
    best = min(runs, key=lambda c: sum(share(c).values()))
    total_w, total_c = sum(best.wall.values()), sum(best.cpu.values())
    net_w = sum(best.wall.get(s, 0.0) for s in NETWORK_STAGES)
    net_c = sum(best.cpu.get(s, 0.0) for s in NETWORK_STAGES)
    total_s = sum(share(best).values())
    scene = "a phantom" if args.phantom else f"{args.ct_dir.name}/example_ct_sm.nii.gz"
    print(f"\n== Part 0: one lesion, stage by stage: bundle {args.bundle}, {args.stage_steps} DDIM steps, CFG "
          f"{bundle.config.schedule.guidance_scale:g}, {scene} {ct.shape}, crop {res[0].info.get('image_crop')}, "
          f"device {device}, torch threads {torch.get_num_threads()}, best of {args.repeats} by "
          f"{'CPU' if device.type == 'cpu' else 'wall'} time")
    print(f"{'stage':32s} {'wall s':>8s} {'cpu s':>8s} {'share %':>7s}")
    for name in STAGE_ORDER:
        if name in best.wall:
            print(f"{name:32s} {best.wall[name]:8.3f} {best.cpu[name]:8.3f} {100 * share(best)[name] / total_s:7.1f}")
    print(f"{'total':32s} {total_w:8.3f} {total_c:8.3f} {100.0:6.1f}")
    print(f"not network (everything but LMNet/LINet forwards and VQ encode/decode): wall "
          f"{100 * (1 - net_w / total_w):.1f} %, cpu {100 * (1 - net_c / total_c):.1f} %")
    return {k: (best.wall[k], best.cpu[k]) for k in best.wall}


def network_part(args, device: torch.device) -> None:
    from lesiondiffusion.bundle import Bundle
    from lesiondiffusion import sampling as S

    steps_list = [int(s) for s in args.steps.split(",")]
    clock = "cpu" if device.type == "cpu" else "wall"
    print(f"\n== Part 2: networks alone per lesion (batch 1), device {device}, {clock} seconds")
    print(f"{'preset':6} {'LMNet crop':>12} {'LINet crop':>12} | VQ enc+dec s | LMNet s/step cfg on/off | "
          "LINet s/step cfg on/off | " + " | ".join(f"{s} steps s (cfg on)" for s in steps_list) + " | peak MiB")
    for preset in args.presets.split(","):
        bundle = Bundle.init(preset, "hashing", seed=0, phrases=["organ: kidney"]).to(device)
        cfg = bundle.config
        m, i = cfg.crop.lmnet_size, cfg.crop.linet_size
        lat = tuple(s // cfg.vq_factor for s in i)
        ctx = torch.zeros(1, 8, cfg.text_dim, device=device)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

        def step_time(net, channels, size, guidance):
            x = torch.randn(1, channels, *size, device=device)
            model = lambda inp, timesteps, context: net(inp, timesteps=timesteps, context=context)  # noqa: E731
            with torch.inference_mode(), autocast:
                if args.warmup:
                    S.guided_noise(model, x, 500, ctx, guidance)
                _sync(device)
                best = float("inf")
                for _ in range(args.repeats):
                    t = time.process_time() if clock == "cpu" else time.perf_counter()
                    S.guided_noise(model, x, 500, ctx, guidance)
                    _sync(device)
                    best = min(best, (time.process_time() if clock == "cpu" else time.perf_counter()) - t)
            return best

        with PeakMemory(device) as mem:
            with torch.inference_mode():
                x = torch.rand(1, 1, *i, device=device) * 2 - 1
                if args.warmup:
                    bundle.vqgan.decode_stage_2_outputs(bundle.vqgan.encode_stage_2_inputs(x))
                _sync(device)
                t = time.process_time() if clock == "cpu" else time.perf_counter()
                bundle.vqgan.decode_stage_2_outputs(bundle.vqgan.encode_stage_2_inputs(x))
                _sync(device)
                vq = (time.process_time() if clock == "cpu" else time.perf_counter()) - t
            lm_on, lm_off = step_time(bundle.lmnet, 4, m, 2.5), step_time(bundle.lmnet, 4, m, 1.0)
            li_on, li_off = step_time(bundle.linet, cfg.latent_channels + 1, lat, 2.5), step_time(bundle.linet, cfg.latent_channels + 1, lat, 1.0)
        totals = [vq + s * (lm_on + li_on) for s in steps_list]
        print(f"{preset:6} {str(tuple(m)):>12} {str(tuple(i)):>12} | {vq:12.2f} | {lm_on:9.3f} / {lm_off:9.3f} | "
              f"{li_on:9.3f} / {li_off:9.3f} | " + " | ".join(f"{t:10.1f}" for t in totals) + f" | {mem.peak_mib:8.0f}")
        del bundle
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2, the CI machine)")
    p.add_argument("--ct-dir", type=Path, default=DEFAULT_CT, help="folder with example_ct_sm.nii.gz + example_seg.nii.gz")
    p.add_argument("--phantom", action="store_true", help="part 1 on a procedural phantom instead of --ct-dir")
    p.add_argument("--steps", default="10,50,200", help="DDIM step counts to report")
    p.add_argument("--fit-steps", type=int, nargs=2, default=(2, 10), help="step counts timed for the linear fit (crop)")
    p.add_argument("--fit-steps-whole", type=int, nargs=2, default=(1, 2), help="step counts timed for whole-volume runs")
    p.add_argument("--max-direct-steps", type=int, default=50, help="also run these step counts directly (tiny, batch 1, cfg on)")
    p.add_argument("--batch", type=int, default=4, help="N for the batch 1 vs N comparison")
    p.add_argument("--size-mm", default="30,30,30", help="lesion extent")
    p.add_argument("--presets", default="tiny,paper", help="presets for part 2 (networks alone)")
    p.add_argument("--pipeline-presets", default="tiny", help="presets for part 1 (whole pipeline)")
    p.add_argument("--repeats", type=int, default=2, help="timing repeats (best is kept; whole-volume runs once)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false", help="part 2: skip the warm-up pass (paper on CPU)")
    p.add_argument("--skip-pipeline", action="store_true")
    p.add_argument("--skip-whole", action="store_true",
                   help="skip the whole-volume runs (self-attention over every latent cell: minutes on CPU)")
    p.add_argument("--skip-networks", action="store_true")
    p.add_argument("--bundle", type=Path, default=Path(__file__).resolve().parents[1] / "src" / "lesiondiffusion" / "data"
                   / "demo_bundle", help="part 0 (stage by stage): bundle folder (default: the shipped tiny bundle)")
    p.add_argument("--stage-steps", type=int, default=10, help="part 0: DDIM steps per network")
    p.add_argument("--skip-stages", action="store_true", help="skip part 0 (one lesion, stage by stage)")
    p.add_argument("--stages-only", action="store_true", help="run only part 0")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else "-"
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, torch threads "
          f"{torch.get_num_threads()}, load average {load[0]:.2f} at start, torch {torch.__version__}, GPU {gpu}")
    if not args.skip_stages:
        stages_part(args, device)
    if args.stages_only:
        return
    if not args.skip_pipeline:
        pipeline_part(args, device)
    if not args.skip_networks:
        network_part(args, device)


if __name__ == "__main__":
    main()
