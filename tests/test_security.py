"""Security and fault probes of issue 21: nothing loaded runs code, the --llm key stays with its host,
YAML bombs are refused in milliseconds, a report cannot name a file, concurrent runs cannot mix their
outputs, and a folder that is not a cache is never touched. Each probe asserts how the tool ends now."""

from __future__ import annotations

import http.server
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from lesiondiffusion.cli import main
from lesiondiffusion.errors import CatalogError, ConfigError, LesionDiffusionError, ReportError


class _Marker:
    """Unpickling this runs os.mkdir(path): the stand-in for any code a hostile checkpoint would run."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


# --------------------------------------------------------------------------------------------------
# 1. checkpoints: plain data, weights_only=True, a hostile pickle never runs


def test_malicious_checkpoint_does_not_run_on_resume(tmp_path, capsys):
    from toydata import write_toy_dataset  # benchmarks/toydata.py (conftest puts benchmarks/ on the path)

    data = write_toy_dataset(tmp_path / "data", n_lesion=2, n_healthy=1, shape=(20, 20, 12), seed=2)
    run = tmp_path / "run"
    run.mkdir()
    marker = tmp_path / "PWNED"
    torch.save({"task": "vqgan", "step": 0, "world": 1, "models": {}, "rng": [], "x": _Marker(marker)},
               run / "checkpoint.pt")
    before = (run / "checkpoint.pt").read_bytes()
    rc = main(["pretrain", "vqgan", "--data", str(data), "--bundle", str(tmp_path / "b"), "-o", str(run), "--resume",
               "--steps", "1", "--no-progress", "--device", "cpu", "--workers", "0", "--patch", "16", "16", "16",
               "--cache", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert rc == 2
    assert not marker.exists()  # the pickled call never ran
    assert "not a plain-data checkpoint" in err and "could run code" in err and str(run / "checkpoint.pt") in err
    assert "Traceback" not in err
    # the refused global is named; torch's advice to re-run with weights_only=False (which would run it) is not quoted
    assert "unsupported GLOBAL" in err and "mkdir" in err and "weights_only" not in err
    assert (run / "checkpoint.pt").read_bytes() == before


def test_plain_pickle_file_and_garbage_checkpoint_are_refused(tmp_path):
    import pickle

    from lesiondiffusion.pretrain.engine import read_checkpoint

    marker = tmp_path / "PWNED"
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps({"x": _Marker(marker)}))  # a legacy (non-zip) pickle, no torch.save
    with pytest.raises(LesionDiffusionError, match="not a plain-data checkpoint"):
        read_checkpoint(raw)
    assert not marker.exists()
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"PK\x03\x04 definitely not a checkpoint")
    with pytest.raises(LesionDiffusionError, match="cannot be read as a checkpoint|not a plain-data"):
        read_checkpoint(junk)


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    import random

    from lesiondiffusion.pretrain.engine import _rng_state, _set_rng_state

    random.seed(5)
    np.random.seed(7)
    np.random.standard_normal()  # leaves a cached gaussian in the legacy state
    torch.manual_seed(9)
    torch.save({"rng": _rng_state()}, tmp_path / "c.pt")
    expect = (random.random(), np.random.standard_normal(), np.random.rand(), torch.rand(3))
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    _set_rng_state(torch.load(tmp_path / "c.pt", weights_only=True)["rng"])
    got = (random.random(), np.random.standard_normal(), np.random.rand(), torch.rand(3))
    assert got[:3] == expect[:3] and torch.equal(got[3], expect[3])


def test_demo_training_curve_reads_numpy_scalars_without_pickle_code(tmp_path):
    from lesiondiffusion.demo import training_curve

    torch.save({"logging": {"train_losses": [np.float64(0.5), np.float32(0.25)], "mean_fg_dice": [np.float64(0.1)]},
                "current_epoch": 2}, tmp_path / "checkpoint_final.pth")
    curve = training_curve(tmp_path)
    assert curve["train_losses"] == [0.5, 0.25] and curve["mean_fg_dice"] == [0.1]
    marker = tmp_path / "PWNED"
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    torch.save({"logging": {"train_losses": [1.0]}, "x": _Marker(marker)}, hostile / "checkpoint_final.pth")
    assert training_curve(hostile) == {}
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------
# 2. --llm: no redirect followed, bounded size and time, the key never printed

KEY = "sk-test-SECRET-0123456789"


class _Server:
    """A local HTTP server on 127.0.0.1 (any free port) that records the headers it receives."""

    def __init__(self, handler_body) -> None:
        seen: list[dict[str, str]] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server API
                seen.append(dict(self.headers))
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                handler_body(self)

            do_GET = do_POST  # noqa: N815

            def log_message(self, *args):  # quiet
                pass

        self.seen = seen
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "_Server":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _answer(handler) -> None:
    body = json.dumps({"choices": [{"message": {"content": json.dumps({"organ": "liver"})}}]}).encode()
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


@pytest.mark.timeout(60)
def test_llm_redirect_to_another_host_is_not_followed(monkeypatch, capsys):
    with _Server(_answer) as other:
        def redirect(handler):
            handler.send_response(302)
            handler.send_header("Location", other.url + "/v1/chat/completions")
            handler.send_header("Content-Length", "0")
            handler.end_headers()

        with _Server(redirect) as first:
            monkeypatch.setenv("OPENAI_API_KEY", KEY)
            rc = main(["report", "parse", "2 cm hypodense lesion in the liver", "--llm", first.url + "/v1"])
            out, err = capsys.readouterr()
            assert rc == 2
            assert "302" in err and "Redirects are never followed" in err and "final endpoint URL" in err
            assert first.seen and first.seen[0].get("Authorization") == f"Bearer {KEY}"  # the host named got it
            assert other.seen == []  # ... and no other host did
            assert KEY not in out + err


@pytest.mark.timeout(60)
def test_llm_endless_stream_is_cut_at_the_size_limit(monkeypatch):
    from lesiondiffusion import report_text

    def endless(handler):
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.end_headers()
        chunk = b"[" * 65536
        try:
            while True:
                handler.wfile.write(chunk)
        except (BrokenPipeError, ConnectionResetError):
            return

    with _Server(endless) as srv:
        with pytest.raises(ReportError, match="more than 1 MiB") as info:
            report_text.parse_with_llm("lesion in the liver", srv.url, api_key=KEY, max_bytes=2**20, timeout=30)
        assert KEY not in str(info.value)


@pytest.mark.timeout(60)
def test_llm_slow_trickle_is_cut_at_the_time_limit():
    import time

    from lesiondiffusion import report_text

    def trickle(handler):
        handler.send_response(200)
        handler.end_headers()
        try:
            for _ in range(200):
                handler.wfile.write(b" ")
                handler.wfile.flush()
                time.sleep(0.05)
        except (BrokenPipeError, ConnectionResetError):
            return

    t0 = time.monotonic()
    with _Server(trickle) as srv:
        with pytest.raises(ReportError, match="time limit|cannot be reached"):
            report_text.parse_with_llm("lesion in the liver", srv.url, timeout=1.0)
    assert time.monotonic() - t0 < 8


def test_llm_refuses_non_http_urls_and_hides_credentials_in_urls(tmp_path):
    from lesiondiffusion import report_text

    secret = tmp_path / "secret.txt"
    secret.write_text("{}")
    with pytest.raises(ReportError, match="only http:// or https://"):
        report_text.parse_with_llm("lesion in the liver", f"file://{secret}")
    with pytest.raises(ReportError) as info:  # nothing listens on port 9 of 127.0.0.1
        report_text.parse_with_llm("lesion in the liver", "http://user:hunter2@127.0.0.1:9/v1", timeout=5)
    assert "hunter2" not in str(info.value) and "127.0.0.1:9" in str(info.value)


def test_llm_answer_from_the_named_host_still_works(monkeypatch):
    from lesiondiffusion import report_text

    with _Server(_answer) as srv:
        parsed = report_text.parse_with_llm("lesion in the liver", srv.url + "/v1", api_key=KEY, timeout=30)
    assert parsed.values["organ"] == "liver"
    assert srv.seen[0]["Authorization"] == f"Bearer {KEY}"


# --------------------------------------------------------------------------------------------------
# 3. YAML bounded: billion laughs and recursive aliases refused before any walk; types by name only


def _billion_laughs() -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 11):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


BOMBS = {"billion_laughs": (_billion_laughs(), "expands to more than"),
         "recursive": ("name: x\norgans: &a [1, *a]\n", "refers to the value that contains it"),
         "recursive_map": ("&a {name: x, organs: *a}\n", "refers to the value that contains it"),
         "merge_bomb": ("a: &a {k1: 1, k2: 2, k3: 3, k4: 4, k5: 5, k6: 6, k7: 7, k8: 8, k9: 9}\n" + "".join(
             f"l{i}: &l{i} [" + ", ".join(["*" + ("a" if i == 0 else f"l{i - 1}")] * 10) + "]\n"
             for i in range(8)), "expands to more than")}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", list(BOMBS))
def test_yaml_bombs_in_a_catalog_are_refused_quickly(name, tmp_path, capsys, monkeypatch):
    import time

    text, words = BOMBS[name]
    assert len(text.encode()) < 2048
    path = tmp_path / "cats" / "bomb.yaml"
    path.parent.mkdir()
    path.write_text(text)
    t0 = time.monotonic()
    assert main(["catalogs", "validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert words in err and str(path) in err and "Traceback" not in err
    # the bomb anywhere on the catalog path: `catalogs list` still answers (the bomb listed as broken)
    monkeypatch.setenv("LESIONDIFFUSION_CATALOG_PATH", str(path.parent))
    main(["catalogs", "list"])
    out, err = capsys.readouterr()
    assert "kidney_tumor" in out
    assert time.monotonic() - t0 < 10


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", ["billion_laughs", "recursive"])
def test_yaml_bombs_in_reports_and_configs_are_refused(name, tmp_path):
    from lesiondiffusion.nnunet_integration.config import load_config
    from lesiondiffusion.report import LesionReport

    text, words = BOMBS[name]
    rep = tmp_path / "r.yaml"
    rep.write_text(text)
    with pytest.raises(ReportError, match=words):
        LesionReport.from_yaml(rep)
    cfg = tmp_path / "lesiondiffusion.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=words):
        load_config(cfg)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["billion_laughs", "recursive"])
def test_yaml_bombs_in_a_bundle_config_and_a_pretraining_report_are_refused(name, world, tmp_path, capsys):
    """Bundles and pretraining datasets are shared too: before, a bomb appended to a bundle's config.yaml hung
    `bundle info` (the non-finite check walks every value) and one in reportsTr/ hung `pretrain check`."""
    import time

    from toydata import write_toy_dataset

    text, words = BOMBS[name]
    anchors = text.replace("name: x\norgans: ", "bomb: ")  # the bomb's aliases under a top-level key
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.yaml").write_text((world["bundle"] / "config.yaml").read_text() + anchors)
    t0 = time.monotonic()
    assert main(["bundle", "info", str(bundle)]) == 2
    err = capsys.readouterr().err
    assert words in err and str(bundle / "config.yaml") in err and "Traceback" not in err
    data = write_toy_dataset(tmp_path / "data", n_lesion=1, n_healthy=1, shape=(20, 20, 12), seed=2)
    report = sorted((data / "reportsTr").glob("*.yaml"))[0]
    last = ("*a10" if name == "billion_laughs" else "&r [1, *r]")  # used inside the lesion's report
    body = report.read_text().replace("specific_features: none", f"specific_features: {last}")
    assert body != report.read_text()
    report.write_text((text if name == "billion_laughs" else "") + body)
    assert main(["pretrain", "check", str(data)]) == 2
    err = capsys.readouterr().err
    assert words in err and str(report) in err and "Traceback" not in err
    assert time.monotonic() - t0 < 30


def test_aliases_within_limits_still_load(tmp_path):
    from lesiondiffusion.safeyaml import load_yaml

    data = load_yaml("base: &b {weight: 1.0}\nkidney: {<<: *b, v2: [kidney_left]}\nalso: [*b, *b]\n", "x.yaml",
                     CatalogError)
    assert data["kidney"] == {"weight": 1.0, "v2": ["kidney_left"]} and data["also"] == [{"weight": 1.0}] * 2


@pytest.mark.parametrize("lesion_type", ["../../../../etc/passwd", "/etc/passwd", "kidney_tumor.yaml",
                                         "sub/kidney_tumor", "..", ".hidden"])
def test_report_lesion_type_is_a_name_never_a_path(lesion_type, tmp_path, capsys):
    import yaml

    ok = tmp_path / "ok.yaml"
    assert main(["report", "sample", "kidney_tumor", "--seed", "0", "-o", str(ok)]) == 0
    doc = yaml.safe_load(ok.read_text())
    doc["lesion_type"] = lesion_type
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    with pytest.raises(ReportError, match="is a path; a lesion type is a catalog name"):
        from lesiondiffusion.report import LesionReport

        LesionReport.from_yaml(bad)
    capsys.readouterr()
    assert main(["report", "check", str(bad)]) == 2
    assert "is a path" in capsys.readouterr().err


def test_a_file_in_the_working_folder_never_replaces_a_catalog_name(tmp_path, monkeypatch):
    from lesiondiffusion.catalog import load_catalog

    monkeypatch.chdir(tmp_path)
    Path("kidney_tumor").write_text("name: not a catalog\n")
    assert load_catalog("kidney_tumor").name == "kidney_tumor"


# --------------------------------------------------------------------------------------------------
# 4. no silent overwrite: synthesize claims its folder; cache verify touches only a cache


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    import nibabel as nib

    from lesiondiffusion.phantoms import make_phantom

    root = tmp_path_factory.mktemp("sec_world")
    p = make_phantom((32, 32, 24), (3.0, 3.0, 4.0), seed=1)
    ct, seg = root / "ct.nii.gz", root / "seg.nii.gz"
    nib.save(nib.Nifti1Image(p.ct.astype(np.int16), p.affine), str(ct))
    nib.save(nib.Nifti1Image(p.organs.astype(np.uint8), p.affine), str(seg))
    bundle = root / "bundle"
    assert main(["bundle", "init", "--preset", "tiny", "-o", str(bundle), "--encoder", "hashing:64"]) == 0
    return {"root": root, "ct": ct, "seg": seg, "bundle": bundle, "affine": p.affine, "ct_array": p.ct}


def _synth(w, out: Path, *extra: str, ct: Path | None = None) -> list[str]:
    return ["synthesize", "--bundle", str(w["bundle"]), "--ct", str(ct or w["ct"]), "--organs", str(w["seg"]),
            "--catalog", "kidney_tumor", "--ddim-steps", "1", "--no-preview", "--set", "size_mm=15,12,14",
            "--set", "lesion_location=within the parenchymal organ", "-o", str(out), *extra]


@pytest.fixture
def rule_based(monkeypatch):
    """synthesize with the weight-free rule-based generator in place of the random tiny networks, so every
    sample succeeds: these tests are about who may write the folder, not about the networks."""
    from lesiondiffusion import pipeline
    from lesiondiffusion.rule_based import RuleBasedGenerator

    monkeypatch.setattr(pipeline.LesionSynthesizer, "from_bundle", classmethod(lambda cls, *a, **k: RuleBasedGenerator()))


# the same swap for a synthesize run in its own process
_RULE_BASED_MAIN = ("import sys; from lesiondiffusion import pipeline; from lesiondiffusion.rule_based import "
                    "RuleBasedGenerator; pipeline.LesionSynthesizer.from_bundle = classmethod(lambda cls, *a, **k: "
                    "RuleBasedGenerator()); from lesiondiffusion.cli import main; sys.exit(main(sys.argv[1:]))")


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_second_synthesize_into_a_claimed_folder_refuses(world, tmp_path, capsys, rule_based):
    from lesiondiffusion.io import claim_folder

    out = tmp_path / "out"
    out.mkdir()
    with claim_folder(out, "synthesize") as lock:  # a live run (this process) holds the folder
        rc = main(_synth(world, out, "-n", "1"))
        err = capsys.readouterr().err
        assert rc == 2 and "in use by another synthesize run" in err and str(lock) in err
        assert sorted(p.name for p in out.iterdir()) == [lock.name]  # nothing of the second run was written
    assert not lock.exists()
    # once the first run is over, the folder can be used; the lock is gone again afterwards
    assert main(_synth(world, out, "-n", "1")) == 0
    assert (out / "sample_000" / "image.nii.gz").is_file() and not (out / lock.name).exists()
    first = _tree(out)
    # a run that finds the samples there (the other run finished between its check and its claim) refuses
    assert main(_synth(world, out, "-n", "1")) == 2
    assert "already exists" in capsys.readouterr().err and _tree(out) == first


def test_a_crashed_runs_lock_is_taken_over_and_a_live_process_lock_is_kept(tmp_path):
    import subprocess
    import sys

    from lesiondiffusion.io import _host, claim_folder

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = tmp_path / ".lesiondiffusion.lock"
    lock.write_text(f"pid{int(dead.stdout)}@{_host()}.")
    with claim_folder(tmp_path, "synthesize"):
        assert lock.read_text() == f"pid{os.getpid()}@{_host()}."
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(f"pid{live.pid}@{_host()}.")
        with pytest.raises(LesionDiffusionError, match=f"process {live.pid}"):
            with claim_folder(tmp_path, "synthesize"):
                pass
        assert lock.exists()  # never removed from under a live run
    finally:
        live.kill()
        live.wait()


def test_two_concurrent_synthesize_processes_never_mix_outputs(world, tmp_path):
    """The probe itself: two real runs started together into one folder; one writes, the other refuses."""
    import subprocess
    import sys

    out = tmp_path / "out"
    cmd = [sys.executable, "-c", _RULE_BASED_MAIN, *_synth(world, out, "-n", "2", "--seed", "0")]
    cmd2 = [sys.executable, "-c", _RULE_BASED_MAIN, *_synth(world, out, "-n", "2", "--seed", "7")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    a = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    b = subprocess.Popen(cmd2, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    ra, rb = a.communicate(timeout=600), b.communicate(timeout=600)
    codes = sorted([a.returncode, b.returncode])
    assert codes == [0, 2], (ra, rb)
    loser = ra if a.returncode == 2 else rb
    assert "in use by another synthesize run" in loser[1] or "already exists" in loser[1]
    seeds = {yaml_seed(out / f"sample_{i:03d}" / "report.yaml") for i in range(2)}
    assert len(seeds) == 1  # both samples come from the same run


def yaml_seed(path: Path) -> int:
    import yaml

    return yaml.safe_load(path.read_text())["synthesis"]["seed"]


def test_cache_verify_refuses_a_folder_that_is_not_a_cache(tmp_path, capsys):
    folder = tmp_path / "notacache"
    (folder / "cases").mkdir(parents=True)
    (folder / "cases" / "synth_000000.json").write_text('{"mine": true}')
    (folder / "notes.txt").write_text("keep me")
    before = _tree(folder)
    assert main(["cache", "verify", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "not an offline cache" in err and "nothing was changed" in err
    assert _tree(folder) == before


def test_cache_verify_sets_aside_never_deletes_and_never_follows_a_sidecar_elsewhere(tmp_path):
    from lesiondiffusion.store import OfflineCache

    root = tmp_path / "cache"
    (root / "cases").mkdir(parents=True)
    (root / "failed").mkdir()
    (root / "identity.json").write_text("{}")
    victim = tmp_path / "victim.txt"
    victim.write_text("outside the cache")
    (root / "cases" / "synth_000000.json").write_text("{not json")
    (root / "cases" / "synth_000001.json").write_text(json.dumps({"index": 1, "file": "../../victim.txt"}))
    manifest, _ = OfflineCache(root).verify()
    assert manifest["n_cases"] == 0
    assert victim.read_text() == "outside the cache"
    assert sorted(p.name for p in (root / "rejected").iterdir()) == ["synth_000000.json", "synth_000001.json"]


# --------------------------------------------------------------------------------------------------
# 6. advice that works: a CT with NaN


def test_nan_ct_error_says_nan_and_its_fix_works(world, tmp_path, capsys, rule_based):
    import shlex
    import subprocess
    import sys

    import nibabel as nib

    arr = world["ct_array"].astype(np.float32)
    arr[:3] = np.nan
    arr[-1, 0, 0] = np.inf
    ct = tmp_path / "ct nan.nii.gz"  # a space in the name: the printed command must quote it
    nib.save(nib.Nifti1Image(arr, world["affine"]), str(ct))
    for extra in ((), ("--allow-non-hu",)):  # the same clear answer with or without --allow-non-hu
        assert main(_synth(world, tmp_path / "out", *extra, ct=ct)) == 2
        err = capsys.readouterr().err
        assert "NaN" in err and "python -c" in err and "--allow-non-hu does not apply" in err
        assert "pass --allow-non-hu if" not in err
    command = next(line.strip() for line in err.splitlines() if line.strip().startswith("python -c"))
    argv = shlex.split(command)
    assert argv[0] == "python"
    subprocess.run([sys.executable, *argv[1:]], check=True)  # the advice, as printed
    fixed = tmp_path / "ct nan_finite.nii.gz"
    assert f"--ct {fixed}" in err and fixed.is_file()
    assert main(_synth(world, tmp_path / "out", ct=fixed)) == 0


# --------------------------------------------------------------------------------------------------
# 5. the trainer configuration: a schema at start-up, the device, the spool, one-line faults

_BASE_CFG = "generator: {backend: rule_based}\ncatalogs: [kidney_tumor]\n"


def _load_cfg(tmp_path: Path, text: str):
    from lesiondiffusion.nnunet_integration.config import load_config

    path = tmp_path / "lesiondiffusion.yaml"
    path.write_text(text)
    return path, lambda: load_config(path)


@pytest.mark.parametrize("text,words", [
    (_BASE_CFG + "store: {1: a, foo: b}\n", ["key 1 under 'store' is not a name", "allowed keys under 'store'"]),
    (_BASE_CFG + "offline: {cache_dir: [a, b]}\n", ["key 'offline.cache_dir'", "Use text or null"]),
    ("generator: {backend: rule_based, options: {colour: red}}\ncatalogs: [kidney_tumor]\n",
     ["key 'generator.options.colour'", "Unknown key", "edge_sigma_mm"]),
    ("generator: {backend: lesiondiffusion, bundle: B, options: {ddim_steps: -3}}\nmode: offline\n"
     "catalogs: [kidney_tumor]\n", ["key 'generator.options.ddim_steps' has invalid value -3", "between 1 and"]),
    ("generator: {backend: lesiondiffusion, bundle: B, options: {ddim_steps: 2.5}}\nmode: offline\n"
     "catalogs: [kidney_tumor]\n", ["generator.options.ddim_steps", "an integer or null"]),
    ("generator: {backend: lesiondiffusion, bundle: B, options: {hu_correction: clip}}\nmode: offline\n"
     "catalogs: [kidney_tumor]\n", ["generator.options.hu_correction", "as generator.hu_correction"]),
    (_BASE_CFG + "templates: {dataset_healthy: 'false'}\n",
     ["key 'templates.dataset_healthy'", "without quotes", "'false' is text"]),
    ("generator: {backend: rule_based, text_conditioning: 'no'}\ncatalogs: [kidney_tumor]\n",
     ["key 'generator.text_conditioning'", "'no' is text, not a boolean"]),
    (_BASE_CFG + "generator: {backend: rule_based, device: cpu}\n", [":3: key 'generator' is given twice"]),
    (_BASE_CFG + "seed: '3'\n", ["key 'seed'", "an integer"]),
    (_BASE_CFG + "store: {size: 4.5}\n", ["key 'store.size'", "an integer"]),
    (_BASE_CFG + "store: {spool_dir: /no/such/folder}\n", ["key 'store.spool_dir'", "existing folder"]),
    (_BASE_CFG + "synthetic_probability: yes\n", ["key 'synthetic_probability'", "a number"]),
    ("catalogs: [{name: kidney_tumor, weight: '2'}]\ngenerator: {backend: rule_based}\n",
     ["catalogs[0].weight", "a number"]),
])
def test_trainer_config_probes_name_file_key_and_fix(tmp_path, text, words):
    path, load = _load_cfg(tmp_path, text)
    with pytest.raises((ConfigError, LesionDiffusionError)) as info:
        load()
    msg = str(info.value)
    assert str(path) in msg
    for w in words:
        assert w in msg, msg


def test_a_valid_config_with_options_still_loads(tmp_path):
    _, load = _load_cfg(tmp_path, "generator: {backend: rule_based, options: {edge_sigma_mm: 0.5}}\n"
                                  "catalogs: [kidney_tumor]\ntemplates: {dataset_healthy: false, folders: []}\n"
                                  "store: {spool_dir: " + str(tmp_path) + "}\n")
    with pytest.raises(ConfigError, match="No template source"):  # the existing cross-key rule still applies
        load()
    _, load = _load_cfg(tmp_path, "generator: {backend: rule_based, options: {edge_sigma_mm: 0.5}}\n"
                                  "catalogs: [kidney_tumor]\nstore: {spool_dir: " + str(tmp_path) + "}\n")
    cfg = load()
    assert cfg.generator.options == {"edge_sigma_mm": 0.5} and cfg.store.spool_dir == str(tmp_path)


def test_cuda_device_without_cuda_is_refused_and_the_advised_fix_works(tmp_path, monkeypatch):
    from lesiondiffusion.nnunet_integration.config import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path, load = _load_cfg(tmp_path, "generator: {backend: rule_based, device: cuda}\ncatalogs: [kidney_tumor]\n")
    cfg = load()
    with pytest.raises(ConfigError) as info:
        check_device(cfg.generator.device, cfg.source)
    msg = str(info.value)
    assert "no CUDA GPU" in msg and "set 'device: cpu' under 'generator:'" in msg and str(path) in msg
    assert "--device" not in msg  # nnUNetv2_train has no such option
    path.write_text(path.read_text().replace("device: cuda", "device: cpu"))  # the advice, followed
    check_device(load().generator.device, str(path))


def test_spool_preflight_names_the_key_and_setting_it_works(tmp_path, monkeypatch):
    import shutil

    from lesiondiffusion import store

    real = shutil.disk_usage
    small = tmp_path / "small"
    small.mkdir()
    monkeypatch.setattr(store.sample_store.shutil, "disk_usage",  # the module that checks the space
                        lambda p: real(p)._replace(free=12 * 2**20) if str(p) == str(small) else real(p))
    with pytest.raises(LesionDiffusionError) as info:
        store.check_spool_space(store.spool_base(str(small)), 400 * 2**20, "32 cases of 12.5 MiB", "/cfg/ld.yaml")
    assert "only 12 MiB are free" in str(info.value) and "Set store.spool_dir in /cfg/ld.yaml" in str(info.value)
    store.check_spool_space(store.spool_base(str(tmp_path)), 1 * 2**20, "1 case")  # a roomier folder passes
    s = store.SampleStore(lambda: None, worker="thread", spool_dir=str(tmp_path))
    try:
        assert Path(s.spool).parent == tmp_path  # the queue's files go where the key says
    finally:
        s.close()


class _Trainer:
    """The trainer's fault handling without an nnU-Net run: the class's own methods on a bare object."""

    @staticmethod
    def make(tmp_path: Path, store=None):
        from lesiondiffusion.nnunet_integration.trainers import nnUNetTrainerLesionDiffusion

        tr = object.__new__(nnUNetTrainerLesionDiffusion)
        tr.ld_store, tr.ld_config = store, None
        tr.log_file = str(tmp_path / "training_log.txt")

        def log(*args, also_print_to_console=True, add_timestamp=True):
            with open(tr.log_file, "a") as fh:
                fh.write(" ".join(map(str, args)) + "\n")

        tr.print_to_log_file = log
        return tr


def test_damaged_cache_in_a_worker_ends_training_in_one_line(tmp_path, monkeypatch):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from lesiondiffusion.store import OfflineCacheReader

    def worker_dies(self):
        # what a data-loading worker does on a truncated case, then what nnU-Net says in the main process
        reader = object.__new__(OfflineCacheReader)
        reader.root = tmp_path / "cache"
        reader._damaged("cases/synth_000003.npz: size or sha256 differs from the manifest")
        raise RuntimeError("One or more background workers are no longer alive. Exiting.")

    monkeypatch.setattr(nnUNetTrainer, "run_training", worker_dies)
    monkeypatch.delenv("LESIONDIFFUSION_DEBUG", raising=False)
    tr = _Trainer.make(tmp_path)
    with pytest.raises(SystemExit) as info:
        tr.run_training()
    line = str(info.value.code)
    assert "\n" not in line and line.startswith("LesionDiffusion: training stopped:")
    assert "synth_000003.npz" in line and "lesiondiffusion cache verify" in line and "background workers" not in line
    assert "RuntimeError: One or more background workers" in Path(tr.log_file).read_text()
    monkeypatch.setenv("LESIONDIFFUSION_DEBUG", "1")
    with pytest.raises(RuntimeError, match="background workers"):
        tr.run_training()


def test_killed_producer_ends_training_in_one_line_that_does_not_just_blame_memory(tmp_path, monkeypatch):
    import signal
    import time

    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from lesiondiffusion.store import SampleStore

    store = SampleStore(_SlowFactory(), worker="process", spool_dir=str(tmp_path)).start()
    try:
        deadline = time.monotonic() + 120
        while store._runner.pid is None and time.monotonic() < deadline:
            time.sleep(0.1)
        os.kill(store._runner.pid, signal.SIGKILL)  # the probe: kill -9 of the producer
        store._runner.join(60)

        def training(self):
            raise RuntimeError("One or more background workers are no longer alive. Exiting.")

        monkeypatch.setattr(nnUNetTrainer, "run_training", training)
        monkeypatch.delenv("LESIONDIFFUSION_DEBUG", raising=False)
        tr = _Trainer.make(tmp_path, store)
        with pytest.raises(SystemExit) as info:
            tr.run_training()
        line = str(info.value.code)
        assert "\n" not in line and "killed by SIGKILL: by hand (kill -9) or by the kernel" in line
        assert "lower store.size" in line and "--c" in line
    finally:
        store.close()


def _alive(pid: int) -> bool:
    """A process exists and is not a zombie (an orphan's exit may wait for a reaper that never comes)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return False


_TRAINING = """import sys, time
sys.path.insert(0, sys.argv[1])
from test_store import FakeFactory
from lesiondiffusion.store import SampleStore
store = SampleStore(FakeFactory().build, size=2, reuse=1, worker="process", spool_dir=sys.argv[2]).start()
store.wait_for(2, 120)  # the queue is full: the producer now waits to put its next case
print(store._runner.pid, store.spool, flush=True)
time.sleep(600)
"""


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads process states from /proc")
@pytest.mark.timeout(180)
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_a_training_ended_by_a_signal_leaves_no_producer_and_no_spool(sig, tmp_path):
    """`kill PID` or a batch scheduler's time limit ends nnUNetv2_train without any clean-up: before, its
    producer lived on (about 1 GB on CPU, waiting on the full queue) and its spool stayed in /dev/shm."""
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-c", _TRAINING, str(Path(__file__).parent), str(tmp_path)],
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        pid, spool = proc.stdout.readline().split()
        assert _alive(int(pid)) and Path(spool).is_dir() and any(Path(spool).iterdir())
        proc.send_signal(getattr(signal, sig))
        proc.wait(30)
        deadline = time.monotonic() + 60
        while (_alive(int(pid)) or Path(spool).exists()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(int(pid)), "the producer outlived its training process"
        assert not Path(spool).exists(), "the spool folder was left behind"
    finally:
        proc.kill()
        proc.wait()
        if "pid" in locals() and _alive(int(pid)):
            os.kill(int(pid), signal.SIGKILL)


class _SlowFactory:
    """Picklable builder of a factory that never finishes a case (the producer just sits there)."""

    def __call__(self):
        import time

        def factory(seed):
            time.sleep(600)

        return factory


def test_cache_build_refuses_a_cuda_generator_on_a_machine_without_cuda(tmp_path, monkeypatch, capsys):
    import yaml
    from test_bad_inputs import _fake_preprocessed, _nnunet_env

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _nnunet_env(monkeypatch, tmp_path)
    pre, cfg = _fake_preprocessed(tmp_path)
    doc = yaml.safe_load(cfg.read_text())
    doc["generator"]["device"] = "cuda"
    cfg.write_text(yaml.safe_dump(doc))
    argv = ["cache", "build", "--config", str(cfg), "--dataset", "Dataset997_Fake", "-n", "1", "-q",
            "-o", str(tmp_path / "cache")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "generator.device" in err and "no CUDA GPU" in err and "device: cpu" in err
    assert main([*argv, "--device", "cuda"]) == 2
    assert "pass --device cpu" in capsys.readouterr().err  # `cache build` does have --device
    assert not (tmp_path / "cache").exists()


def test_full_spool_during_training_ends_in_one_line_naming_store_spool_dir(tmp_path, monkeypatch):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from lesiondiffusion.store import ProducerCrashed

    class FullSpool:
        spool = "/dev/shm/lesiondiffusion_store_x"

        def check(self):
            raise ProducerCrashed("The lesion synthesis producer crashed; training stops.\nTraceback (most recent "
                                  "call last):\n  ...\nOSError: [Errno 28] No space left on device")

        def close(self):
            pass

    def training(self):
        raise RuntimeError("One or more background workers are no longer alive. Exiting.")

    monkeypatch.setattr(nnUNetTrainer, "run_training", training)
    monkeypatch.delenv("LESIONDIFFUSION_DEBUG", raising=False)
    tr = _Trainer.make(tmp_path, FullSpool())
    with pytest.raises(SystemExit) as info:
        tr.run_training()
    line = str(info.value.code)
    assert "\n" not in line and "spool folder /dev/shm/lesiondiffusion_store_x is full" in line
    assert "store.spool_dir" in line and "another disk" not in line


# ------------------------------------------------------------------ nnU-Net's preprocessed .pkl files

class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):  # unpickling this calls os.mkdir(marker)
        return (os.mkdir, (self.marker,))


def test_a_swapped_nnunet_pkl_does_not_run_code_when_templates_are_searched(tmp_path):
    """find_healthy_cases (cache build, the trainer's templates) reads nnU-Net's CASE.pkl as plain data: a
    hostile one is refused with its file named, a real one (numpy arrays, dtypes, scalars) still loads."""
    import pickle
    from collections import OrderedDict

    from lesiondiffusion.errors import LesionDiffusionError
    from lesiondiffusion.nnunet_integration.data import find_healthy_cases
    from lesiondiffusion.safepickle import load_plain_pickle

    real = {"spacing": [3.0, 1.0, 1.0], "shape_before_cropping": (12, 40, 40), "bbox_used_for_cropping": [[0, 12]],
            "class_locations": OrderedDict({1: np.zeros((0, 4), np.int64), 2: np.arange(8).reshape(2, 4)}),
            "mean": np.float32(3.5), "dtype": np.dtype("float32")}
    (tmp_path / "healthy.pkl").write_bytes(pickle.dumps({**real, "class_locations": {1: np.zeros((0, 4), np.int64)}}))
    (tmp_path / "lesion.pkl").write_bytes(pickle.dumps(real))
    back = load_plain_pickle(tmp_path / "lesion.pkl")
    assert back["mean"] == np.float32(3.5) and np.array_equal(back["class_locations"][2], real["class_locations"][2])
    assert find_healthy_cases(str(tmp_path), ["healthy", "lesion"], [2]) == ["healthy"]

    marker = tmp_path / "ran"
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"class_locations": {}, "x": _RunsCode(str(marker))}))
    with pytest.raises(LesionDiffusionError, match=r"evil\.pkl: refused to read it \(global posix\.mkdir"):
        find_healthy_cases(str(tmp_path), ["healthy", "evil"], [2])
    assert not marker.exists()
    (tmp_path / "cut.pkl").write_bytes(pickle.dumps(real)[:40])  # a truncated file: the same clear error
    with pytest.raises(LesionDiffusionError, match=r"cut\.pkl: refused.*nnUNetv2_plan_and_preprocess"):
        load_plain_pickle(tmp_path / "cut.pkl")
