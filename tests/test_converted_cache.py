"""The converted-model cache (issue 25 item 8): a manifest of sizes and hashes written at conversion, checked on
load; a damaged copy is moved away in one step and rebuilt, with one line saying so; the copy is readable to all."""
from __future__ import annotations

import json
import os
import stat

import pytest
import torch

import kvbench.models as models
from conftest import cached_model, model_spec


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A converted copy of a small model (the tiny Llama with SmolLM2's tokenizer) where the embedded model's would
    be; returns (spec, folder, save) where save() writes it again."""
    folder = tmp_path / "converted" / "model-f2"
    monkeypatch.setattr(models, "converted_folder", lambda spec, dtype: folder)
    monkeypatch.delenv("KVBENCH_CACHE", raising=False)
    spec = models.EMBEDDED
    model, tokenizer = cached_model("tiny_llama")

    def save():
        old = os.umask(0o077)  # a private umask: the copy must still be readable to everyone
        try:
            models._save_converted(spec, model, tokenizer, torch.float32)
        finally:
            os.umask(old)
    save()
    return spec, folder, save


def test_copy_has_a_manifest_and_is_readable_to_everyone(cache):
    spec, folder, _ = cache
    manifest = json.loads((folder / models.CONVERTED_MARK).read_text())["files"]
    assert {"model.safetensors", "tokenizer.json", "config.json"} <= set(manifest)
    assert manifest["model.safetensors"]["size"] == (folder / "model.safetensors").stat().st_size > 0
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in folder.iterdir())
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert not [p for p in folder.parent.iterdir() if p != folder]  # no temporary folder left
    assert models._converted(spec, torch.float32) == folder


@pytest.mark.parametrize("damage, reason", [
    (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:100]),
     r"model.safetensors has 100 bytes, \d+ were written"),
    (lambda f: (f / "model.safetensors").write_bytes(b""), r"model.safetensors has 0 bytes"),
    (lambda f: (f / "tokenizer.json").unlink(), "tokenizer.json is missing"),
    (lambda f: (f / "tokenizer.json").write_bytes(b"{" + (f / "tokenizer.json").read_bytes()[1:-1] + b"!"),
     r"tokenizer.json is not the file written \(sha256 differs\)"),
    (lambda f: (f / models.CONVERTED_MARK).unlink(), "kvbench-manifest.json is missing"),
])
def test_a_damaged_copy_is_removed_in_one_step_said_in_one_line_and_rebuilt(cache, capsys, damage, reason):
    spec, folder, save = cache
    damage(folder)
    assert models._converted(spec, torch.float32) is None
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is damaged (" in err and "reading the GGUF instead" in err
    assert __import__("re").search(reason, err), err
    assert not folder.parent.exists() or not list(folder.parent.iterdir())  # no half copy, nothing set aside
    # What load_model does next: read the GGUF, then write a new copy, which is used from then on.
    save()
    capsys.readouterr()
    assert models._converted(spec, torch.float32) == folder and capsys.readouterr().err == ""


def test_tiny_models_borrowing_the_tokenizer_survive_a_damaged_copy(cache, capsys):
    spec, folder, _ = cache
    (folder / "tokenizer.json").write_text("{}")
    tokenizer = models.load_tokenizer(model_spec("tiny_llama"))  # SmolLM2's tokenizer, from its GGUF
    assert tokenizer.encode("Dolores Park", add_special_tokens=False)
    assert "is damaged" in capsys.readouterr().err


def test_a_local_folder_that_fails_to_load_gets_no_hub_advice(tmp_path):
    err = models._hub_error(str(tmp_path), OSError("bad file"))
    assert "huggingface-cli" not in str(err) and "local folder" in str(err)
