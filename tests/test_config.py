import pytest

from onp_env import OnpError, load_config
from onp_env.config import LabConfig, apply_overrides


def test_overrides_reach_nested_keys_and_parse_yaml_values():
    cfg = load_config(LabConfig, None, ["attack.params.position=[1, 2]", "train.lr=0.1", "attack.mode=all-to-all"])
    assert cfg.attack.params == {"position": [1, 2]} and cfg.train.lr == 0.1 and cfg.attack.mode == "all-to-all"
    assert load_config(LabConfig, None, ["attack=null"]).attack is None


def test_fingerprint_ignores_the_label_and_data_location_but_not_the_seed():
    base = load_config(LabConfig)
    assert base.fingerprint() == load_config(LabConfig, None, ["name=other", "data.root=/x"]).fingerprint()
    assert base.fingerprint() != load_config(LabConfig, None, ["seed=1"]).fingerprint()
    assert base.fingerprint() != load_config(LabConfig, None, ["attack.params.alpha=0.3"]).fingerprint()
    # an attack setting's label is a display name: models cached before labels existed are found again
    assert base.fingerprint() == load_config(LabConfig, None, ["attack.label=badnets-7"]).fingerprint()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.epoch=3"], "unknown key.*epoch in config.train: valid keys are"),
        (["train.epochs=ten"], "config.train.epochs must be int, got 'ten'"),
        (["model.kwargs=3"], "config.model.kwargs must be dict"),
        (["train"], "--set needs key=value"),
    ],
)
def test_bad_config_values_are_named(overrides, message):
    with pytest.raises(OnpError, match=message):
        load_config(LabConfig, None, overrides)


def test_missing_or_invalid_config_file(tmp_path):
    with pytest.raises(OnpError, match="not found"):
        load_config(LabConfig, tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1,\n")
    with pytest.raises(OnpError, match="not valid YAML"):
        load_config(LabConfig, tmp_path / "bad.yaml")


def test_override_into_a_scalar_is_an_error():
    with pytest.raises(OnpError, match="is not a section"):
        apply_overrides({"seed": 1}, ["seed.x=2"])
