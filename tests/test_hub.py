"""Hugging Face Hub repo ids, model cards and push_to_hub (`conversion.hub`, `conversion.model_card`),
offline: a real Hub cache in tmp_path (huggingface_hub's own layout, checked by its own
`scan_cache_dir`), HF_HUB_OFFLINE=1, and a recording stand-in for `HfApi`.

huggingface_hub reads HF_HUB_CACHE / HF_HUB_OFFLINE into `huggingface_hub.constants` at import:
in this process the tests set those constants; the command-line children get the environment.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMOLLM2, needs_tokenizer, randomize_torch_, run_cli, tiny_cfg
from huggingface_hub import ModelCard, constants, scan_cache_dir

import jaxvlm
import torch_ref
from conversion import hub, model_card
from conversion.config import VLMConfig
from conversion.pretrained import TOKENIZER_FILES
from conversion.safetensors_io import CheckpointError, load_safetensors
from jaxvlm.pretrained import flat_state

REPO = "tester/tiny-vlm"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(cache: Path, repo_id: str, src: Path, commit: str = COMMIT) -> Path:
    """Put the files of `src` into the Hub cache `cache` as huggingface_hub lays out a download:
    models--OWNER--NAME/{blobs/<sha256>, snapshots/<commit>/<file> -> ../../blobs/<sha256>, refs/main}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, repo / "blobs" / digest)
        (snap / f.name).symlink_to(Path("../../blobs") / digest)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snap


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A randomised tiny checkpoint directory (with the SmolLM2 tokenizer files when present)."""
    d = tmp_path_factory.mktemp("tiny")
    model = randomize_torch_(torch_ref.VisionLanguageModel(tiny_cfg(lm_max_length=64)), seed=0)
    model.save_pretrained(d)
    for name in TOKENIZER_FILES:
        if (SMOLLM2 / name).is_file():
            shutil.copyfile(SMOLLM2 / name, d / name)
    return d


@pytest.fixture
def offline_cache(tmp_path, monkeypatch, tiny_dir):
    """A Hub cache holding REPO, used offline; returns (cache, environment for CLI children)."""
    cache = tmp_path / "hf-cache"
    cache_repo(cache, REPO, tiny_dir)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache, {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}


# ---- resolve -----------------------------------------------------------------------------------
def test_the_cache_is_huggingface_hubs_layout(offline_cache):
    cache, _ = offline_cache
    info = scan_cache_dir(cache)
    assert not info.warnings, info.warnings
    (repo,) = info.repos
    assert repo.repo_id == REPO and repo.repo_type == "model"
    assert [r.commit_hash for r in repo.revisions] == [COMMIT] and set(next(iter(repo.revisions)).refs) == {"main"}


def test_is_repo_id():
    for name in ("owner/name", "lusxvr/nanoVLM-222M", "HuggingFaceTB/SmolVLM-256M-Instruct"):
        assert hub.is_repo_id(name), name
    for name in ("name", "/abs/path", "runs/demo/model", "./x", "../x/y", "o/n.git", "o--x/y", "a/b c", ""):
        assert not hub.is_repo_id(name), name


def test_resolve(offline_cache, tiny_dir, tmp_path):
    cache, _ = offline_cache
    assert hub.resolve(tiny_dir) == tiny_dir  # a directory as is, never looked up
    snap = hub.resolve(REPO)
    assert snap == cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT
    assert (snap / "config.json").read_bytes() == (tiny_dir / "config.json").read_bytes()
    with pytest.raises(CheckpointError, match=r"^checkpoint directory not found: .*absent$"):
        hub.resolve(tmp_path / "absent")
    with pytest.raises(CheckpointError, match=r"is a file, not a checkpoint directory"):
        hub.resolve(tiny_dir / "config.json")
    with pytest.raises(
        CheckpointError,
        match=r"^--model 'tester/absent': .* 'tester/absent' is not in the local Hugging Face cache \(HF_HUB_OFFLINE=1",
    ):
        hub.resolve("tester/absent", what="--model")


def test_from_pretrained_repo_id_loads_the_same_weights(offline_cache, tiny_dir):
    jdir, jrepo = jaxvlm.VisionLanguageModel.from_pretrained(tiny_dir), jaxvlm.VisionLanguageModel.from_pretrained(REPO)
    a, b = flat_state(jdir), flat_state(jrepo)
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), f"jaxvlm {k}: the repo id loaded other weights"
    tdir, trepo = (
        torch_ref.VisionLanguageModel.from_pretrained(tiny_dir),
        torch_ref.VisionLanguageModel.from_pretrained(REPO),
    )
    for (k, v), (k2, v2) in zip(tdir.state_dict().items(), trepo.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), f"torch_ref {k}: the repo id loaded other weights"
    with pytest.raises(CheckpointError, match="'tester/absent'"):
        torch_ref.VisionLanguageModel.from_pretrained("tester/absent")


@needs_tokenizer
def test_command_line_resolves_a_repo_id(offline_cache, tmp_path):
    _, env = offline_cache
    code, out, err = run_cli(
        "-m", "jaxvlm", "synthetic", "--model", REPO, "--out", str(tmp_path / "s.png"), env=env, timeout=120
    )
    assert code == 0, err
    assert (tmp_path / "s.png").is_file() and '"question"' in out
    code, out, err = run_cli("-m", "jaxvlm", "eval", "--model", "tester/absent", env=env, timeout=120)
    assert code == 2 and len(err) == 1, err
    assert re.match(
        r"^error: --model 'tester/absent': .*not in the local Hugging Face cache \(HF_HUB_OFFLINE=1", err[0]
    )


# ---- model cards ---------------------------------------------------------------------------------
def _save(framework: str, model_dir: Path, out: Path, **kwargs) -> None:
    if framework == "jaxvlm":
        jaxvlm.VisionLanguageModel.from_pretrained(model_dir).save_pretrained(out, **kwargs)
    else:
        torch_ref.VisionLanguageModel.from_pretrained(model_dir).save_pretrained(out, **kwargs)


@pytest.mark.parametrize("framework", ["jaxvlm", "torch_ref"])
def test_model_card(framework, tiny_dir, tmp_path):
    out = tmp_path / "out"
    _save(framework, tiny_dir, out, model_card=True)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    card = ModelCard.load(out / "README.md")  # the Hub's own parser of the front matter
    meta = card.data.to_dict()
    assert meta["library_name"] == "jaxvlm" and meta["pipeline_tag"] == "image-text-to-text"
    assert {"vision-language-model", "nanovlm", "jaxvlm"} <= set(meta["tags"])
    assert "license" not in meta  # not known: left out
    tensors, _ = load_safetensors(out / "model.safetensors")
    n = sum(t.size for t in tensors.values())
    text = card.text
    for needle in (
        f"{n:,}",
        "jaxvlm.VisionLanguageModel.from_pretrained(",
        "torch_ref.VisionLanguageModel.from_pretrained(",
        "from models.vision_language_model import VisionLanguageModel",
        "width 64, 2 blocks",
    ):
        assert needle in text, f"the card lacks {needle!r}"
    assert "AutoModelForImageTextToText" not in text  # a nanoVLM model
    _save(framework, tiny_dir, out, model_card=True)  # our own card is rewritten
    assert not any(p.name.startswith(".tmp-") for p in out.iterdir())
    _save(framework, tiny_dir, tmp_path / "plain")  # without model_card: upstream's two files only
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize("framework", ["jaxvlm", "torch_ref"])
def test_model_card_never_replaces_a_users_readme(framework, tiny_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("# my notes\n")
    with pytest.raises(FileExistsError, match=r"README\.md exists and was not written by save_pretrained"):
        _save(framework, tiny_dir, out, model_card=True)
    assert sorted(p.name for p in out.iterdir()) == ["README.md"]  # nothing written: checked first
    assert (out / "README.md").read_text() == "# my notes\n"


def test_model_card_of_a_smolvlm_names_transformers():
    cfg = VLMConfig.tiny(vlm_family="smolvlm", vlm_image_token_id=49190)
    text = model_card.render(cfg, 1234, repo_id=REPO)
    assert "AutoModelForImageTextToText.from_pretrained" in text and "conversion to-smolvlm" in text
    assert "from models.vision_language_model" not in text  # upstream refuses jaxvlm's config fields
    assert f'from_pretrained("{REPO}")' in text


# ---- push_to_hub -------------------------------------------------------------------------------
class RecordingApi:
    """Stands in for huggingface_hub.HfApi: records the calls and what the folder held."""

    calls: list = []

    def __init__(self, **kwargs):
        self.calls.append(("init", kwargs))

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        files = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        self.calls.append(("upload_folder", repo_id, kwargs, files))
        return f"https://huggingface.co/{repo_id}/commit/{COMMIT}"


@pytest.mark.parametrize("framework", ["jaxvlm", "torch_ref"])
def test_push_to_hub_uploads_the_staged_folder(framework, tiny_dir, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    RecordingApi.calls = []
    cls = jaxvlm.VisionLanguageModel if framework == "jaxvlm" else torch_ref.VisionLanguageModel
    model = cls.from_pretrained(tiny_dir)
    tokenizer = tiny_dir if (tiny_dir / "tokenizer.json").is_file() else None
    url = model.push_to_hub(REPO, tokenizer=tokenizer, private=True, token="t0k", commit_message="tiny")
    assert url.endswith(COMMIT)
    (init, create, upload) = RecordingApi.calls
    assert init[1]["token"] == "t0k"
    assert create[1] == REPO and create[2]["exist_ok"] is True and create[2]["private"] is True
    assert upload[1] == REPO and upload[2]["commit_message"] == "tiny"
    files = upload[3]
    want = {"config.json", "model.safetensors", "README.md"}
    if tokenizer is not None:
        want |= {n for n in TOKENIZER_FILES if (tiny_dir / n).is_file()}
    assert set(files) == want
    assert files["model.safetensors"] == (tiny_dir / "model.safetensors").read_bytes()
    assert f'from_pretrained("{REPO}")'.encode() in files["README.md"]


def test_stage_for_upload(tiny_dir, tmp_path):
    model = torch_ref.VisionLanguageModel.from_pretrained(tiny_dir)
    staged = hub.stage_for_upload(lambda d: model.save_pretrained(d, model_card=True), tmp_path / "stage")
    assert sorted(p.name for p in staged.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    with pytest.raises(FileExistsError, match="not empty"):
        hub.stage_for_upload(lambda d: None, staged)
    with pytest.raises(CheckpointError, match="lacks README.md"):
        hub.stage_for_upload(model.save_pretrained, tmp_path / "no-card")
    with pytest.raises(ValueError, match="not a Hub repo id"):
        hub.push_to_hub(model.save_pretrained, "no-owner")
