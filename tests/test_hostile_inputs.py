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


def model_kwargs(**values):
    """Edit the model's kwargs in both records a manifest keeps (they must agree)."""

    def change(m):
        m["model"]["kwargs"].update(values)
        m["config"]["model"]["kwargs"].update(values)

    return change


def attack_fields(**values):
    """Edit the attack in both records a manifest keeps (name, target, mode must agree); `params`
    goes to the recorded attack only."""

    def change(m):
        m["attack"].update(values)
        m["config"]["attack"].update({k: v for k, v in values.items() if k != "params"})

    return change


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
        (model_kwargs(hidden=60_000), "does not fit architecture"),
        (model_kwargs(hidden=10**9), "sizes must be integers in 1..65536"),
        (model_kwargs(channels=[4096] * 40), "parameters \\(at most"),
        (model_kwargs(channels=[8] * 10_000), "at most 64"),
        (model_kwargs(hidden=0), "sizes must be integers"),
        (model_kwargs(width=-1.5), "scales must be"),
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
        (attack_fields(target=99), "attack.target 99 is not a class"),
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


# 7. Two records of one fact in a manifest must agree -----------------------------------------


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda m: m["config"]["data"].update(name="fashion-mnist"), "data.name 'fashion-mnist' differs from dataset"),
        (lambda m: m["dataset"].update(name="mnist"), "differs from dataset.name 'mnist'"),
        (lambda m: m["config"]["model"].update(name="vgg"), "config.model.name 'vgg' differs from model.name"),
        (lambda m: m["model"]["kwargs"].update(hidden=17), "config.model.kwargs .* differs from model.kwargs"),
        (lambda m: m["config"].update(attack=None), "config.attack names no attack but .* records an attack"),
        (lambda m: m.update(attack=None), "config.attack names an attack but .* records none"),
        (lambda m: m["config"]["attack"].update(name="blended"), "config.attack.name 'blended' differs"),
        (lambda m: m["config"]["attack"].update(mode="all-to-all"), "config.attack.mode 'all-to-all' differs"),
        (lambda m: m["config"]["attack"].update(target=3), "config.attack.target 3 differs from attack.target 0"),
        (lambda m: m["split"].update(fraction=0.5), "defense_fraction 0.05 differs from split.fraction 0.5"),
        (lambda m: m["split"].update(seed=7), "split_seed 0 differs from split.seed 7"),
    ],
)
def test_config_and_records_must_agree(copy, capsys, no_weights_read, change, match):
    edit(copy, change)
    one_line_exit_2(["inspect", str(copy)], capsys, match)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda m: m["dataset"].update(class_names=["a", "b", "c"]), "class_names lists 3 names but dataset.num_"),
        (lambda m: m["dataset"].update(std=[0.0]), "dataset mean/std must be finite numbers with std > 0"),
        (lambda m: m["dataset"].update(std=[-1.0]), "dataset mean/std must be finite numbers with std > 0"),
        (lambda m: m["dataset"].update(mean=[0.1, 0.2]), "dataset mean/std need one value per input channel"),
        (lambda m: m["dataset"].update(mean=[0.1]), "model mean/std .* differ from the dataset's"),
        (lambda m: m["model"].update(std=[0.0]), "model mean/std must be finite numbers with std > 0"),
    ],
)
def test_dataset_metadata_is_consistent(copy, capsys, no_weights_read, change, match):
    edit(copy, change)
    one_line_exit_2(["inspect", str(copy)], capsys, match)


@pytest.mark.parametrize(
    "shape, classes",
    [((1, 28, 28), 10), ((3, 8, 8), 10), ((1, 8, 8), 2)],
)
def test_a_dataset_unlike_the_recorded_one_is_refused(copy, monkeypatch, shape, classes):
    import torch

    from onp_env.data.datasets import Dataset, DatasetInfo

    def other(name, root=None):
        info = DatasetInfo(name, shape, classes, (0.5,) * shape[0], (0.5,) * shape[0], ())
        x, y = torch.zeros(4, *shape), torch.zeros(4, dtype=torch.long)
        return Dataset(info, x, y, x, y)

    art = load_artifact(copy)
    monkeypatch.setattr(artifacts, "load_dataset", other)
    with pytest.raises(OnpError, match="pass the dataset it was trained on") as e:
        art.defense_set()
    assert "\n" not in str(e.value) and f"{list(shape)} in {classes}" in str(e.value)


# 8. JSON that Python's parser turns into something no field may hold -------------------------


def edit_raw(art, token):
    """Put the raw JSON text `token` where metrics.acc's value stands."""
    m = json.loads((art / MANIFEST).read_text())
    m["metrics"]["acc"] = "@@"
    (art / MANIFEST).write_text(json.dumps(m).replace('"@@"', token))
    return art


@pytest.mark.parametrize(
    "token, match",
    [
        ("NaN", "NaN is not a number JSON allows"),
        ("Infinity", "Infinity is not a number JSON allows"),
        ("-Infinity", "-Infinity is not a number JSON allows"),
        ("1e999", "overflows to infinity"),
        ("-1.5e400", "overflows to infinity"),
        ("1" + "0" * 5000, "not valid JSON \\(Exceeds the limit"),
        ("[" * 100_000 + "]" * 100_000, "nests too deeply"),
        ('{"a": ' * 50_000 + "1" + "}" * 50_000, "nests too deeply"),
    ],
)
def test_json_beyond_what_fields_hold_is_refused(copy, capsys, no_weights_read, token, match):
    edit_raw(copy, token)
    one_line_exit_2(["inspect", str(copy)], capsys, match)


def test_large_but_finite_json_numbers_reach_the_range_checks(copy, capsys, no_weights_read):
    edit_raw(copy, "1" + "0" * 400)
    one_line_exit_2(["inspect", str(copy)], capsys, "metrics.acc must be a finite number >= 0 and <= 1")
    edit_raw(copy, "1e300")
    one_line_exit_2(["inspect", str(copy)], capsys, "metrics.acc must be >= 0 and <= 1")


# 9. Buffers the weights file sets must match the manifest and be usable ----------------------


def rewrite_weights(art, change):
    state = load_file(str(art / WEIGHTS))
    change(state)
    save_file(state, str(art / WEIGHTS))
    sha = artifacts.sha256_file(art / WEIGHTS)
    return edit(art, lambda m: m["weights"].update(sha256=sha))


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda s: s["normalize.std"].zero_(), "normalize.mean/std it holds differs from the manifest's"),
        (lambda s: s["normalize.std"].mul_(2), "normalize.mean/std it holds differs from the manifest's"),
        (lambda s: s["normalize.mean"].add_(1), "normalize.mean/std it holds differs from the manifest's"),
        (lambda s: s["features.1.running_var"].fill_(-1), "features.1.running_var has a negative variance"),
        (lambda s: s["features.5.running_var"][0].fill_(-1e-3), "features.5.running_var has a negative variance"),
    ],
)
def test_weights_with_unusable_buffers_are_refused(copy, capsys, change, match):
    rewrite_weights(copy, change)
    one_line_exit_2(["inspect", str(copy)], capsys, match)


def test_buffers_checked_in_the_manifest_match_a_good_artifact(copy):
    art = load_artifact(copy)
    assert art.model.normalize.std.flatten().tolist() == pytest.approx(art.manifest["model"]["std"])


# 10. Patch attacks check the patch fits before they build it ---------------------------------


@pytest.fixture
def no_pattern_built(monkeypatch):
    """Fails the test if a patch pattern tensor is built before the refusal."""
    import torch

    import onp_env.attacks.badnets as badnets

    def fail(*a, **k):
        raise AssertionError("built the pattern before checking that the patch fits")

    monkeypatch.setattr(badnets, "patch_pattern", fail)
    monkeypatch.setattr(torch, "full", fail)
    monkeypatch.setattr(torch, "tensor", fail)


@pytest.mark.parametrize(
    "name, params, match",
    [
        ("badnets", {"patch_size": 6000}, "a 6000x6000 patch at bottom-right does not fit a 8x8 image"),
        ("badnets", {"patch_size": 9, "position": [0, 0]}, "does not fit a 8x8 image"),
        ("badnets", {"patch_size": 2, "position": [7, 7]}, "does not fit a 8x8 image"),
        ("badnets", {"patch_size": 2, "position": [1, 2, 3]}, "must be \\[row, col\\]"),
        ("badnets", {"patch_size": 2, "position": []}, "must be \\[row, col\\]"),
        ("badnets", {"patch_size": 2, "pattern": "stripes"}, "unknown patch pattern 'stripes'"),
        ("trojannn", {"patch_size": 6000}, "a 6000x6000 patch at bottom-right does not fit"),
        ("trojannn", {"patch_size": 6000, "pattern": [[[0]]]}, "a 6000x6000 patch at bottom-right does not fit"),
        ("trojannn", {"patch_size": 3, "position": "middle"}, "unknown patch position 'middle'"),
    ],
)
def test_patches_that_do_not_fit_are_refused_before_allocation(no_pattern_built, name, params, match):
    from onp_env.attacks import build_attack

    with pytest.raises(OnpError, match=match) as e:
        build_attack(name, (1, 8, 8), 10, 0, "all-to-one", params)
    assert "\n" not in str(e.value)


def test_a_huge_patch_on_the_command_line_is_refused_before_training(tmp_path, capsys, no_training):
    config = str(ROOT / "configs/attack/badnets-digits.yaml")
    one_line_exit_2(["attack", "--config", config, "--set", "attack.params={patch_size: 6000}", "--out",
                     str(tmp_path)], capsys, "6000x6000 patch .* does not fit")  # fmt: skip


# 11. A recorded TrojanNN trigger is checked before torch sees it ----------------------------


@pytest.mark.parametrize(
    "pattern, match",
    [
        ([[[1, 2], [3]]], "pattern\\[0\\]\\[1\\] must be a list of 2 entries .* got 1 entries"),
        ([[[1, 2], [3, 4]], [[1, 2], [3, 4]]], "pattern must be a list of 1 entries .* got 2 entries"),
        ([[["a", "b"], ["c", "d"]]], "pattern\\[0\\]\\[0\\]\\[0\\] must be a pixel value in 0..255, got 'a'"),
        ([{"a": 1}], "pattern\\[0\\] must be a list of 2 entries .* got \\{'a': 1\\}"),
        ([[[1, 2], "ab"]], "pattern\\[0\\]\\[1\\] must be a list of 2 entries .* got 'ab'"),
        ([[[1, 2], [float("nan"), 4]]], "pattern\\[0\\]\\[1\\]\\[0\\] must be a pixel value in 0..255, got nan"),
        ([[[1e9, 2], [3, 4]]], "pattern\\[0\\]\\[0\\]\\[0\\] must be a pixel value in 0..255, got 1000000000.0"),
        ([[[1, -5], [3, 4]]], "pattern\\[0\\]\\[0\\]\\[1\\] must be a pixel value in 0..255, got -5"),
        ([[[1, 2], [3, True]]], "pattern\\[0\\]\\[1\\]\\[1\\] must be a pixel value in 0..255, got True"),
        ([[[1, 2], [3, [4]]]], "must be a pixel value in 0..255, got \\[4\\]"),
        ([[[1, 2], [3, 10**400]]], "must be a pixel value in 0..255, got 1000"),
    ],
)
def test_bad_trojannn_patterns_are_one_line_errors(pattern, match):
    from onp_env.attacks import build_attack

    with pytest.raises(OnpError, match=match) as e:
        build_attack("trojannn", (1, 8, 8), 10, 0, "all-to-one", {"patch_size": 2, "pattern": pattern})
    assert "\n" not in str(e.value) and len(str(e.value)) < 300


def test_a_good_trojannn_pattern_is_kept_in_pixel_units():
    from onp_env.attacks import build_attack

    params = {"patch_size": 2, "pattern": [[[0, 255], [51, 102]]]}
    attack = build_attack("trojannn", (1, 8, 8), 10, 0, "all-to-one", params)
    assert attack._pattern.flatten().tolist() == pytest.approx([0.0, 1.0, 0.2, 0.4])


@pytest.mark.parametrize(
    "params, match",
    [
        ({"patch_size": 2, "pattern": [[[1, 2], [3]]]}, "attack does not describe a valid attack: trojannn pattern"),
        ({"patch_size": 2, "pattern": [[["x", 2], [3, 4]]]}, "must be a pixel value in 0..255, got 'x'"),
        ({"patch_size": 2, "pattern": [[[1, 2], [3, 256]]]}, "must be a pixel value in 0..255, got 256"),
        ({"patch_size": 2, "pattern": None}, "attack.params.pattern is missing"),
    ],
)
def test_bad_trojannn_patterns_in_a_manifest_are_refused_at_load(copy, capsys, params, match):
    edit(copy, attack_fields(name="trojannn", params=params))
    one_line_exit_2(["inspect", str(copy)], capsys, match)


# 12. Configs: keys, dates, huge numbers, nesting and seeds ------------------------------------


@pytest.mark.parametrize(
    "text, match",
    [
        ("1: 2\n", "c.yaml has the key 1, which is not a name"),
        ("name: x\n~: 2\n", "has the key None, which is not a name"),
        ("true: 1\n", "has the key True, which is not a name"),
        ("train: {3.5: 4}\n", "c.yaml.train has the key 3.5, which is not a name"),
        ("seed: 2001-01-01\n", "seed must be int, got '2001-01-01'"),
        ("train: {lr: 1" + "0" * 400 + "}\n", "train.lr must be a finite number > 0, got an integer of"),
        ("train: {epochs: 1" + "0" * 400 + "}\n", "train.epochs must be a finite number >= 1"),
        ("seed: 1" + "0" * 5000 + "\n", "not valid YAML \\(Exceeds the limit"),
        ("data: " + "[" * 100_000 + "]" * 100_000 + "\n", "nests too deeply to be a config"),
        ("seed: 9223372036854775808\n", "seed must be >= 0 and < 9223372036854775808"),
        ("data: {split_seed: 18446744073709551616}\n", "split_seed must be >= 0 and < 9223372036854775808"),
    ],
)
def test_hostile_yaml_configs_exit_2(tmp_path, capsys, no_training, text, match):
    (tmp_path / "c.yaml").write_text(text)
    one_line_exit_2(["attack", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path)], capsys, match)


def test_dates_in_yaml_stay_strings():
    cfg = load_config(LabConfig, None, ["name=2001-01-01", "model.kwargs={note: 2001-01-01T10:00:00}"])
    assert cfg.name == "2001-01-01" and cfg.model.kwargs == {"note": "2001-01-01T10:00:00"}
    assert json.loads(json.dumps(cfg.model.kwargs)) == cfg.model.kwargs  # and so serialise


@pytest.mark.parametrize(
    "name, key",
    [("badnets", "pattern_seed"), ("blended", "pattern_seed"), ("wanet", "grid_seed"), ("trojannn", "seed")],
)
def test_attack_seeds_stay_in_torch_range(name, key):
    from onp_env.attacks import build_attack

    for seed in (2**63, 2**64, 10**400):
        with pytest.raises(OnpError, match=f"{key} must be"):
            build_attack(name, (1, 8, 8), 10, 0, "all-to-one", {key: seed})
    build_attack(name, (1, 8, 8), 10, 0, "all-to-one", {key: 2**63 - 1})  # the largest seed torch takes


def test_non_text_keys_from_python_are_one_line_errors():
    from onp_env.config import from_dict

    with pytest.raises(OnpError, match="has the key 1, which is not a name"):
        from_dict(LabConfig, {1: 2, "name": "x"})
    with pytest.raises(OnpError, match="has the key \\('a',\\), which is not a name"):
        from_dict(LabConfig, {"train": {("a",): 1}})


# 13. Written files and folders get the modes the umask gives ---------------------------------


@pytest.fixture(params=[0o022, 0o027, 0o077, 0o002])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_text_files_follow_the_umask(tmp_path, umask):
    artifacts.write_text_atomic(tmp_path / "sub" / "r.json", "{}")
    assert (tmp_path / "sub" / "r.json").read_text() == "{}"
    assert (tmp_path / "sub" / "r.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["r.json"]  # no temporary left behind


def test_artifact_folders_and_files_follow_the_umask(tmp_path, umask):
    from torch import nn

    dest = artifacts.write_artifact(tmp_path / "art", nn.Linear(2, 2), {"name": "x"})
    assert dest.stat().st_mode & 0o777 == 0o777 & ~umask
    for name in (WEIGHTS, MANIFEST):
        assert (dest / name).stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["art"]


def test_a_failed_text_write_leaves_no_temporary(tmp_path, monkeypatch):
    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(artifacts.os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        artifacts.write_text_atomic(tmp_path / "r.json", "{}")
    assert list(tmp_path.iterdir()) == []


# 14. The attack a manifest records is built (and so checked) when it is loaded ---------------


@pytest.mark.parametrize(
    "change, match",
    [
        (attack_fields(mode="sideways"), "attack does not describe a valid attack: unknown target mode 'sideways'"),
        (attack_fields(params={"bogus": 1}), "unknown key\\(s\\) bogus in attack 'badnets' parameters"),
        (attack_fields(params={"patch_size": 99}), "a 99x99 patch at bottom-right does not fit a 8x8 image"),
        (attack_fields(params={"pattern_seed": -1}), "pattern_seed must be >= 0"),
        (
            attack_fields(name="sig", mode="all-to-all", params={}),
            "sig is clean-label and only supports mode all-to-one",
        ),
        (lambda m: m["attack"].update(clean_label=True), "clean_label is true but badnets is not clean-label"),
        (attack_fields(name="sig", params={}), "clean_label is false but sig is clean-label"),
    ],
)
def test_a_bad_attack_is_refused_at_load(copy, capsys, change, match):
    edit(copy, change)
    one_line_exit_2(["inspect", str(copy)], capsys, match)
    with pytest.raises(OnpError, match=match):
        load_artifact(copy)


def test_a_loaded_artifact_has_its_attack_built(copy):
    art = load_artifact(copy)
    assert "attack" in vars(art) and art.attack.name == "badnets"
