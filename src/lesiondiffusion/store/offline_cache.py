"""The offline cache: ``OfflineCache`` writes N synthetic cases to disk once (resumable, atomic,
shardable, with a manifest) and ``OfflineCacheReader`` serves them with no generator loaded."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm import tqdm

from ..errors import LesionDiffusionError, SynthesisError
from ..io import remove_stale_temporaries, write_json
from .case import CaseFactory, SyntheticCase, _jsonable, load_case, save_case, validate_case
from .counters import FRESH, SharedCounters
from .faults import record_fault
from .identity import file_digest, identity_changes

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_FORMAT = 1


def _case_paths(root: Path, index: int) -> tuple[Path, Path]:
    stem = f"synth_{index:06d}"
    return root / "cases" / f"{stem}.npz", root / "cases" / f"{stem}.json"


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count``: owns the case indices ``i`` with ``i % count == index``.

    Case ``i`` always has seed ``seed + i`` and its own file names, so N shards writing one cache folder
    never touch the same file and together produce exactly the cases one unsharded build would.
    """

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> "Shard":
        try:
            k, n = (int(v) for v in str(text).split("/"))
        except ValueError:
            raise LesionDiffusionError(f"--shard {text!r}: write it as K/N, e.g. 0/4 for the first of 4 shards.") from None
        if n < 1 or not 0 <= k < n:
            raise LesionDiffusionError(f"--shard {text!r}: K must be in 0..N-1 and N >= 1 (e.g. 0/4 ... 3/4).")
        return cls(k, n)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "Shard | None":
        """The shard of this process under ``torchrun`` (RANK / WORLD_SIZE), or None outside it."""
        env = dict(os.environ) if env is None else env
        if "RANK" not in env or "WORLD_SIZE" not in env:
            return None
        return cls.parse(f"{env['RANK']}/{env['WORLD_SIZE']}")

    def owns(self, index: int) -> bool:
        return index % self.count == self.index

    def quota(self, n: int) -> int:
        """Good cases this shard contributes to a cache of ``n``; the quotas of all shards sum to ``n``."""
        return len(range(self.index, n, self.count))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def case_is_intact(root: Path, info: dict[str, Any]) -> str | None:
    """Why a cached case file does not match the size and sha256 its sidecar recorded, or None.

    Caches written before sidecars carried hashes are checked by the zip CRCs instead."""
    npz = root / "cases" / info["file"]
    if not npz.is_file():
        return f"{npz} is missing"
    if "sha256" not in info:
        try:
            with zipfile.ZipFile(npz) as z:
                bad = z.testzip()
        except (OSError, zipfile.BadZipFile) as exc:
            return f"{npz} is unreadable ({exc})"
        return None if bad is None else f"{npz}: member {bad} is corrupt"
    if npz.stat().st_size != info.get("bytes"):
        return f"{npz} has {npz.stat().st_size} bytes, the manifest records {info.get('bytes')} (truncated or replaced)"
    if file_digest(npz)[1] != info["sha256"]:
        return f"{npz}: sha256 differs from the manifest's (the file was changed or damaged)"
    return None


class OfflineCache:
    """Build N synthetic cases on disk once: resumable, atomic, shardable, with a manifest of reports and seeds.

    Case ``i`` always uses seed ``seed + i`` and lives in ``cases/synth_{i:06d}.npz`` with a JSON
    sidecar written after it; a failed synthesis leaves ``failed/{i}.json``. A re-run skips every
    index that has a valid sidecar (or a failure record), so an interrupted build finishes without
    duplicates, and a half-written file never appears under a final name. With ``shard=Shard(k, N)``
    a process only works on its own indices until it has its quota of good cases; whichever shard
    finishes and finds ``n`` good cases in the folder writes the manifest (``verify`` does it too).
    """

    def __init__(self, root: str | os.PathLike, identity: dict[str, Any] | None = None) -> None:
        self.root = Path(root)
        self.identity = identity or {}
        self.damaged: list[str] = []  # cases whose file no longer matches its recorded size/sha256

    def _check_identity(self) -> None:
        path = self.root / "identity.json"
        if path.exists():
            old = json.loads(path.read_text())
            new = json.loads(json.dumps(self.identity, default=_jsonable))
            if old != new:
                changes = identity_changes(old, new)
                raise LesionDiffusionError(
                    f"{path}: this cache was built with different settings, so resuming would mix cases of two "
                    f"generators. Changed:\n  " + "\n  ".join(changes) +
                    "\nUse a new output folder, restore the old settings/bundle, or delete the old cache.")
        else:  # shards starting together all write the same content; the rename is atomic
            write_json(path, json.loads(json.dumps(self.identity, default=_jsonable)))

    def build(self, factory: CaseFactory | Callable[[], CaseFactory], n: int, *, seed: int = 0,
              progress: bool = True, lazy: bool = False, max_consecutive_failures: int = 50,
              shard: Shard | None = None) -> dict[str, Any] | None:
        """Synthesise until ``n`` good cases exist (this shard's quota of them with ``shard``);
        ``lazy=True`` means ``factory`` is a builder called only if work remains (so a finished cache
        needs no generator). Returns the manifest, or None when other shards still have work."""
        shard = shard or Shard()
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "cases").mkdir(exist_ok=True)
        (self.root / "failed").mkdir(exist_ok=True)
        for sub in ("cases", "failed"):  # a killed build's half-written temporaries (live builds' are kept)
            remove_stale_temporaries(self.root / sub, r"\.(synth_\d+\.(npz|json)|\d+\.json)\..+")
        self._check_identity()
        good = {i for i in self._valid_indices() if shard.owns(i)}
        # [0-9]*: a concurrent shard's temporary (.12.json.pid...json) is not a record yet
        failed = {int(p.stem) for p in (self.root / "failed").glob("[0-9]*.json")
                  if p.stem.isdigit() and shard.owns(int(p.stem))}
        quota = shard.quota(n)
        desc = "synthetic cases" + (f" (shard {shard})" if shard.count > 1 else "")
        bar = tqdm(total=quota, initial=min(len(good), quota), desc=desc, disable=not progress, unit="case")
        i, consecutive = shard.index, 0
        built = None
        while len(good) < quota:
            if i in good or i in failed:
                i += shard.count
                continue
            if built is None:
                built = factory() if lazy else factory
            case, reason = built(seed + i)
            if case is not None:
                reason = validate_case(case)
            if reason is not None:
                write_json(self.root / "failed" / f"{i}.json", {"index": i, "seed": seed + i, "reason": reason})
                failed.add(i)
                consecutive += 1
                if consecutive >= max_consecutive_failures:
                    raise SynthesisError(f"{consecutive} syntheses in a row failed (last: {reason}); the cache at "
                                         f"{self.root} keeps the {len(good)} finished cases of shard {shard}.")
            else:
                consecutive = 0
                npz, side = _case_paths(self.root, i)
                save_case(npz, case)
                nbytes, digest = file_digest(npz)
                write_json(side, {"index": i, "seed": seed + i, "file": npz.name, "bytes": nbytes, "sha256": digest,
                                  "name": case.name, "meta": json.loads(json.dumps(case.meta, default=_jsonable))})
                good.add(i)
                bar.update(1)
            i += shard.count
        bar.close()
        if shard.count > 1 and len(self._valid_indices()) < n:
            return None  # the last shard to finish sees all n cases and writes the manifest
        return self.write_manifest(n)

    def _valid_indices(self) -> set[int]:
        good = set()
        for side in (self.root / "cases").glob("synth_*.json"):
            try:
                info = json.loads(side.read_text())
                if info.get("file") != side.with_suffix(".npz").name:  # never follow a sidecar elsewhere
                    raise ValueError(f"file {info.get('file')!r}")
                problem = case_is_intact(self.root, info)
                if problem is None:
                    good.add(int(info["index"]))
                    continue
                log.warning("offline cache: %s; set aside in rejected/, the case is rebuilt", problem)
                self.damaged.append(problem)
                self._reject(side, self.root / "cases" / info["file"])
                continue
            except (ValueError, KeyError, OSError, TypeError):
                pass
            # a corrupt sidecar means the case is redone; set aside, never deleted (it may not be ours)
            log.warning("offline cache: %s is not a readable case record; set aside in rejected/", side)
            self._reject(side)
        return good

    def _reject(self, side: Path, npz: Path | None = None) -> None:
        rejected = self.root / "rejected"
        rejected.mkdir(exist_ok=True)
        side.replace(rejected / side.name)  # sidecar first: the index is no longer 'finished'
        if npz is not None and npz.exists():
            npz.replace(rejected / npz.name)

    def verify(self, n: int | None = None) -> tuple[dict[str, Any], list[str]]:
        """Load every finished case, move unreadable or invalid ones to ``rejected/`` (a re-run of the
        build redoes them) and write the manifest of the rest; returns (manifest, problems)."""
        identity = self.root / "identity.json"
        # identity.json is the first file `cache build` writes: without it (or a manifest) the folder is not
        # a cache, and verify would move or rewrite files some other program owns
        if not (self.root / "cases").is_dir() or not (identity.is_file() or (self.root / MANIFEST).is_file()):
            raise LesionDiffusionError(f"{self.root}: not an offline cache (no cases/ folder with the identity.json "
                                       "that 'lesiondiffusion cache build' writes); nothing was changed. Pass the "
                                       "folder 'cache build' wrote, or build one with 'lesiondiffusion cache build'.")
        if not self.identity and identity.is_file():
            try:
                self.identity = json.loads(identity.read_text())
            except (OSError, ValueError) as exc:
                raise LesionDiffusionError(f"{identity} is unreadable ({exc}); nothing was changed. Rebuild the cache "
                                           "with 'lesiondiffusion cache build' into a new folder.") from None
        problems = []
        for idx in sorted(self._valid_indices()):  # damaged files are dropped here (self.damaged)
            npz, side = _case_paths(self.root, idx)
            try:
                reason = validate_case(load_case(npz))
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
                reason = f"unreadable ({type(exc).__name__}: {exc})"
            if reason is not None:
                problems.append(f"{npz.name}: {reason}")
                self._reject(side, npz)
        return self.write_manifest(n), self.damaged + problems

    def write_manifest(self, n: int | None = None) -> dict[str, Any]:
        cases = []
        for idx in sorted(self._valid_indices()):
            _, side = _case_paths(self.root, idx)
            cases.append(json.loads(side.read_text()))
        if n is not None:
            cases = cases[:n]
        failures = [json.loads(p.read_text()) for p in sorted((self.root / "failed").glob("[0-9]*.json"))
                    if p.stem.isdigit()]
        manifest = {"format": _FORMAT, "identity": self.identity, "n_cases": len(cases), "cases": cases,
                    "failures": failures}
        write_json(self.root / MANIFEST, json.loads(json.dumps(manifest, default=_jsonable)))
        return manifest


class OfflineCacheReader:
    """Serves cases of a built cache at random (no generator, no producer); counts draws as hits."""

    def __init__(self, root: str | os.PathLike, counters: SharedCounters | None = None,
                 expect: dict[str, Any] | None = None) -> None:
        self.root = Path(root)
        path = self.root / MANIFEST
        if not path.is_file():
            if any((self.root / "cases").glob("synth_*.npz")):
                raise LesionDiffusionError(
                    f"The offline cache at {self.root} has cases but no {MANIFEST}: a sharded build has not finished. "
                    f"Finish every shard (re-run its 'lesiondiffusion cache build --shard K/N'), or write the manifest "
                    f"of the cases there with 'lesiondiffusion cache verify {self.root}'.")
            raise LesionDiffusionError(
                f"No offline cache at {self.root} ({MANIFEST} missing). Build it with 'lesiondiffusion cache build "
                "--config CFG --dataset DATASET -n N', or set mode: online.")
        manifest = json.loads(path.read_text())
        if not manifest.get("cases"):
            raise LesionDiffusionError(f"{path}: the cache holds no cases; rebuild it with 'lesiondiffusion cache build'.")
        for key, value in (expect or {}).items():
            have = manifest.get("identity", {}).get(key)
            if have != value:
                raise LesionDiffusionError(
                    f"{path}: identity key '{key}' is {have!r} but training uses {value!r}; rebuild the cache for "
                    "these plans/configuration with 'lesiondiffusion cache build'.")
        self.files = [self.root / "cases" / c["file"] for c in manifest["cases"]]
        self.records = {f: c for f, c in zip(self.files, manifest["cases"])}
        for f, c in self.records.items():  # sizes now (cheap); hashes on each read, below
            if not f.is_file() or ("bytes" in c and f.stat().st_size != c["bytes"]):
                raise self._damaged(case_is_intact(self.root, c) or f"{f} is damaged")
        self.manifest = manifest
        self.counters = counters or SharedCounters()

    def _damaged(self, problem: str) -> LesionDiffusionError:
        err = LesionDiffusionError(
            f"Offline cache {self.root}: {problem}. Run 'lesiondiffusion cache verify {self.root}' (sets damaged "
            "cases aside) and re-run the same 'lesiondiffusion cache build' to rebuild them.")
        record_fault(str(err))
        return err

    def draw(self) -> SyntheticCase:
        path = self.files[int(np.random.randint(len(self.files)))]
        record = self.records[path]
        data = path.read_bytes()
        if "sha256" in record and (len(data) != record.get("bytes") or hashlib.sha256(data).hexdigest() != record["sha256"]):
            raise self._damaged(f"{path}: size or sha256 differs from the manifest (changed or damaged since the build)")
        case = load_case(BytesIO(data))
        self.counters.add(FRESH)
        return case
