"""Text conditioning: phrase encoders behind one small interface, and the embedding cache.

Each report attribute phrase ("shape: round-like") is embedded separately; the cross-attention context
of LMNet/LINet is the sequence of those per-attribute vectors. The vocabulary is finite, so bundles
store every embedding once (``EmbeddingCache``) and synthesis/training need no text model at all.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import re
from pathlib import Path
from typing import Iterable, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from .errors import BundleError, TextEncodingError
from .io import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

BIOMEDCLIP_HUB_ID = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
DEFAULT_HASHING_DIM = 512  # same width as BiomedCLIP's text embedding, so network shapes match

ENCODER_HELP = (
    "encoder specs: 'hashing' or 'hashing:DIM' (offline, deterministic, not a language model); "
    "'biomedclip' (= open_clip " + BIOMEDCLIP_HUB_ID + ", needs network access and `transformers`); "
    "'local-dir:/path' (an open_clip model folder with open_clip_config.json + weights); "
    "'open_clip:NAME' (any open_clip model name); 'st:/path' (a sentence-transformers model folder)"
)


@runtime_checkable
class TextEncoder(Protocol):
    """Maps phrases to fixed-size vectors; ``id`` names the model so cached vectors stay keyed to it."""

    id: str
    dim: int

    def encode(self, phrases: list[str]) -> torch.Tensor:  # [n, dim] float32, CPU
        ...


class HashingEncoder:
    """Offline, deterministic phrase embedding: a signed bag-of-words random projection.

    Each lower-cased word (and the attribute name before ':') is hashed to a fixed random +-1 vector;
    a phrase is the L2-normalised sum. It is NOT a language model: synonyms are unrelated, but equal
    words share directions. It exists so bundles can be built, tested and demoed with no model download.
    """

    def __init__(self, dim: int = DEFAULT_HASHING_DIM, salt: str = "lesiondiffusion") -> None:
        if dim < 2:
            raise TextEncodingError(f"hashing encoder dimension must be >= 2, got {dim}.")
        self.dim = int(dim)
        self.salt = salt
        self.id = f"hashing:{self.dim}"

    def _word_vector(self, word: str) -> np.ndarray:
        digest = hashlib.blake2b(f"{self.salt}|{word}".encode(), digest_size=8).digest()
        rng = np.random.default_rng(int.from_bytes(digest, "little"))
        return rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=self.dim)

    def encode(self, phrases: list[str]) -> torch.Tensor:
        out = np.zeros((len(phrases), self.dim), dtype=np.float32)
        for i, phrase in enumerate(phrases):
            words = re.findall(r"[a-z0-9]+", phrase.lower())
            if not words:
                raise TextEncodingError(f"cannot embed the empty phrase {phrase!r}; phrases need words.")
            vec = sum(self._word_vector(w) for w in words)
            out[i] = vec / max(float(np.linalg.norm(vec)), 1e-8)
        return torch.from_numpy(out)


class OpenCLIPEncoder:
    """Text tower of an open_clip model (BiomedCLIP by default); embeddings are L2-normalised."""

    def __init__(self, model_name: str = BIOMEDCLIP_HUB_ID, device: str = "cpu") -> None:
        try:
            import open_clip
        except ImportError as exc:  # pragma: no cover - open_clip is a hard dependency
            raise TextEncodingError("open_clip is not installed: pip install open_clip_torch") from exc
        if model_name.startswith("local-dir:"):
            folder = Path(model_name[len("local-dir:"):]).expanduser()
            if not (folder / "open_clip_config.json").is_file():
                raise TextEncodingError(
                    f"{folder}/open_clip_config.json not found: a local open_clip model folder needs "
                    "open_clip_config.json and the weights (open_clip_model.safetensors or "
                    "open_clip_pytorch_model.bin). For BiomedCLIP copy those files from the hub repo "
                    "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224 (see docs/bundle.md)."
                )
            model_name = f"local-dir:{folder.resolve()}"
            try:
                config = json.loads((folder / "open_clip_config.json").read_text(encoding="utf-8"))
            except ValueError as exc:
                raise TextEncodingError(f"{folder}/open_clip_config.json is not valid JSON ({exc}); fix or re-download it.") from exc
            weights = [p for ext in ("*.safetensors", "*.bin", "*.pth") for p in folder.glob(ext)]
            if not weights:
                # open_clip would silently fall back to random weights: embeddings would be noise
                raise TextEncodingError(
                    f"{folder} has open_clip_config.json but no weights (open_clip_model.safetensors, "
                    "open_clip_pytorch_model.bin, ...). Copy the weights file into the folder."
                )
            text_cfg = (config.get("model_cfg") or {}).get("text_cfg") or {}
            if text_cfg.get("hf_model_name") or text_cfg.get("hf_tokenizer_name"):
                if importlib.util.find_spec("transformers") is None:
                    raise TextEncodingError(
                        f"{folder}/open_clip_config.json uses the Hugging Face text model "
                        f"{text_cfg.get('hf_model_name') or text_cfg.get('hf_tokenizer_name')!r} (as BiomedCLIP does), "
                        "which needs `transformers`: pip install transformers. Without it, use the bundle's "
                        "embedding cache (no encoder needed) or --encoder hashing."
                    )
            # the folder may name the id its vectors should be cached under (e.g. the hub id of the
            # model it is a copy of), so caches made online and offline stay interchangeable
            self.id = str(config.get("lesiondiffusion_id") or f"open_clip:local-dir:{folder.resolve().name}")
        else:
            self.id = f"open_clip:{model_name}"
        try:
            model = open_clip.create_model(model_name, device=device)
            self.tokenizer = open_clip.get_tokenizer(model_name)
        except (ImportError, ModuleNotFoundError) as exc:
            raise TextEncodingError(
                f"open_clip model {model_name!r} needs an optional package ({exc}). BiomedCLIP's text "
                "tower is a Hugging Face PubMedBERT model: install it with `pip install transformers`, "
                "or use the embedding cache shipped in the bundle (no encoder needed), or --encoder hashing."
            ) from exc
        except Exception as exc:  # open_clip raises RuntimeError/OSError/ValueError for unreachable hubs
            hint = ""
            if "transformers" in str(exc).lower():
                hint = " Install `transformers` (pip install transformers): BiomedCLIP's text tower needs it."
            raise TextEncodingError(
                f"cannot load open_clip model {model_name!r} ({type(exc).__name__}: {exc}).{hint} Offline "
                "machines: download the model folder once and pass --encoder local-dir:/path/to/folder, or "
                "use --encoder hashing."
            ) from exc
        self.model = model.eval()
        self.device = device
        with torch.inference_mode():
            probe = self.model.encode_text(self.tokenizer(["probe"]).to(device))
        self.dim = int(probe.shape[-1])

    def encode(self, phrases: list[str]) -> torch.Tensor:
        with torch.inference_mode():
            tokens = self.tokenizer(list(phrases)).to(self.device)
            emb = self.model.encode_text(tokens, normalize=True)
        return emb.float().cpu()


class SentenceTransformerEncoder:
    """Any sentence-transformers model folder (optional dependency)."""

    def __init__(self, path: str, device: str = "cpu") -> None:
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise TextEncodingError(
                f"--encoder st:{path} needs sentence-transformers, which is not installed. Install it with "
                "`pip install lesiondiffusion-nnunet[sentence-transformers]` or choose another encoder."
            ) from exc
        folder = Path(path).expanduser()
        if not folder.exists():
            raise TextEncodingError(f"sentence-transformers model folder {folder} does not exist; pass st:/path/to/model.")
        self.model = SentenceTransformer(str(folder), device=device)
        self.dim = int(self.model.get_sentence_embedding_dimension())
        self.id = f"st:{folder.resolve().name}"

    def encode(self, phrases: list[str]) -> torch.Tensor:
        emb = self.model.encode(list(phrases), convert_to_tensor=True, normalize_embeddings=True)
        return emb.float().cpu()


def make_encoder(spec: str, device: str = "cpu") -> TextEncoder:
    """Build an encoder from a spec string (see ``ENCODER_HELP``)."""
    spec = spec.strip()
    if spec == "hashing":
        return HashingEncoder()
    if spec.startswith("hashing:"):
        try:
            return HashingEncoder(int(spec.split(":", 1)[1]))
        except ValueError as exc:
            raise TextEncodingError(f"bad encoder spec {spec!r}: use hashing:DIM with an integer DIM.") from exc
    if spec == "biomedclip":
        return OpenCLIPEncoder(BIOMEDCLIP_HUB_ID, device)
    if spec.startswith(("hf-hub:", "local-dir:")):
        return OpenCLIPEncoder(spec, device)
    if spec.startswith("open_clip:"):
        return OpenCLIPEncoder(spec.split(":", 1)[1], device)
    if spec.startswith("st:"):
        return SentenceTransformerEncoder(spec[3:], device)
    raise TextEncodingError(f"unknown text encoder {spec!r}; {ENCODER_HELP}.")


class EmbeddingCache:
    """Phrase embeddings keyed by (encoder id, phrase); saved as safetensors + phrases.json.

    ``embed`` returns cached vectors and computes missing ones with the encoder when one is attached;
    without an encoder an uncached phrase is a ``TextEncodingError`` naming the phrase and the fix.
    """

    TENSOR_KEY = "embeddings"

    def __init__(self, encoder_id: str, dim: int, encoder: TextEncoder | None = None) -> None:
        self.encoder_id = encoder_id
        self.dim = int(dim)
        self.encoder = encoder
        self._vectors: dict[tuple[str, str], torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._vectors)

    def __contains__(self, phrase: str) -> bool:
        return (self.encoder_id, phrase) in self._vectors

    @property
    def phrases(self) -> list[str]:
        return [p for (eid, p) in self._vectors if eid == self.encoder_id]

    def add(self, phrases: Iterable[str]) -> int:
        """Encode and store every phrase not cached yet; returns how many were added."""
        missing = sorted({p for p in phrases if p not in self})
        if not missing:
            return 0
        if self.encoder is None:
            raise self._missing_error(missing)
        vectors = self.encoder.encode(missing)
        if vectors.shape != (len(missing), self.dim):
            raise TextEncodingError(
                f"encoder {self.encoder.id} returned shape {tuple(vectors.shape)}, expected "
                f"({len(missing)}, {self.dim}); the cache and the networks use dimension {self.dim}."
            )
        if not torch.isfinite(vectors).all():
            raise TextEncodingError(f"encoder {self.encoder.id} returned non-finite embeddings for {missing[:3]}.")
        for phrase, vec in zip(missing, vectors):
            self._vectors[(self.encoder_id, phrase)] = vec.detach().float().cpu().clone()
        return len(missing)

    def embed(self, phrases: Sequence[str]) -> torch.Tensor:
        """[len(phrases), dim] float32 vectors, in order."""
        missing = [p for p in phrases if p not in self]
        if missing:
            if self.encoder is None:
                raise self._missing_error(missing)
            self.add(missing)
        return torch.stack([self._vectors[(self.encoder_id, p)] for p in phrases])

    def context(self, phrase_lists: Sequence[Sequence[str]]) -> torch.Tensor:
        """Cross-attention context [batch, tokens, dim]: one token per attribute phrase."""
        lengths = {len(p) for p in phrase_lists}
        if len(lengths) != 1:
            raise TextEncodingError(f"every item needs the same number of phrases, got lengths {sorted(lengths)}.")
        return torch.stack([self.embed(list(p)) for p in phrase_lists])

    def _missing_error(self, missing: Sequence[str]) -> TextEncodingError:
        shown = ", ".join(repr(p) for p in list(missing)[:5])
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        return TextEncodingError(
            f"no cached embedding for phrase {shown}{more} under encoder {self.encoder_id!r}, and no text "
            "encoder is loaded. Fix: add the phrases to the bundle with the same encoder "
            f"(`lesiondiffusion bundle embed BUNDLE --encoder <spec> --phrase ...`), or use a value from "
            "the report vocabulary, whose phrases every bundle caches."
        )

    # ---- persistence -------------------------------------------------------------------------
    def save(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        keys = sorted(self._vectors)
        matrix = (
            torch.stack([self._vectors[k] for k in keys]) if keys else torch.zeros((0, self.dim))
        ).contiguous()
        with atomic_path(folder / "embeddings.safetensors") as tmp:
            save_file({self.TENSOR_KEY: matrix}, str(tmp))
        index = {
            "encoder_id": self.encoder_id,
            "dim": self.dim,
            "entries": [{"encoder": eid, "phrase": p} for eid, p in keys],
        }
        atomic_write_text(folder / "phrases.json", json.dumps(index, indent=1) + "\n")

    @classmethod
    def load(cls, folder: str | Path, encoder: TextEncoder | None = None) -> "EmbeddingCache":
        from safetensors.torch import load_file

        folder = Path(folder)
        index_path, tensor_path = folder / "phrases.json", folder / "embeddings.safetensors"
        for path in (index_path, tensor_path):
            if not path.is_file():
                raise BundleError(
                    f"missing {path}: the embedding cache needs phrases.json and embeddings.safetensors. "
                    "Recreate it with `lesiondiffusion bundle embed BUNDLE --encoder <spec>`."
                )
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            entries = index["entries"]
            cache = cls(str(index["encoder_id"]), int(index["dim"]), encoder)
        except (ValueError, KeyError, TypeError) as exc:
            raise BundleError(
                f"{index_path} is not a valid phrase index ({type(exc).__name__}: {exc}); it needs keys "
                "encoder_id, dim and entries. Recreate it with `lesiondiffusion bundle embed`."
            ) from exc
        try:
            matrix = load_file(str(tensor_path))[cls.TENSOR_KEY]
        except Exception as exc:
            raise BundleError(
                f"cannot read key {cls.TENSOR_KEY!r} from {tensor_path} ({type(exc).__name__}: {exc}). "
                "Recreate the cache with `lesiondiffusion bundle embed`."
            ) from exc
        if tuple(matrix.shape) != (len(entries), cache.dim):
            raise BundleError(
                f"{tensor_path} key {cls.TENSOR_KEY!r} has shape {tuple(matrix.shape)}, expected "
                f"({len(entries)}, {cache.dim}) from {index_path}. The two files are out of sync; "
                "recreate them with `lesiondiffusion bundle embed`."
            )
        bad = [str(e.get("phrase")) for row, e in zip(matrix, entries) if not torch.isfinite(row).all()]
        if bad:
            raise BundleError(
                f"{tensor_path}: the embedding of {len(bad)} phrase(s) holds NaN/inf ({', '.join(map(repr, bad[:5]))}"
                f"{', ...' if len(bad) > 5 else ''}); they would make every synthesis NaN. Re-embed them with "
                "`lesiondiffusion bundle embed BUNDLE --phrase ...` (or recreate the cache)."
            )
        for row, entry in zip(matrix, entries):
            cache._vectors[(str(entry["encoder"]), str(entry["phrase"]))] = row.clone()
        if encoder is not None and encoder.id != cache.encoder_id:
            raise TextEncodingError(
                f"the bundle's embeddings were made with encoder {cache.encoder_id!r} but {encoder.id!r} "
                "was given; networks are trained on one encoder's vectors. Use the bundle's encoder."
            )
        return cache

    def equals(self, other: "EmbeddingCache") -> bool:
        return (
            self.encoder_id == other.encoder_id
            and self.dim == other.dim
            and self._vectors.keys() == other._vectors.keys()
            and all(torch.equal(v, other._vectors[k]) for k, v in self._vectors.items())
        )
