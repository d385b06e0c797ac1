"""A model you are handed is hostile input: crafted artifacts, configs and command lines are refused
with exit code 2 and one line naming the fix, before any expensive work, reading no file outside
the artifact and allocating nothing from a manifest's sizes. One class of defects per section."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

import onp_env.artifacts as artifacts
import onp_env.zoo as zoo
from onp_env import OnpError, load_artifact, load_config
from onp_env.artifacts import MANIFEST, WEIGHTS
from onp_env.cli import main
from onp_env.config import LabConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def copy(tiny_artifact, tmp_path):
    dest = tmp_path / "art"
    shutil.copytree(tiny_artifact, dest)
    return dest


def edit(art, change):
    """Rewrite the manifest through `change(manifest)` (which may return a replacement)."""
    m = json.loads((art / MANIFEST).read_text())
    m = change(m) or m
    (art / MANIFEST).write_text(json.dumps(m))
    return art


def one_line_exit_2(args, capsys, match):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("onp: error: ") and err.count("\n") == 1, err
    assert __import__("re").search(match, err), err


# 1. The manifest points outside its artifact -------------------------------------------------


@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.safetensors", "sub/weights.safetensors", "weights.bin"])
def test_a_manifest_cannot_name_another_weights_file(copy, capsys, name):
    edit(copy, lambda m: m["weights"].update(file=name))
    one_line_exit_2(["inspect", str(copy)], capsys, "weights.file must be 'weights.safetensors'")


def test_errors_do_not_reveal_whether_outside_files_exist(copy, tmp_path):
    messages = []
    for name in ("/etc/passwd", str(tmp_path / "absent")):
        edit(copy, lambda m, n=name: m["weights"].update(file=n))
        with pytest.raises(OnpError) as e:
            load_artifact(copy)
        messages.append(str(e.value).replace(name, "X"))
    assert messages[0] == messages[1]


def test_linked_weights_or_manifest_are_refused(copy, tiny_artifact, tmp_path):
    elsewhere = tmp_path / "elsewhere.safetensors"
    shutil.copy(copy / WEIGHTS, elsewhere)  # same bytes, same SHA-256: only the link is wrong
    (copy / WEIGHTS).unlink()
    (copy / WEIGHTS).symlink_to(elsewhere)
    with pytest.raises(OnpError, match="a link or not a regular file"):
        load_artifact(copy)
    (copy / WEIGHTS).unlink()
    shutil.copy(elsewhere, copy / WEIGHTS)
    moved = tmp_path / "manifest.json"
    shutil.move(copy / MANIFEST, moved)
    (copy / MANIFEST).symlink_to(moved)
    with pytest.raises(OnpError, match="a link or not a regular file"):
        load_artifact(copy)


@pytest.mark.parametrize("root", ["/etc", "../../somewhere", "data"])
def test_a_manifests_dataset_folder_is_not_followed(copy, root, monkeypatch):
    monkeypatch.delenv("ONP_DATA_ROOT", raising=False)
    art = load_artifact(edit(copy, lambda m: m["config"]["data"].update(root=root)))
    with pytest.raises(OnpError, match="paths are not followed: pass the dataset directory"):
        art.defense_set()


# 2. Sizes from untrusted files are checked before anything is allocated ----------------------


@pytest.fixture
def no_weights_read(monkeypatch):
    """Fails the test if the weights are read or a real model is built before the refusal."""

    def fail(*a, **k):
        raise AssertionError("allocated before the manifest was checked")

    monkeypatch.setattr(artifacts, "load_file", fail)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda m: m["model"]["kwargs"].update(hidden=60_000), "does not fit architecture"),
        (lambda m: m["model"]["kwargs"].update(hidden=10**9), "sizes must be integers in 1..65536"),
        (lambda m: m["model"]["kwargs"].update(channels=[4096] * 40), "parameters \\(at most"),
        (lambda m: m["model"]["kwargs"].update(channels=[8] * 10_000), "at most 64"),
        (lambda m: m["model"]["kwargs"].update(hidden=0), "sizes must be integers"),
        (lambda m: m["model"]["kwargs"].update(width=-1.5), "scales must be"),
        (lambda m: m["model"].update(num_classes=10**9) or m["dataset"].update(num_classes=10**9), "num_classes"),
        (lambda m: m["model"].update(in_shape=[1, 10**6, 8]) or m["dataset"].update(shape=[1, 10**6, 8]), "in_shape"),
    ],
)
def test_manifest_sizes_are_refused_before_allocation(copy, capsys, no_weights_read, change, match):
    edit(copy, change)
    one_line_exit_2(["inspect", str(copy)], capsys, match)


def test_a_crafted_safetensors_header_is_refused(copy, capsys):
    state = load_file(str(copy / WEIGHTS))
    state["fc.weight"] = state["fc.weight"][:, :3].contiguous()  # a shape the architecture does not have
    save_file(state, str(copy / WEIGHTS))
    sha = artifacts.sha256_file(copy / WEIGHTS)
    edit(copy, lambda m: m["weights"].update(sha256=sha))
    one_line_exit_2(["inspect", str(copy)], capsys, "does not fit architecture")
    header = (copy / WEIGHTS).read_bytes()
    (copy / WEIGHTS).write_bytes((10**15).to_bytes(8, "little") + header[8:])  # header length beyond the file
    edit(copy, lambda m: m["weights"].update(sha256=artifacts.sha256_file(copy / WEIGHTS)))
    one_line_exit_2(["inspect", str(copy)], capsys, "not a readable safetensors file")


def test_an_oversized_manifest_is_refused_before_reading(copy, capsys, monkeypatch):
    monkeypatch.setattr(artifacts, "MAX_MANIFEST_BYTES", 100)
    one_line_exit_2(["inspect", str(copy)], capsys, "larger than 100 bytes")


# 3. Manifest structure is validated against its schema ----------------------------------------


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda m: [m], "must hold a JSON object, got list"),
        (lambda m: m.pop("model") and None, "lacks model"),
        (lambda m: m["model"].pop("in_shape") and None, "model lacks required key\\(s\\) in_shape"),
        (lambda m: m["model"].update(num_classes="ten"), "model.num_classes must be int"),
        (lambda m: m["split"].update(defense_indices=[-1, 2, 3]), "negative index"),
        (lambda m: m["split"].update(defense_indices=[4, 4, 5]), "repeats an index"),
        (lambda m: m["split"].update(defense_indices=["a"]), "defense_indices\\[0\\] must be int"),
        (lambda m: m["split"].update(defense_indices=[]), "no defense set"),
        (lambda m: m["attack"].update(target=99), "attack.target 99 is not a class"),
        (lambda m: m["metrics"].update(acc=3), "metrics.acc must be >= 0 and <= 1"),
        (lambda m: m["dataset"].update(shape=[3, 8, 8]), "disagree with the dataset"),
        (lambda m: m.update(surprise=1), "unknown key\\(s\\) surprise"),
        (lambda m: m["config"]["train"].update(epochs=-3), "config.train.epochs must be >= 1"),
    ],
)
def test_malformed_manifests_name_the_field(copy, capsys, change, match):
    edit(copy, change)
    one_line_exit_2(["inspect", str(copy)], capsys, match)


def test_defense_indices_beyond_the_dataset_are_refused(copy):
    art = load_artifact(edit(copy, lambda m: m["split"].update(defense_indices=[1, 10**6])))
    with pytest.raises(OnpError, match="holds index 1000000 but the split has"):
        art.defense_set()


# 4. Every command validates its inputs before the first expensive step -----------------------


@pytest.fixture
def no_training(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("trained before the input was checked")

    monkeypatch.setattr(zoo, "train", fail)


def test_attack_with_a_file_as_output_fails_before_training(tmp_path, capsys, no_training):
    (tmp_path / "file").write_text("x")
    config = str(ROOT / "configs/attack/badnets-digits.yaml")
    one_line_exit_2(["attack", "--config", config, "--out", str(tmp_path / "file")], capsys, "cannot use")
    one_line_exit_2(["attack", "--config", config, "--out", str(tmp_path / "file" / "sub")], capsys, "cannot use")


@pytest.mark.parametrize(
    "override, match",
    [
        ("train.threads=0", "train.threads must be >= 1"),
        ("train.epochs=ten", "train.epochs must be int"),
        ("model.kwargs={hidden: 0}", "sizes must be integers"),
        ("attack.params={patch_size: big}", "patch_size must be int"),
        ("attack.params={patch_size: -2}", "patch_size must be >= 1"),
        ("attack.poison_rate=5", "poison_rate must be > 0 and < 1"),
        ("data.defense_fraction=.nan", "must be a finite number"),
        ("train.augment=rotate", "unknown augment 'rotate'"),
        ("train.device=tpu", "unknown device 'tpu'"),
    ],
)
def test_attack_parameters_are_typed_and_ranged_before_training(tmp_path, capsys, no_training, override, match):
    config = str(ROOT / "configs/attack/badnets-digits.yaml")
    one_line_exit_2(["attack", "--config", config, "--set", override, "--out", str(tmp_path)], capsys, match)


def test_defend_into_an_existing_folder_fails_before_the_defense(tiny_artifact, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    args = ["defend", "--method", "mnp", "--artifact", str(tiny_artifact), "--out", str(tmp_path / "taken")]
    one_line_exit_2(args, capsys, "already exists")
    one_line_exit_2(["defend", "--method", "magnitude", "--artifact", str(tiny_artifact), "--set", "ratio=5",
                     "--out", str(tmp_path / "new")], capsys, "ratio must be")  # fmt: skip
    assert not (tmp_path / "new").exists()


# 6. The exit-code contract: input problems exit 2 with one line, never a traceback -----------


@pytest.mark.parametrize(
    "text, match",
    [
        ("a: [1,\n", "not valid YAML"),
        ("seed: !!python/object/apply:os.system [true]\n", "tags"),
        ("seed: !custom 1\n", "tags"),
        ("a: &a [x, x]\nb: &b [*a, *a]\nc: [*b, *b]\n", "aliases"),
        ("- just\n- a list\n", "mapping at top level"),
    ],
)
def test_bad_yaml_configs_exit_2(tmp_path, capsys, text, match):
    (tmp_path / "c.yaml").write_text(text)
    one_line_exit_2(["attack", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path)], capsys, match)


def test_binary_or_huge_configs_exit_2(tmp_path, capsys, monkeypatch):
    (tmp_path / "c.yaml").write_bytes(bytes(range(256)) * 4)
    one_line_exit_2(["attack", "--config", str(tmp_path / "c.yaml")], capsys, "not UTF-8 text")
    monkeypatch.setattr("onp_env.config.MAX_CONFIG_BYTES", 10)
    (tmp_path / "c.yaml").write_text("seed: 1\nname: big\n")
    one_line_exit_2(["attack", "--config", str(tmp_path / "c.yaml")], capsys, "larger than 10 bytes")


@pytest.mark.parametrize("override", ["seed=[1,", "seed=!!python/name:os.system", "a..b=1", "=3"])
def test_bad_overrides_exit_2(tmp_path, capsys, override):
    config = str(ROOT / "configs/attack/badnets-digits.yaml")
    assert main(["attack", "--config", config, "--set", override, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("onp: error: ") and err.count("\n") == 1


def test_a_closed_output_pipe_is_not_a_traceback(tiny_artifact):
    cmd = [sys.executable, "-m", "onp_env.cli", "inspect", "--json", str(tiny_artifact)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    proc.stdout.close()  # the reader is gone before onp writes anything (like `| head -0`)
    err = proc.stderr.read().decode()
    assert proc.wait() == 141 and "Traceback" not in err


def test_configs_load_through_the_same_checks_in_python():
    with pytest.raises(OnpError, match="train.batch_size must be >= 1"):
        load_config(LabConfig, None, ["train.batch_size=0"])
