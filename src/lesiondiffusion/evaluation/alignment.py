"""The prompt-alignment study: N lesions per shape and density prompt value, measured with
``metrics`` (sphericity, convexity, HU against the surrounding organ); table, CSV and scatter plot."""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..errors import CatalogError, LesionDiffusionError
from ..io import atomic_path, write_csv
from .metrics import convexity, hu_stats, sphericity

if TYPE_CHECKING:
    from ..catalog import Catalog
    from ..generator import LesionGenerator
    from ..organs import OrganMap



@dataclass
class AlignmentSample:
    group: str           # "shape" or "density"
    prompt: str
    seed: int
    ok: bool
    failure: str = ""
    sphericity: float = float("nan")
    convexity: float = float("nan")
    volume_mm3: float = float("nan")
    lesion_hu_mean: float = float("nan")
    lesion_hu_std: float = float("nan")
    organ_hu_mean: float = float("nan")
    organ_hu_std: float = float("nan")


@dataclass
class AlignmentResult:
    samples: list[AlignmentSample] = field(default_factory=list)

    def summary(self) -> list[dict[str, Any]]:
        rows = []
        keys = sorted({(s.group, s.prompt) for s in self.samples}, key=lambda k: (k[0] != "shape", k[1]))
        for g, p in keys:
            ss = [s for s in self.samples if s.group == g and s.prompt == p]
            ok = [s for s in ss if s.ok]

            def agg(attr: str) -> tuple[float, float]:
                v = np.array([getattr(s, attr) for s in ok], float)
                v = v[np.isfinite(v)]
                return (float(v.mean()), float(v.std())) if v.size else (float("nan"), float("nan"))

            row = {"group": g, "prompt": p, "n": len(ok), "failed": len(ss) - len(ok)}
            for attr in ("sphericity", "convexity", "volume_mm3", "lesion_hu_mean", "lesion_hu_std",
                         "organ_hu_mean"):
                m, s = agg(attr)
                row[f"{attr}_mean"] = m
                row[f"{attr}_sd"] = s
            rows.append(row)
        return rows


def prompt_values(catalog: "Catalog", attribute: str) -> list[str]:
    """Values of one attribute the catalog allows (its domain; zero-weight values can still be
    prompted), in catalog order."""
    return list(catalog.domain(attribute))


def uncorrected(generator: "LesionGenerator") -> "LesionGenerator":
    """``generator`` with its HU correction off: a shallow copy (same networks) when its ``config`` has a
    ``hu_correction`` other than ``off``, else ``generator`` itself."""
    cfg = getattr(generator, "config", None)
    if cfg is None or getattr(cfg, "hu_correction", "off") == "off" or not dataclasses.is_dataclass(cfg):
        return generator
    out = copy.copy(generator)
    out.config = dataclasses.replace(cfg, hu_correction="off")  # type: ignore[attr-defined]
    return out


def run_alignment(
    generator: "LesionGenerator",
    ct: np.ndarray,
    organs: "OrganMap",
    catalog: "Catalog",
    n: int,
    *,
    seed: int = 0,
    groups: Sequence[str] = ("shape", "density"),
    progress: bool = True,
) -> AlignmentResult:
    """Generate ``n`` lesions per value of each prompt group with every other attribute sampled,
    and measure shape (masks) and HU (images) per sample.

    Always the model's own intensities: a synthesizer whose ``config.hu_correction`` is not ``off`` runs
    here with it off (a correction moves every lesion into the prompt's HU range and would measure the
    catalog), and a result that says it was HU-corrected anyway is an error, never a figure."""
    from tqdm.auto import tqdm

    generator = uncorrected(generator)

    spacing = organs.spacing
    voxel_mm3 = float(np.prod(spacing))
    prompts = [(g, v) for g in groups for v in prompt_values(catalog, g)]
    result = AlignmentResult()
    bar = tqdm(total=len(prompts) * n, desc=f"alignment {catalog.name}", unit="lesion", disable=not progress)
    for k, (g, v) in enumerate(prompts):
        # one batched generator call per prompt value; every report has its own sampling seed
        base = seed + 100_003 * k
        reports, seeds = [], []
        for i in range(n):
            try:
                reports.append(catalog.sample(base + i, fixed={g: v}))
                seeds.append(base + i)
            except CatalogError as exc:
                result.samples.append(AlignmentSample(g, v, base + i, False, f"sampling: {exc}"))
        results = generator(ct, organs, reports, catalog, seed=base) if reports else []
        for s, report, res in zip(seeds, reports, results):
            if not res.ok:
                result.samples.append(AlignmentSample(g, v, s, False, str(res.failure)))
                continue
            if res.info.get("hu_corrected"):
                raise LesionDiffusionError(
                    f"alignment {catalog.name}, {g}={v!r}, seed {s}: the generator HU-corrected the lesion "
                    f"({res.info.get('hu_correction')}); alignment measures the model's own intensities, so run "
                    "the generator with hu_correction='off'."
                )
            mask = res.lesion_mask.astype(bool)
            organ_names = res.box.organ_names if res.box is not None else catalog.organ_names(report.organ)
            st = hu_stats(res.image, mask, organs.mask(organ_names))
            result.samples.append(AlignmentSample(
                g, v, s, True, "",
                sphericity=sphericity(mask, spacing), convexity=convexity(mask, spacing),
                volume_mm3=float(mask.sum()) * voxel_mm3,
                lesion_hu_mean=st.lesion_mean, lesion_hu_std=st.lesion_std,
                organ_hu_mean=st.organ_mean, organ_hu_std=st.organ_std,
            ))
        bar.update(n)
    bar.close()
    return result


def format_alignment_table(rows: list[dict[str, Any]]) -> str:
    head = f"{'group':<8} {'prompt':<40} {'n':>3} {'fail':>4} {'spher.':>13} {'convex.':>13} {'lesion HU':>15} {'organ HU':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        def pm(a: str) -> str:
            m, s = r[f"{a}_mean"], r[f"{a}_sd"]
            return "n/a" if math.isnan(m) else f"{m:.2f}±{s:.2f}" if abs(m) < 10 else f"{m:.0f}±{s:.0f}"
        lines.append(
            f"{r['group']:<8} {r['prompt'][:40]:<40} {r['n']:>3} {r['failed']:>4} {pm('sphericity'):>13} "
            f"{pm('convexity'):>13} {pm('lesion_hu_mean'):>15} "
            f"{'n/a' if math.isnan(r['organ_hu_mean_mean']) else format(r['organ_hu_mean_mean'], '.0f'):>9}"
        )
    return "\n".join(lines)


def plot_alignment(result: AlignmentResult, path: str | Path, title: str = "") -> None:
    """Scatter of sphericity vs convexity per shape prompt, and lesion vs organ HU per density prompt."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5))
    shape_prompts = [p for p in dict.fromkeys(s.prompt for s in result.samples if s.group == "shape")]
    for p in shape_prompts:
        ss = [s for s in result.samples if s.group == "shape" and s.prompt == p and s.ok]
        a1.scatter([s.sphericity for s in ss], [s.convexity for s in ss], label=f"{p} (n={len(ss)})", alpha=0.7)
    a1.set_xlabel("sphericity")
    a1.set_ylabel("convexity (volume / convex hull)")
    a1.set_title("mask morphology per shape prompt")
    a1.legend(fontsize=7)
    dens = [p for p in dict.fromkeys(s.prompt for s in result.samples if s.group == "density")]
    for i, p in enumerate(dens):
        ss = [s for s in result.samples if s.group == "density" and s.prompt == p and s.ok]
        x = np.full(len(ss), i, float) + np.linspace(-0.15, 0.15, max(len(ss), 1))[: len(ss)]
        a2.scatter(x, [s.lesion_hu_mean for s in ss], color="C3", alpha=0.7, label="lesion" if i == 0 else None)
        a2.scatter(x + 0.35, [s.organ_hu_mean for s in ss], color="C7", alpha=0.7, marker="s",
                   label="surrounding organ" if i == 0 else None)
    a2.set_xticks(range(len(dens)))
    a2.set_xticklabels([d[:22] for d in dens], rotation=25, ha="right", fontsize=7)
    a2.set_ylabel("mean HU")
    a2.set_title("intensity per density prompt")
    if dens:
        a2.legend(fontsize=7)
    fig.suptitle(title or "prompt alignment")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def write_alignment(result: AlignmentResult, out_dir: str | Path, title: str = "") -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = result.summary()
    paths = {"summary": out / "alignment_summary.csv", "samples": out / "alignment_samples.csv",
             "plot": out / "alignment.png"}
    write_csv(paths["summary"], rows)
    write_csv(paths["samples"], [vars(s) for s in result.samples])
    plot_alignment(result, paths["plot"], title)
    return paths
