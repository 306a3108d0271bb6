"""Text encoders and the embedding cache: hashing encoder, open_clip local folder, cache round trip."""

from __future__ import annotations

import json

import pytest
import torch

from lesiondiffusion.errors import BundleError, TextEncodingError
from lesiondiffusion.text import EmbeddingCache, HashingEncoder, OpenCLIPEncoder, make_encoder


def test_hashing_encoder_is_deterministic_normalised_and_word_sensitive():
    enc = HashingEncoder(64)
    a = enc.encode(["shape: round-like", "shape: irregular", "density: hypodense"])
    b = HashingEncoder(64).encode(["shape: round-like", "shape: irregular", "density: hypodense"])
    assert a.shape == (3, 64) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert torch.allclose(a.norm(dim=1), torch.ones(3), atol=1e-5)
    # phrases sharing the attribute word are closer than phrases sharing nothing
    assert float(a[0] @ a[1]) > float(a[0] @ a[2]) + 0.1
    assert make_encoder("hashing:64").id == "hashing:64" and make_encoder("hashing").dim == 512
    with pytest.raises(TextEncodingError, match="empty phrase"):
        enc.encode(["  :  "])


def test_unknown_and_missing_optional_encoders_explain_the_fix():
    with pytest.raises(TextEncodingError, match="hashing"):
        make_encoder("word2vec")
    with pytest.raises(TextEncodingError, match="sentence-transformers"):
        make_encoder("st:/nonexistent/model")
    with pytest.raises(TextEncodingError, match="open_clip_config.json"):
        make_encoder("local-dir:/nonexistent/biomedclip")


def test_cache_round_trip_and_uncached_phrase_error(tmp_path):
    enc = HashingEncoder(32)
    cache = EmbeddingCache(enc.id, enc.dim, encoder=enc)
    assert cache.add(["shape: oval", "organ: kidney", "shape: oval"]) == 2
    cache.save(tmp_path)
    loaded = EmbeddingCache.load(tmp_path)
    assert loaded.equals(cache) and loaded.encoder is None
    ctx = loaded.context([["shape: oval", "organ: kidney"], ["organ: kidney", "organ: kidney"]])
    assert ctx.shape == (2, 2, 32)
    assert torch.equal(ctx[0, 0], enc.encode(["shape: oval"])[0])
    with pytest.raises(TextEncodingError) as err:
        loaded.embed(["shape: cauliflower"])
    assert "'shape: cauliflower'" in str(err.value) and "bundle embed" in str(err.value)
    # an attached encoder fills the gap and the cache remembers it
    loaded.encoder = enc
    assert loaded.embed(["shape: cauliflower"]).shape == (1, 32) and "shape: cauliflower" in loaded


def test_cache_files_out_of_sync_are_reported(tmp_path):
    enc = HashingEncoder(16)
    cache = EmbeddingCache(enc.id, enc.dim, encoder=enc)
    cache.add(["a: b", "c: d"])
    cache.save(tmp_path)
    index = json.loads((tmp_path / "phrases.json").read_text())
    index["entries"].pop()
    (tmp_path / "phrases.json").write_text(json.dumps(index))
    with pytest.raises(BundleError, match=r"shape \(2, 16\), expected \(1, 16\)"):
        EmbeddingCache.load(tmp_path)
    (tmp_path / "embeddings.safetensors").unlink()
    with pytest.raises(BundleError, match="embeddings.safetensors"):
        EmbeddingCache.load(tmp_path)


def _tiny_clip_folder(folder, text_cfg):
    folder.mkdir()
    cfg = {
        "model_cfg": {
            "embed_dim": 24,
            "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
            "text_cfg": text_cfg,
        },
        "preprocess_cfg": {},
    }
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    return cfg


def test_open_clip_local_folder_loads_saved_weights_offline(tmp_path):
    """BiomedCLIP's loading path (open_clip `local-dir:`) on a tiny random model built here."""
    import open_clip
    from safetensors.torch import save_file

    folder = tmp_path / "tiny_clip"
    _tiny_clip_folder(folder, {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1})
    with pytest.raises(TextEncodingError, match="no weights"):
        OpenCLIPEncoder(f"local-dir:{folder}")
    torch.manual_seed(3)
    reference = open_clip.create_model(f"local-dir:{folder}").eval()
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(folder / "open_clip_model.safetensors"))

    enc = make_encoder(f"local-dir:{folder}")
    assert enc.id == "open_clip:local-dir:tiny_clip" and enc.dim == 24
    phrases = ["shape: round-like", "density: hypodense"]
    out = enc.encode(phrases)
    assert out.shape == (2, 24)
    assert torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)
    tokens = open_clip.get_tokenizer(f"local-dir:{folder}")(phrases)
    with torch.inference_mode():
        expected = reference.encode_text(tokens, normalize=True)
    assert torch.allclose(out, expected, atol=1e-5)  # the saved weights were loaded, not re-initialised


def test_biomedclip_style_folder_without_transformers_says_so(tmp_path):
    pytest.importorskip("open_clip")
    try:
        import transformers  # noqa: F401

        pytest.skip("transformers is installed here")
    except ImportError:
        pass
    folder = tmp_path / "biomedclip"
    _tiny_clip_folder(folder, {"hf_model_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                               "hf_tokenizer_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                               "context_length": 256})
    (folder / "open_clip_pytorch_model.bin").write_bytes(b"")
    with pytest.raises(TextEncodingError, match="pip install transformers"):
        make_encoder(f"local-dir:{folder}")
