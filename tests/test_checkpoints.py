"""bench.checkpoints: transformers folders (single file and shards), pickles with and without a wrapper key,
truncated / missing / foreign files named in the error; the pre-flight of Session.check_checkpoint; the
tokenizer-vs-embedding check; and one paper-profile cell end to end from a save_pretrained folder."""
import json
import math

import pytest
import torch
import yaml

from bench.checkpoints import check_matches, checkpoint_files, load_state_dict
from bench.cli import main
from bench.config import Paths
from bench.errors import BenchError, MissingData
from models.gpt2 import Gpt2Adapter
from tests.conftest import build

MICRO = Gpt2Adapter.ARCHS["gpt2_micro"]


def _hf_gpt2(seed=0, **overrides):
    """A plain transformers GPT2LMHeadModel of the micro architecture (what save_pretrained writes)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**{**MICRO, **overrides})).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One model saved twice: one file, and sharded (max_shard_size small: 8 shards + the index)."""
    root = tmp_path_factory.mktemp("ckpt")
    m = _hf_gpt2(seed=1)
    m.save_pretrained(root / "one")
    m.save_pretrained(root / "sharded", max_shard_size="100KB")
    return root, {k: v.clone() for k, v in m.state_dict().items()}


def _same_weights(model, ref: dict):
    own = model.state_dict()
    return all(torch.equal(own[k], v) for k, v in ref.items() if k in own) and \
        {k for k in ref if k not in own} <= {"lm_head.weight"}       # tied to wte: not in our state dict


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_save_pretrained_folder_and_shards_load(saved):
    root, ref = saved
    assert [p.name for p in checkpoint_files(root / "one")] == ["model.safetensors"]
    shards = checkpoint_files(root / "sharded")
    index = json.loads((root / "sharded" / "model.safetensors.index.json").read_text())
    assert len(shards) > 1 and {p.name for p in shards} == set(index["weight_map"].values())
    for folder in ("one", "sharded"):
        adapter, model = build("gpt2_micro", seed=5)
        assert not _same_weights(model, ref)
        adapter.load_checkpoint(model, root / folder, log=lambda m: None)
        assert _same_weights(model, ref), folder
        assert model.lm_head.weight is model.transformer.wte.weight
    assert set(load_state_dict(root / "sharded")) == set(load_state_dict(root / "one"))


def test_missing_shard_truncated_file_and_bad_index_name_the_file(saved, tmp_path):
    root, _ = saved
    d = _copy(root / "sharded", tmp_path / "sharded")
    shard = sorted(d.glob("model-*.safetensors"))[2]
    shard.unlink()
    with pytest.raises(MissingData, match=shard.name) as e:
        checkpoint_files(d)
    assert "download them too" in str(e.value)
    adapter, model = build("gpt2_micro")
    with pytest.raises(MissingData, match=shard.name):
        adapter.load_checkpoint(model, d)
    # a truncated shard: seen by the pre-flight (header vs file size) and by the loader
    d2 = _copy(root / "sharded", tmp_path / "cut")
    cut = sorted(d2.glob("model-*.safetensors"))[1]
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    for call in (lambda: checkpoint_files(d2), lambda: adapter.load_checkpoint(model, d2)):
        with pytest.raises(BenchError, match="truncated or not a safetensors file") as e:
            call()
        assert str(cut) in str(e.value) and "re-download it" in str(e.value)
    one = _copy(root / "one", tmp_path / "one")
    f = one / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(BenchError, match=r"model.safetensors: it is truncated or not a safetensors file"):
        load_state_dict(one)
    (d2 / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(BenchError, match=r"model.safetensors.index.json is not a valid shard index"):
        checkpoint_files(d2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingData, match="The folder is empty"):
        checkpoint_files(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(MissingData, match="holds: config.json"):
        checkpoint_files(tmp_path / "empty")


def test_pickles_with_and_without_a_wrapper_key(saved, tmp_path):
    _, ref = saved
    body = {k[len("transformer."):]: v for k, v in ref.items() if k.startswith("transformer.")}   # GPT2Model keys
    torch.save(body, tmp_path / "bare.pth")
    torch.save({"model": body, "epoch": 3, "args": {"lr": 0.1}}, tmp_path / "wrapped.pth")
    torch.save({"state_dict": {f"module.{k}": v for k, v in body.items()}}, tmp_path / "ddp.pt")
    for name in ("bare.pth", "wrapped.pth", "ddp.pt"):
        assert set(load_state_dict(tmp_path / name)) == set(body), name
        adapter, model = build("gpt2_micro", seed=7)
        adapter.load_checkpoint(model, tmp_path / name, log=lambda m: None)
        assert _same_weights(model, ref), name
    cut = tmp_path / "cut.pth"
    cut.write_bytes((tmp_path / "wrapped.pth").read_bytes()[:5000])
    with pytest.raises(BenchError, match=r"cut.pth.*truncated or not a torch checkpoint.*re-download"):
        load_state_dict(cut)
    torch.save({"epoch": 3}, tmp_path / "no_tensors.pth")
    with pytest.raises(BenchError, match=r"no_tensors.pth holds no tensors"):
        load_state_dict(tmp_path / "no_tensors.pth")


def test_another_architecture_lists_the_first_mismatches(tmp_path):
    _hf_gpt2(n_embd=32).save_pretrained(tmp_path / "narrow")
    adapter, model = build("gpt2_micro")
    with pytest.raises(BenchError) as e:
        adapter.load_checkpoint(model, tmp_path / "narrow")
    msg = str(e.value)
    assert f"checkpoint {tmp_path / 'narrow'} does not match architecture gpt2_micro" in msg
    assert "first mismatches" in msg and "(26 in all)" in msg
    assert "transformer.h.0.attn.c_attn.weight (checkpoint shape (32, 96) vs model (64, 192))" in msg
    assert "\n" not in msg and "model_config" in msg
    # a ViT checkpoint given to GPT-2: missing and unexpected keys, the first few of each
    va, vit = build("vit_micro")
    torch.save({"model": vit.state_dict()}, tmp_path / "vit.pth")
    with pytest.raises(BenchError, match=r"does not match architecture gpt2_micro: .*missing keys \['transformer"
                                         r".*unexpected keys \['transformer\.blocks"):
        adapter.load_checkpoint(model, tmp_path / "vit.pth")
    # and the other way round, through the ViT adapter (timm keys)
    with pytest.raises(BenchError, match=r"does not match architecture vit_micro"):
        va.load_checkpoint(vit, tmp_path / "narrow")
    # check_matches itself: tolerated keys are returned, not raised
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("ln_f.bias")}
    assert check_matches(model, own, "gpt2_micro", "x", optional=("transformer.ln_f.",)) == ["transformer.ln_f.bias"]


def test_session_pre_flight_accepts_folders_and_names_what_is_missing(saved, tmp_path):
    from bench.runner import Session
    root, _ = saved
    session = Session(Paths.resolve(tmp_path / "data", root, tmp_path / "cache", tmp_path / "out"))
    for name in ("one", "sharded"):
        session.check_checkpoint({"checkpoint": name, "model": "gpt2_micro"})     # before: "not found"
    with pytest.raises(MissingData, match=str(root / "nowhere")):
        session.check_checkpoint({"checkpoint": "nowhere", "model": "gpt2_micro"})


# ---------------------------------------------------------------------------------------------------
# tokenizer vs embedding

def _word_tokenizer(folder, n_words: int):
    """A word-level transformers tokenizer saved with save_pretrained ([UNK] + w0..w{n-2}), offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(n_words - 1)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]").save_pretrained(folder)
    return folder


def test_tokenizer_larger_than_the_embedding_is_an_error(tmp_path):
    from bench.registry import TASKS
    _word_tokenizer(tmp_path / "big_tok", 2000)
    _word_tokenizer(tmp_path / "small_tok", 300)
    _, model = build("gpt2_micro")                                       # 1024 embedding rows
    T = TASKS.get("wikitext2_ppl")
    task = T({"tokenizer": "big_tok"}, tmp_path, "paper", tmp_path / "cache")
    with pytest.raises(BenchError) as e:
        task.check_model(model)
    msg = str(e.value)
    assert str(tmp_path / "big_tok") in msg and "2000 token ids" in msg and "1024 rows" in msg
    assert "transformer.wte" in msg and "tokenizer released with the checkpoint" in msg
    ok = T({"tokenizer": "small_tok"}, tmp_path, "paper", tmp_path / "cache")
    ok.check_model(model)                                                # 300 <= 1024: fine


# ---------------------------------------------------------------------------------------------------
# end to end: a paper-profile cell whose checkpoint is a save_pretrained folder

VOCAB = 256


def _corpus(n_lines: int, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    lines = [" = Title = \n", " \n"]
    for _ in range(n_lines):
        ids = torch.randint(1, 60, (12,), generator=g).tolist()
        lines.append(" " + " ".join(f"w{i}" for i in ids) + " \n")
    return "".join(lines)


@pytest.fixture
def paper_env(tmp_path, monkeypatch):
    from bench.cards import load_card
    data, ckpt = tmp_path / "data", tmp_path / "ckpt"
    (data / "wikitext-2-raw").mkdir(parents=True)
    for split, n, seed in (("train", 40, 0), ("valid", 8, 1), ("test", 8, 2)):
        (data / "wikitext-2-raw" / f"wiki.{split}.raw").write_text(_corpus(n, seed))
    _word_tokenizer(data / "tok", 200)
    hf = _hf_gpt2(seed=3, vocab_size=VOCAB)
    hf.save_pretrained(ckpt / "tiny_gpt2")
    hf.save_pretrained(ckpt / "tiny_gpt2_sharded", max_shard_size="60KB")
    card = load_card("vtrans_gpt2")
    card.pop("_path")
    card["table"] = "ckpt_e2e"
    card["methods"] = ["dense", "somp"]
    card["method_options"] = {"somp": card["method_options"]["somp"]}
    card["ratios"] = card["ratios"][:1]
    micro = {k: v for k, v in card["profiles"]["micro"].items()
             if k not in ("vtrans", "fast_vtrans", "faster_vtrans", "sgmp", "upop")}
    card["profiles"] = {"micro": micro, "paper": {
        "model": "gpt2_micro",
        "checkpoint": "tiny_gpt2",
        "model_config": {"vocab_size": VOCAB},
        "data": {"seq_len": 16, "tokenizer": "tok", "train_seq_len": 16, "eval_batch_size": 4},
        "finetune": {"epochs": 1, "lr": 1.0e-4, "batch_size": 8, "weight_decay": 0.0},
        "throughput": {"batch_size": 2, "warmup": 0, "iters": 1, "trials": 1},
    }}
    (tmp_path / "cards").mkdir()
    (tmp_path / "cards" / "ckpt_e2e.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
    monkeypatch.setenv("BENCH_TABLES", str(tmp_path / "cards"))
    monkeypatch.setenv("BENCH_DATA", str(data))
    monkeypatch.setenv("BENCH_CHECKPOINTS", str(ckpt))
    return tmp_path, hf


def _cells(tmp_path, methods, checkpoint=None, **data):
    from bench.cards import load_card
    from bench.runner import expand_cells
    card = load_card("ckpt_e2e")
    if checkpoint:
        card["profiles"]["paper"]["checkpoint"] = checkpoint
    card["profiles"]["paper"]["data"].update(data)
    return expand_cells(card, "paper", methods=methods)


def test_paper_cell_from_a_transformers_folder(paper_env):
    from bench.runner import Session, run_cell
    from tasks.lm_perplexity import perplexity
    tmp_path, hf = paper_env
    session = Session(Paths.resolve(), log=lambda m: None)
    for ckpt in ("tiny_gpt2", "tiny_gpt2_sharded"):
        (cell,) = _cells(tmp_path, "dense", ckpt)
        rec = run_cell(cell, session)
        assert rec["status"] != "error", rec["reason"]
        assert rec["model_tag"] == "checkpoint"
        task = session.task(cell)
        want = perplexity(hf, task.eval_windows("test"), "cpu", batch_size=4)["ppl"]
        assert math.isclose(rec["metrics"]["ppl"], want, rel_tol=1e-4), (ckpt, rec["metrics"], want)
    (cell,) = _cells(tmp_path, "somp")
    rec = run_cell(cell, session)
    assert rec["status"] != "error", rec["reason"]
    assert rec["params"]["total"] < rec["params"]["dense_total"]


def test_paper_cell_errors_name_the_file(paper_env, capsys):
    from bench.runner import Session, run_cell
    tmp_path, _ = paper_env
    ckpt = tmp_path / "ckpt"
    # architecture mismatch: the cell fails at the dense model, before any training, naming the checkpoint
    _hf_gpt2(n_embd=32, vocab_size=VOCAB).save_pretrained(ckpt / "narrow")
    (cell,) = _cells(tmp_path, "somp", "narrow")
    rec = run_cell(cell, Session(Paths.resolve(), log=lambda m: None))
    assert rec["status"] == "error" and "does not match architecture gpt2_micro" in rec["reason"]
    assert str(ckpt / "narrow") in rec["reason"] and rec["timings"]["finetune_s"] == 0.0
    # a tokenizer with more ids than the checkpoint's embedding rows: the cell fails before any training
    _word_tokenizer(tmp_path / "data" / "tok_big", 400)
    (cell,) = _cells(tmp_path, "somp", tokenizer="tok_big")
    rec = run_cell(cell, Session(Paths.resolve(), log=lambda m: None))
    assert rec["status"] == "error" and str(tmp_path / "data" / "tok_big") in rec["reason"]
    assert "400 token ids" in rec["reason"] and "256 rows" in rec["reason"] and rec["timings"]["finetune_s"] == 0.0
    # the CLI's pre-flight catches both before any cell runs: exit 2, one line naming the file
    card = yaml.safe_load((tmp_path / "cards" / "ckpt_e2e.yaml").read_text())
    for key, value, needle in (("checkpoint", "narrow", "does not match architecture gpt2_micro"),
                               ("tokenizer", "tok_big", "400 token ids")):
        bad = yaml.safe_load(yaml.safe_dump(card))
        (bad["profiles"]["paper"] if key == "checkpoint" else bad["profiles"]["paper"]["data"])[key] = value
        (tmp_path / "cards" / "ckpt_e2e.yaml").write_text(yaml.safe_dump(bad, sort_keys=False))
        capsys.readouterr()
        code = main(["run", "--table", "ckpt_e2e", "--profile", "paper", "--methods", "dense"])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err and err.strip().count("\n") == 0 and needle in err, err
    (tmp_path / "cards" / "ckpt_e2e.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
    # the CLI's pre-flight: a missing shard and a truncated shard exit 2 with the file named, no traceback
    shard = sorted((ckpt / "tiny_gpt2_sharded").glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 3])
    card = yaml.safe_load((tmp_path / "cards" / "ckpt_e2e.yaml").read_text())
    card["profiles"]["paper"]["checkpoint"] = "tiny_gpt2_sharded"
    (tmp_path / "cards" / "ckpt_e2e.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
    capsys.readouterr()                                  # (save_pretrained's progress bars)
    code = main(["run", "--table", "ckpt_e2e", "--profile", "paper", "--methods", "dense"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.strip().count("\n") == 0 and str(shard) in err and "re-download it" in err
    shard.unlink()
    code = main(["run", "--table", "ckpt_e2e", "--profile", "paper", "--methods", "dense"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and str(shard) in err and "download them too" in err
