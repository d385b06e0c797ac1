import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import onp_env.zoo as zoo
from onp_env import OnpError, build_artifact, load_artifact
from onp_env.artifacts import MANIFEST, WEIGHTS, sha256_file

from .conftest import tiny_config


def test_artifact_holds_everything_to_rebuild_model_attack_and_defense_set(tiny_artifact):
    art = load_artifact(tiny_artifact)
    m = art.manifest
    assert sorted(p.name for p in tiny_artifact.iterdir()) == [MANIFEST, WEIGHTS]
    assert set(m["metrics"]) == {"acc", "asr", "ra"} and 0 <= m["metrics"]["asr"] <= 1
    assert m["attack"]["params"] == {
        "patch_size": 3,
        "position": "bottom-right",
        "pattern": "checker",
        "pattern_seed": 0,
    }
    assert m["config"]["train"]["epochs"] == 3 and m["fingerprint"] == tiny_config().fingerprint()
    dx, dy = art.defense_set()
    assert len(dx) == len(m["split"]["defense_indices"]) == len(dy) > 0
    defense, poison = set(m["split"]["defense_indices"]), set(m["attack"]["poison_indices"])
    assert not defense & poison
    train_y = art.dataset().train_y
    assert all(train_y[i] != 0 for i in poison)  # all-to-one poisons only non-target images
    # the stored metrics are reproduced from the rebuilt model and attack
    from onp_env.metrics import evaluate

    ds = art.dataset()
    again = evaluate(art.model, ds.test_x, ds.test_y, art.attack)
    assert again == pytest.approx(m["metrics"], abs=1e-6)


def test_second_identical_request_trains_nothing(tiny_artifact, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("trained again")

    monkeypatch.setattr(zoo, "train", boom)
    assert build_artifact(tiny_config("name=renamed"), tiny_artifact.parent, progress=False) == tiny_artifact


def test_same_config_and_seed_give_bit_identical_weights(tiny_artifact, tmp_path):
    again = build_artifact(tiny_config(), tmp_path, progress=False)
    assert sha256_file(again / WEIGHTS) == sha256_file(tiny_artifact / WEIGHTS)
    other = build_artifact(tiny_config("seed=1"), tmp_path, progress=False)
    assert sha256_file(other / WEIGHTS) != sha256_file(tiny_artifact / WEIGHTS)


@pytest.fixture
def copy(tiny_artifact, tmp_path):
    dest = tmp_path / "copy"
    shutil.copytree(tiny_artifact, dest)
    return dest


def test_weights_that_do_not_match_the_manifest_hash_are_refused(copy):
    state = load_file(str(copy / WEIGHTS))
    state["fc.bias"] += 1
    save_file(state, str(copy / WEIGHTS))
    with pytest.raises(OnpError, match="does not match the SHA-256 in its manifest"):
        load_artifact(copy)


def test_nan_weights_are_refused(copy):
    state = load_file(str(copy / WEIGHTS))
    state["fc.weight"][0, 0] = float("nan")
    save_file(state, str(copy / WEIGHTS))
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["weights"]["sha256"] = sha256_file(copy / WEIGHTS)
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(OnpError, match="NaN/inf values in fc.weight"):
        load_artifact(copy)


def test_corrupt_or_missing_artifacts_are_clear_errors(copy, tmp_path):
    with pytest.raises(OnpError, match="not found: create one with `onp attack"):
        load_artifact(tmp_path / "absent")
    (copy / MANIFEST).write_text("{not json")
    with pytest.raises(OnpError, match="manifest.json is not valid JSON"):
        load_artifact(copy)
    (copy / MANIFEST).unlink()
    with pytest.raises(OnpError, match="manifest.json is missing"):
        load_artifact(copy)


def test_interrupted_build_leaves_no_artifact(tmp_path, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("onp_env.artifacts.save_tensors", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_artifact(tiny_config("seed=7"), tmp_path, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == [".locks"]  # only the lock that kept a second process waiting


def test_a_second_builder_waits_for_the_first_and_trains_nothing(tmp_path, monkeypatch):
    import threading

    from filelock import FileLock

    cfg = tiny_config("seed=8")
    elsewhere = build_artifact(cfg, tmp_path / "elsewhere", progress=False)
    cache = tmp_path / "cache"
    (cache / ".locks").mkdir(parents=True)
    first = FileLock(cache / ".locks" / f"{cfg.fingerprint()}.lock")
    first.acquire()  # another process is training this config into `cache`
    got = []
    second = threading.Thread(target=lambda: got.append(build_artifact(cfg, cache, progress=False)))
    second.start()
    second.join(timeout=1.0)
    assert second.is_alive() and not got  # waiting, not training
    shutil.copytree(elsewhere, cache / elsewhere.name)  # the first one's artifact lands ...
    monkeypatch.setattr(zoo, "_train_artifact", lambda *a: pytest.fail("trained a config another process built"))
    first.release()  # ... and it lets go
    second.join(timeout=30)
    assert got == [cache / elsewhere.name]


def tiny_trojannn(folder, seed: int = 0):
    cfg = tiny_config("attack.name=trojannn", "attack.params={patch_size: 2, steps: 20}", f"seed={seed}")
    return load_artifact(build_artifact(cfg, folder, progress=False))


def tiny_trojannn_excitation(seed: int) -> dict[str, float]:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        prep = tiny_trojannn(folder, seed).manifest["attack"]["preparation"]
    return {"triggered_minus_clean": prep["activation_triggered"] - prep["activation_clean"]}


def test_clean_model_and_trojannn_reference_share_the_cache(tmp_path):
    trojan = tiny_trojannn(tmp_path)
    refs = [p for p in tmp_path.iterdir() if p.name.startswith("tiny-reference-")]
    assert len(refs) == 1
    assert build_artifact(tiny_config("attack=null"), tmp_path, progress=False) == refs[0]
    prep = trojan.manifest["attack"]["preparation"]
    # the trigger raises its neuron by 0.12-1.41 over model seeds 0-19
    assert prep["layer"] == "fc" and prep["activation_triggered"] > prep["activation_clean"]
    assert torch.tensor(trojan.manifest["attack"]["params"]["pattern"]).shape == (1, 2, 2)
