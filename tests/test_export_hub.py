"""--push-to-hub with the Hub client replaced: the right calls, no network, the token never shown."""

import pytest
import torch

import huggingface_hub
from storyseek.cli import main
from storyseek.data.tokenizer import BPETokenizer
from storyseek.errors import StoryseekError
from storyseek.export.hf import export_model
from storyseek.model import Transformer, get_preset, pad_vocab
from storyseek.checkpoint import save_checkpoint

TOKEN = "hf_SECRETtokenVALUE123"


class FakeApi:
    calls: list = []
    fail_status: int | None = None

    def __init__(self, *args, **kwargs):
        FakeApi.calls.append(("init", kwargs))

    def create_repo(self, repo_id, **kwargs):
        FakeApi.calls.append(("create_repo", repo_id, kwargs))
        if FakeApi.fail_status:
            error = RuntimeError(f"401 Client Error for token {TOKEN}")
            error.response = type("R", (), {"status_code": FakeApi.fail_status})()
            raise error
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        FakeApi.calls.append(("upload_folder", kwargs, sorted(p.name for p in __import__("pathlib").Path(kwargs["folder_path"]).iterdir())))


@pytest.fixture
def hub(monkeypatch):
    FakeApi.calls, FakeApi.fail_status = [], None
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: TOKEN)
    return FakeApi


@pytest.fixture
def ckpt(tmp_path):
    tok = BPETokenizer.train(300, ["Once upon a time a fox saw the moon."] * 30)
    cfg = get_preset("tiny").replace(vocab_size=pad_vocab(tok.vocab_size), n_layer=2, n_embd=64, n_head=2,
                                     kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                                     inter_dim=64, moe_inter_dim=32)
    path = tmp_path / "run" / "ckpt.pt"
    save_checkpoint(path, {"model_config": cfg.to_dict(), "tokenizer": tok.to_dict(),
                           "model": Transformer(cfg).state_dict(), "iter": 1234})
    (tmp_path / "run" / "training_log.csv").write_text(
        "iteration,train_loss,val_loss,mtp_loss\n1000,2.5,2.6,3.1\n1234,2.1,2.25,2.9\n")
    (tmp_path / "run" / "training_metrics.png").write_bytes(b"\x89PNG fake")
    return path


def test_push_uploads_the_export(hub, ckpt, tmp_path, capsys):
    assert main(["export", "--model", str(ckpt), "--out", str(tmp_path / "hf"),
                 "--push-to-hub", "alice/tiny-stories", "--private"]) == 0
    kinds = [c[0] for c in hub.calls]
    assert kinds == ["init", "create_repo", "upload_folder"]
    _, repo, kw = hub.calls[1]
    assert repo == "alice/tiny-stories" and kw["private"] is True and kw["exist_ok"] is True
    _, up, files = hub.calls[2]
    assert up["repo_id"] == "alice/tiny-stories" and up["folder_path"] == str(tmp_path / "hf")
    assert {"README.md", "config.json", "model.safetensors", "training_metrics.png"} <= set(files)
    captured = capsys.readouterr()
    assert TOKEN not in captured.out + captured.err
    assert "https://huggingface.co/alice/tiny-stories" in captured.out
    card = (tmp_path / "hf" / "README.md").read_text()
    assert 'from_pretrained("alice/tiny-stories")' in card and "![training metrics](training_metrics.png)" in card
    assert "optimizer steps: 1,234" in card and "val_loss 2.2500" in card and "train_loss 2.1000" in card


def test_push_failure_is_one_line_without_token(hub, ckpt, tmp_path, capsys):
    hub.fail_status = 401
    assert main(["export", "--model", str(ckpt), "--out", str(tmp_path / "hf"), "--push-to-hub", "alice/x"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "HTTP 401" in err and TOKEN not in err
    assert (tmp_path / "hf" / "model.safetensors").is_file()  # the export itself is kept


def test_push_checks_before_exporting(hub, ckpt, tmp_path, monkeypatch):
    with pytest.raises(StoryseekError, match="USER/NAME"):
        export_model(ckpt, tmp_path / "a", push_to_hub="no-slash")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(StoryseekError, match="no Hugging Face token"):
        export_model(ckpt, tmp_path / "b", push_to_hub="alice/x")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and hub.calls == []


def test_private_needs_push(ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", "--model", str(ckpt), "--out", str(tmp_path / "hf"), "--private"])
    assert e.value.code == 2 and "--push-to-hub" in capsys.readouterr().err
