import pytest

from lmssl.config import RunConfig, load_config, parse_overrides
from lmssl.errors import UserError
from tests.conftest import ROOT


def test_recipe_and_overrides():
    cfg = load_config(ROOT / "recipes" / "gpt_tiny.yaml",
                      ["train.max_steps=300", "data.train_files=my/*.txt", "optim.lr=1e-4", "model.dropout=0.1"])
    assert cfg.train.max_steps == 300
    assert cfg.data.train_files == ["my/*.txt"]
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.model.family == "gpt2" and cfg.model.dim == 256  # from the preset
    assert cfg.model.dropout == 0.1


def test_preset_then_field_override():
    cfg = load_config(None, ["model.preset=llama_tiny", "model.n_layers=3"])
    assert cfg.model.norm == "rmsnorm" and cfg.model.positions == "rope" and cfg.model.n_layers == 3


def test_unknown_key_lists_near_keys():
    with pytest.raises(UserError) as e:
        load_config(None, ["train.max_step=3"])
    assert "train.max_steps" in str(e.value)
    with pytest.raises(UserError, match="valid sections"):
        load_config(None, ["nosuch.thing=1"])


@pytest.mark.parametrize("override, word", [("train.max_steps=abc", "integer"), ("optim.lr=fast", "number"),
                                            ("train.overwrite=maybe", "true or false"),
                                            ("data.block_size=0", "block_size"), ("optim.lr=-1", "positive"),
                                            ("objective=mlm mlm.mask_rate=1.0", "mask_rate"),
                                            ("objective=nosuch", "unknown objective 'nosuch'; choose one of"),
                                            ("data.block_size=4096", "max_positions")])
def test_bad_values(override, word):
    with pytest.raises(UserError, match=word):
        load_config(ROOT / "recipes" / "gpt_tiny.yaml", override.split())


def test_fingerprint_ignores_training_length():
    a = load_config(None, ["train.max_steps=10"])
    b = load_config(None, ["train.max_steps=20"])
    c = load_config(None, ["model.dim=512", "model.n_heads=8"])
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


@pytest.mark.parametrize("recipe, overrides, stored", [
    (None, ["objective=clm", "model.preset=gpt_tiny"], "fca745bc5db9eef3"),
    ("simclr_tiny.yaml", [], "0a1a0087fd1a7627"),
    ("mlm_tiny.yaml", ["model.vocab_size=8192"], "ea903e2b3a3911c2"),
])
def test_runs_started_before_later_fields_keep_their_fingerprint(recipe, overrides, stored):
    """The fingerprints lmssl wrote on 2026-12-01 (commit c4fc0c0) for these configs: a field added
    since must be a late field (left out while at its default), or such a run no longer resumes."""
    cfg = load_config(ROOT / "recipes" / recipe if recipe else None, overrides)
    assert cfg.fingerprint() == stored


def test_the_position_table_scale_is_part_of_an_image_run():
    plain = load_config(ROOT / "recipes" / "simclr_tiny.yaml", [])
    scaled = load_config(ROOT / "recipes" / "simclr_tiny.yaml", ["vision.position_scale=0.04"])
    assert plain.fingerprint() != scaled.fingerprint()  # a resumed run must add the table it trained with


def test_parse_overrides_lists():
    assert parse_overrides(["data.train_files=[a.txt, b.txt]"]) == {"data": {"train_files": ["a.txt", "b.txt"]}}
    assert isinstance(RunConfig().to_dict(), dict)


def test_mixed_precision_no_survives_yaml_reading_it_as_false(tmp_path):
    """YAML 1.1 reads a bare `no` as False; the documented value `no` must still work,
    on the command line and in a recipe file."""
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  mixed_precision: no\n")
    assert load_config(recipe).train.mixed_precision == "no"
    with pytest.raises(UserError, match="expects a string, got True .YAML reads a bare yes"):
        load_config(None, ["train.mixed_precision=yes"])
    # any other string key keeps refusing a bare no/off rather than turning it into "no"
    for override in ("data.text_column=off", "train.output_dir=no", "mlm.masking=false"):
        with pytest.raises(UserError, match="quote the value"):
            load_config(None, [override])
