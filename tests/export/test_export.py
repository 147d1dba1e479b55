"""`lmssl export`: real tiny runs -> folders stock transformers loads, with the same outputs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from lmssl.cli import main
from lmssl.data.tokenizer import default_tokenizer_path, load_tokenizer
from lmssl.errors import UserError
from lmssl.export import core, transformers_map
from lmssl.export.core import export_model, probe_batch
from lmssl.export.native import load_native
from lmssl.models import LMHead, TextBackbone
from lmssl.models.generate import generate_ids
from lmssl.objectives.causal_lm import CausalLM
from lmssl.runs import load_run
from tests.export._runs import perturb, pretrain, tiny_config, write_run

TOL = 1e-4


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory):
    return pretrain(tmp_path_factory.mktemp("gpt") / "run", "gpt2", steps=3)


def _front_matter(readme: str) -> dict:
    assert readme.startswith("---\n")
    return yaml.safe_load(readme.split("---\n")[1])


def _compare_causal(run_dir, out_dir, prompt="And God said"):
    """Logits on the probe batch and greedy continuations: lmssl vs the reloaded folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    objective, cfg, tok = load_run(run_dir)
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    ids, mask = probe_batch(cfg)
    with torch.no_grad():
        ours = objective.logits(ids, mask)
        theirs = model(input_ids=ids, attention_mask=mask).logits
    assert theirs.shape[-1] == cfg.model.vocab_size == len(tok)  # padded rows sliced off
    diff = float((ours - theirs)[mask.bool()].abs().max())
    assert diff < TOL, diff
    hf_tok = AutoTokenizer.from_pretrained(out_dir)
    prompt_ids = hf_tok(prompt, return_tensors="pt")["input_ids"]
    assert prompt_ids.tolist() == tok(prompt, return_tensors="pt")["input_ids"].tolist()
    n = 12
    lm = generate_ids(objective.backbone, objective.head, prompt_ids, n, temperature=0)
    with torch.no_grad():
        hf = model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), do_sample=False,
                            max_new_tokens=n)
    k = min(lm.shape[1], hf.shape[1])  # transformers stops early at eos
    assert lm[:, :k].tolist() == hf[:, :k].tolist()
    return diff


def test_gpt2_run_exports_to_gpt2lmheadmodel(gpt_run, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main(["export", str(gpt_run), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "max |diff|" in printed and "GPT2LMHeadModel" in printed
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "README.md", "loss_curve.png"} <= names
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["n_embd"] == 64 and config["n_layer"] == 2
    assert config["activation_function"] == "gelu_new" and config["tie_word_embeddings"] is True
    assert config["pad_token_id"] == 1 and config["eos_token_id"] == 0
    _compare_causal(gpt_run, out)

    from transformers import AutoModel, pipeline

    assert type(AutoModel.from_pretrained(out)).__name__ == "GPT2Model"
    text = pipeline("text-generation", model=str(out))("And God said", max_new_tokens=5, do_sample=False)
    assert text[0]["generated_text"].startswith("And God said")

    readme = (out / "README.md").read_text()
    meta = _front_matter(readme)
    assert meta["library_name"] == "transformers" and meta["license"] == "apache-2.0"
    assert meta["pipeline_tag"] == "text-generation" and "datasets" not in meta  # local files: no Hub id
    assert meta["tags"] == ["lmssl", "clm", "gpt2"]
    assert "![loss curve](loss_curve.png)" in readme and "optimizer steps: 3" in readme
    tokens = json.loads((gpt_run / "final_metrics.json").read_text())["tokens_seen"]
    assert tokens == 3 * 8 * 32 and f"tokens seen: {tokens:,}" in readme
    assert "| eval_loss |" in readme and "objective: clm" in readme


def test_llama_run_exports_to_llamaforcausallm(tmp_path):
    run = pretrain(tmp_path / "run", "llama", steps=2)
    out = tmp_path / "hf"
    result = core.export_run(run, out, log=lambda m: None)
    assert result.architecture == "LlamaForCausalLM" and max(result.checks.values()) < TOL
    config = json.loads((out / "config.json").read_text())
    assert config["num_key_value_heads"] == 2 and config["intermediate_size"] == 96
    assert config["vocab_size"] == 8192 and not config["attention_bias"] and not config["mlp_bias"]
    _compare_causal(run, out)


def test_bert_mlm_run_exports_to_bertformaskedlm(tmp_path):
    from transformers import AutoModel, AutoModelForMaskedLM, pipeline

    run = pretrain(tmp_path / "run", "bert", steps=2)
    out = tmp_path / "hf"
    result = core.export_run(run, out, license="mit", log=lambda m: None)
    assert result.architecture == "BertForMaskedLM"
    objective, cfg, tok = load_run(run)
    ids, mask = probe_batch(cfg)
    mlm = AutoModelForMaskedLM.from_pretrained(out, dtype=torch.float32).eval()
    base = AutoModel.from_pretrained(out, dtype=torch.float32).eval()
    assert type(base).__name__ == "BertModel"
    with torch.no_grad():
        hidden = objective.backbone(ids, mask, is_causal=False)
        ours = objective.head(hidden)[..., : cfg.model.vocab_size]
        theirs = mlm(input_ids=ids, attention_mask=mask).logits
        keep = mask.bool()
        assert float((ours - theirs)[keep].abs().max()) < TOL
        assert float((hidden - base(input_ids=ids, attention_mask=mask).last_hidden_state)[keep].abs().max()) < TOL
    fills = pipeline("fill-mask", model=str(out))(f"And God said, Let there be {tok.mask_token}", top_k=3)
    assert len(fills) == 3 and all("sequence" in f for f in fills)
    meta = _front_matter((out / "README.md").read_text())
    assert meta["pipeline_tag"] == "fill-mask" and meta["license"] == "mit" and meta["tags"] == ["lmssl", "mlm", "bert"]
    assert not (out / "generation_config.json").exists()


def test_modernbert_mlm_run_exports_to_modernbertformaskedlm(tmp_path, capsys):
    """A real run with local blocks (window 16 < the 32-token probe) -> ModernBertForMaskedLM:
    logits and AutoModel hidden states match, fill-mask works, and the folder fine-tunes as
    ModernBertForSequenceClassification with the pretrained head and a fresh classifier."""
    from transformers import AutoModel, AutoModelForMaskedLM, ModernBertForSequenceClassification, pipeline

    from lmssl.objectives import mean_pool

    run = pretrain(tmp_path / "run", "modernbert", steps=2)
    out = tmp_path / "hf"
    assert main(["export", str(run), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ModernBertForMaskedLM" in printed and "max |diff|" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["ModernBertForMaskedLM"] and config["model_type"] == "modernbert"
    assert config["layer_types"] == ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
    assert config["local_attention"] == 16 and config["global_attn_every_n_layers"] == 3
    assert config["rope_parameters"]["full_attention"]["rope_theta"] == 160000.0
    assert config["rope_parameters"]["sliding_attention"]["rope_theta"] == 10000.0
    assert not config["attention_bias"] and not config["mlp_bias"] and not config["norm_bias"]
    assert config["decoder_bias"] and config["tie_word_embeddings"] and config["classifier_pooling"] == "mean"
    objective, cfg, tok = load_run(run)
    assert (config["pad_token_id"], config["cls_token_id"], config["sep_token_id"]) == (
        tok.pad_token_id, tok.cls_token_id, tok.sep_token_id)
    ids, mask = probe_batch(cfg)
    assert ids.shape[1] > cfg.model.local_attention // 2 + 1  # the window is checked, not only global attention
    mlm = AutoModelForMaskedLM.from_pretrained(out, dtype=torch.float32).eval()
    base = AutoModel.from_pretrained(out, dtype=torch.float32).eval()
    assert type(base).__name__ == "ModernBertModel"
    keep = mask.bool()
    with torch.no_grad():
        hidden = objective.backbone(ids, mask, is_causal=False)
        ours = objective.head(hidden)[..., : cfg.model.vocab_size]
        assert float((ours - mlm(input_ids=ids, attention_mask=mask).logits)[keep].abs().max()) < TOL
        assert float((hidden - base(input_ids=ids, attention_mask=mask).last_hidden_state)[keep].abs().max()) < TOL
    fills = pipeline("fill-mask", model=str(out))(f"And God said, Let there be {tok.mask_token}", top_k=3)
    assert len(fills) == 3 and all("sequence" in f for f in fills)
    clf, info = ModernBertForSequenceClassification.from_pretrained(out, num_labels=6, output_loading_info=True)
    assert sorted(info["missing_keys"]) == ["classifier.bias", "classifier.weight"]
    assert set(info["unexpected_keys"]) <= {"decoder.bias"}  # the vocabulary bias of the MLM head
    assert torch.equal(clf.head.dense.weight, mlm.head.dense.weight)  # the pretrained head is kept
    clf.eval()
    with torch.no_grad():  # it averages the real tokens (lmssl pretrains without a class token in front)
        h = clf.model(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = mean_pool(h, mask)
        logits = clf(input_ids=ids, attention_mask=mask).logits
        assert logits.shape == (2, 6) and torch.allclose(logits, clf.classifier(clf.head(pooled)), atol=1e-5)
    meta = _front_matter((out / "README.md").read_text())
    assert meta["pipeline_tag"] == "fill-mask" and meta["tags"] == ["lmssl", "mlm", "modernbert"]
    assert "classifier_pooling" in (out / "README.md").read_text()


class _Masked(torch.nn.Module):
    """The MaskedLM contract (.backbone + .head), built directly."""

    def __init__(self, cfg):
        super().__init__()
        self.backbone = TextBackbone(cfg)
        self.head = LMHead(cfg, self.backbone.tokens)


@pytest.mark.parametrize("case", ["gpt2_untied", "llama_bias_mha", "bert_no_types_no_bias", "modernbert_bias_untied"])
def test_mapping_is_exact_for_every_tensor(case, tmp_path):
    """Every parameter moved off its init (so a swapped or dropped tensor shows) and the
    less common options: untied GPT-2 head, Llama with biases, BERT without token types,
    ModernBERT with biases, an untied head without a vocabulary bias and local blocks."""
    if case == "gpt2_untied":
        cfg = tiny_config("gpt_tiny", tie_embeddings=False, pad_vocab_multiple=100, activation="gelu")
        objective = CausalLM(cfg.model)
    elif case == "llama_bias_mha":
        cfg = tiny_config("llama_tiny", bias=True, n_kv_heads=0, mlp_hidden=0, rope_theta=500.0)
        objective = CausalLM(cfg.model)
    elif case == "bert_no_types_no_bias":
        cfg = tiny_config("bert_tiny", "mlm", type_vocab_size=0, head_bias=False)
        objective = _Masked(cfg.model)
    else:
        cfg = tiny_config("modernbert_tiny", "mlm", bias=True, tie_embeddings=False, head_bias=False, n_layers=3,
                          mlp_hidden=96, local_attention=16)
        objective = _Masked(cfg.model)
    perturb(objective)
    result = export_model(objective, cfg, load_tokenizer("default"), tmp_path / "hf", log=lambda m: None)
    assert len(result.checks) == 2 and max(result.checks.values()) < TOL, result.checks


def test_a_wrong_mapping_is_caught_and_nothing_is_written(tmp_path, monkeypatch):
    cfg = tiny_config("gpt_tiny")
    objective = perturb(CausalLM(cfg.model))
    good, head = transformers_map.REGISTRY[("clm", "gpt2")]

    def swapped(obj, c, tok):
        conv = good(obj, c, tok)
        sd = conv.state_dict
        sd["transformer.h.0.ln_1.weight"], sd["transformer.h.0.ln_2.weight"] = (
            sd["transformer.h.0.ln_2.weight"], sd["transformer.h.0.ln_1.weight"])
        return conv

    monkeypatch.setitem(transformers_map.REGISTRY, ("clm", "gpt2"), (swapped, head))
    with pytest.raises(UserError, match="export check failed"):
        export_model(objective, cfg, load_tokenizer("default"), tmp_path / "hf", log=lambda m: None)
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf.tmp*"))


def test_custom_family_gets_lmssl_weights_and_a_note(tmp_path, capsys):
    cfg = tiny_config("encoder_tiny", mlp_hidden=96)
    objective = perturb(CausalLM(cfg.model))
    run = write_run(tmp_path / "run", cfg, objective)
    out = tmp_path / "out"
    assert main(["export", str(run), str(out)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no exact transformers equivalent for objective 'clm' with family 'custom'" in err[0]
    assert "exporting the backbone weights as safetensors + note" in err[0]
    assert {"model.safetensors", "lmssl_config.json", "README.md", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert "load_native" in (out / "README.md").read_text()
    backbone, cfg2, _ = load_native(out)
    ids, mask = probe_batch(cfg)
    with torch.no_grad():
        assert torch.equal(backbone(ids, mask, is_causal=False), objective.backbone(ids, mask, is_causal=False))


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_export_errors_are_one_line(tmp_path, gpt_run, capsys):
    # RUN_DIR is not a run
    (tmp_path / "empty").mkdir()
    assert main(["export", str(tmp_path / "empty"), str(tmp_path / "o1")]) == 2
    assert "is not an lmssl run directory" in _one_error_line(capsys)
    # unknown architecture family
    cfg = tiny_config("gpt_tiny")
    objective = CausalLM(cfg.model)
    cfg.model.family = "mamba"
    write_run(tmp_path / "mamba", cfg, objective)
    assert main(["export", str(tmp_path / "mamba"), str(tmp_path / "o2")]) == 2
    assert "unknown architecture family model.family='mamba'" in _one_error_line(capsys)
    # a gpt2 run whose norm was overridden has no exact twin
    cfg = tiny_config("gpt_tiny", norm="rmsnorm")
    write_run(tmp_path / "rms", cfg, CausalLM(cfg.model))
    assert main(["export", str(tmp_path / "rms"), str(tmp_path / "o3")]) == 2
    line = _one_error_line(capsys)
    assert "model.norm='rmsnorm' but gpt2 needs 'layernorm'" in line and "--lmssl-format" in line
    assert not (tmp_path / "o3").exists()
    # so has a modernbert run with RMSNorm
    cfg = tiny_config("modernbert_tiny", "mlm", norm="rmsnorm", mlp_hidden=96)
    write_run(tmp_path / "mb_rms", cfg, _Masked(cfg.model))
    assert main(["export", str(tmp_path / "mb_rms"), str(tmp_path / "o5")]) == 2
    line = _one_error_line(capsys)
    assert "model.norm='rmsnorm' but modernbert needs 'layernorm'" in line and "--lmssl-format" in line
    assert not (tmp_path / "o5").exists()
    # missing tokenizer
    tok_dir = tmp_path / "tok"
    shutil.copytree(default_tokenizer_path(), tok_dir)
    cfg = tiny_config("gpt_tiny")
    cfg.data.tokenizer = str(tok_dir)
    write_run(tmp_path / "notok", cfg, CausalLM(cfg.model))
    shutil.rmtree(tok_dir)
    assert main(["export", str(tmp_path / "notok"), str(tmp_path / "o4")]) == 2
    assert "the run's tokenizer" in _one_error_line(capsys)
    # OUT_DIR exists and is not empty: refused, untouched; --overwrite replaces it
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", str(gpt_run), str(out)]) == 2
    assert "exists and is not empty" in _one_error_line(capsys) and (out / "keep.txt").read_text() == "mine"
    assert main(["export", str(gpt_run), str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    # OUT_DIR inside the run
    assert main(["export", str(gpt_run), str(gpt_run / "export"), "--overwrite"]) == 2
    assert "overlaps the run directory" in _one_error_line(capsys)


@pytest.mark.parametrize("how", ["offline", "unreachable"])
def test_push_without_network_fails_in_one_line_and_keeps_the_folder(how, gpt_run, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants as hub

    secret = "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0123"
    monkeypatch.setenv("HF_TOKEN", secret)
    if how == "offline":
        monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    else:  # nothing listens on port 9: the connection is refused at once
        monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hub, "ENDPOINT", "http://127.0.0.1:9")
    out = tmp_path / "hf"
    assert main(["export", str(gpt_run), str(out), "--push-to-hub", "someone/tiny-gpt", "--private"]) == 2
    captured = capsys.readouterr()
    line = captured.err.strip().splitlines()
    assert len(line) == 1 and "could not push to the Hub repo someone/tiny-gpt" in line[0], line
    assert f"the export in {out} is complete" in line[0]
    assert secret not in captured.out + captured.err
    assert (out / "model.safetensors").is_file()
    assert _front_matter((out / "README.md").read_text())["library_name"] == "transformers"
    assert "# someone/tiny-gpt" in (out / "README.md").read_text()
    for f in out.rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f


def test_card_names_the_pretraining_data():
    from lmssl.export.card import datasets_of

    cfg = tiny_config("gpt_tiny")
    assert datasets_of(cfg)[0] == ["kjv-bible"]  # the bundled corpus
    cfg.data.dataset, cfg.data.dataset_config = "HuggingFaceFW/fineweb-edu", "sample-10BT"
    ids, text = datasets_of(cfg)
    assert ids == ["HuggingFaceFW/fineweb-edu"] and "sample-10BT" in text


@pytest.mark.parametrize("preset, architecture", [("bert_tiny", "BertModel"), ("modernbert_tiny", "ModernBertModel")])
def test_cpc_encoder_exports_to_its_backbone(preset, architecture, tmp_path):
    """The CPC segment encoder (bert or modernbert family) loads as BertModel /
    ModernBertModel; mean-pooling a segment's last_hidden_state gives the same latent z as
    lmssl's encoder."""
    from transformers import AutoModel

    from lmssl.objectives.cpc import CPC

    cfg = tiny_config(preset, "cpc", "cpc.prediction_steps=2", **({"mlp_hidden": 96} if preset == "modernbert_tiny" else {}))
    cfg.cpc.segment_len, cfg.cpc.encoder_layers = 8, 1
    objective = perturb(CPC(cfg.model, cfg.cpc))
    run = write_run(tmp_path / "run", cfg, objective)
    out = tmp_path / "hf"
    assert main(["export", str(run), str(out)]) == 0
    card = (out / "README.md").read_text()
    assert _front_matter(card)["pipeline_tag"] == "feature-extraction"
    assert "segment encoder" in card and "context network" in card
    model = AutoModel.from_pretrained(out, dtype=torch.float32).eval()
    assert type(model).__name__ == architecture and model.config.max_position_embeddings == 8
    assert model.config.num_hidden_layers == 1
    ids = torch.randint(6, cfg.model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z, _ = objective.encode(ids)  # (2, 3, dim)
        h = model(input_ids=ids.reshape(6, 8)).last_hidden_state.mean(dim=1).view(2, 3, -1)
    assert float((z - h).abs().max()) < TOL


def test_mae_run_exports_to_vit_mae_and_its_image_processor(tmp_path, capsys):
    """An image run: ViTMAEForPreTraining with the same loss and predictions under one mask,
    ViTMAEModel whole-image features, and a processor that prepares images as lmssl does."""
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel, AutoModelForPreTraining

    from lmssl.config import load_config
    from lmssl.train.loop import train
    from tests.data.test_images import write_images
    from tests.objectives.test_mae import SMALL

    paths = write_images(tmp_path / "imgs", 24, size=(32, 32))
    run = tmp_path / "run"
    train(load_config(None, SMALL + ["objective=mae", f"data.train_files={tmp_path / 'imgs'}", f"train.output_dir={run}",
                                     "data.validation_fraction=0.25", "train.max_steps=3", "train.micro_batch_size=8",
                                     "train.progress=false"]))
    out = tmp_path / "exported"
    assert main(["export", str(run), str(out)]) == 0
    assert "ViTMAEForPreTraining" in capsys.readouterr().out
    objective, cfg, _ = load_run(run)
    hf = AutoModelForPreTraining.from_pretrained(str(out)).eval()
    assert type(hf).__name__ == "ViTMAEForPreTraining"

    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    keep_idx, restore_idx = objective.draw_mask(3, torch.Generator().manual_seed(5))
    noise = torch.rand(3, 64, generator=torch.Generator().manual_seed(5))  # the draw random_keep made
    with torch.no_grad():
        ours = objective.loss_on(images, keep_idx, restore_idx)[0]
        theirs = hf(pixel_values=images, noise=noise).loss
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)

    encoder = AutoModel.from_pretrained(str(out)).eval()
    encoder.config.mask_ratio = 0.0  # as the card says: whole-image features, in patch order
    in_order = torch.arange(64.0).expand(3, -1)
    with torch.no_grad():
        torch.testing.assert_close(encoder(pixel_values=images, noise=in_order).last_hidden_state,
                                   objective.encoder(images), rtol=1e-4, atol=1e-4)

    processor = AutoImageProcessor.from_pretrained(str(out))
    pil = Image.open(paths[0]).convert("RGB")
    from lmssl.data.images import decode_image

    uint8 = torch.from_numpy(decode_image({"path": str(paths[0]), "bytes": None}, 3, cfg.vision.image_size))
    ours_pixels = objective.plain_images({"images": uint8[None]})[0]  # decoded and normalised as in training
    theirs_pixels = processor(images=pil, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(theirs_pixels, ours_pixels, rtol=0, atol=1e-5)
    readme = (out / "README.md").read_text()
    assert "AutoModelForPreTraining" in readme and "images seen: 24" in readme and "torch.arange(64.0)" in readme
    assert _front_matter(readme)["pipeline_tag"] == "image-feature-extraction"
    assert json.loads((out / "config.json").read_text())["mask_ratio"] == cfg.mae.mask_ratio
