import pytest
import torch
import torch.nn.functional as F
from torch import nn

from baselines.anp import ANP
from baselines.bnp import BNP
from baselines.clp import CLP
from baselines.common import BaselinePolicy, run_policy
from baselines.controls import Magnitude, Random
from baselines.fine_pruning import FinePruning
from baselines.mnp import MNP
from baselines.nc import NC
from baselines.rnp import RNP
from baselines.verdict import Verdict
from onp_env import OnpError
from onp_env.env import NeuronPruningEnv, PruningTarget
from onp_env.graph.units import find_units
from onp_env.models import build_model

QUICK = {
    "anp": {"iterations": 5},
    "fp": {"finetune_epochs": 1},
    "rnp": {"unlearn_epochs": 2, "recover_epochs": 2, "batch_size": 16},
    "mnp": {"suppress_epochs": 2, "mask_epochs": 2, "batch_size": 16},
    "bnp": {"epochs": 1},
    "nc": {"steps": 20, "images": 32},
    "verdict": {"steps": 20, "images": 32, "latent_images": 32},
}
METHODS = [Magnitude, Random, CLP, FinePruning, ANP, RNP, MNP, BNP, NC, Verdict]


def data(shape=(1, 8, 8), n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *shape, generator=g), torch.arange(n) % 10


def cnn(seed=0):
    torch.manual_seed(seed)
    return build_model("small_cnn", (1, 8, 8), 10).eval()


def make(cls, **kw):
    return cls(**{**QUICK.get(cls.name, {}), **kw})


def test_clp_finds_a_channel_whose_kernel_norm_was_inflated():
    model = cnn()
    with torch.no_grad():
        model.features[4].weight[7] *= 25
    result = make(CLP).run(model, *data())
    layout, _ = find_units(model, data()[0][:2])
    assert result.pruned[0] == layout.by_name["features.5"].offset + 7
    assert torch.isinf(result.scores[layout.by_name["fc"].offset :]).all()  # Linear units: no bound


def test_fine_pruning_ranks_a_dormant_last_conv_channel_first_and_keeps_it_pruned_when_tuning():
    model = cnn()
    with torch.no_grad():
        model.features[5].bias[3] = -50.0  # channel 3 of the last conv never fires on clean data
    result = make(FinePruning).run(model, *data())
    layout, _ = find_units(model, data()[0][:2])
    unit = layout.by_name["features.5"].offset + 3
    assert result.pruned[0] == unit
    assert result.finetuned is not None
    assert result.finetuned.features[5].weight[3] == 0 and result.finetuned.features[5].bias[3] == 0


def test_magnitude_prunes_the_smallest_gamma_first():
    model = cnn()
    with torch.no_grad():
        model.features[1].weight.fill_(1.0)
        model.features[1].weight[5] = 1e-3
    assert make(Magnitude).run(model, *data()).pruned[0] == 5


def anp_masks_move(seed: int, iterations: int = 20) -> dict[str, float]:
    """The smallest mask ANP leaves after `iterations` on a random CNN and random images (all seeded)."""
    x, y = data(seed=seed)
    layout, _ = find_units(cnn(seed), x[:2])
    masks = make(ANP, iterations=iterations, seed=seed).optimise_masks(cnn(seed), layout, x, y)
    return {"min_mask": float(masks.min())}


def test_anp_masks_stay_in_unit_interval_and_are_deterministic():
    # Over seeds 0-19 the smallest mask after 20 iterations is 0.14-0.68: some mask always moves.
    model = cnn()
    x, y = data()
    layout, _ = find_units(model, x[:2])
    anp = make(ANP, iterations=20)
    m1 = anp.optimise_masks(cnn(), layout, x, y)
    m2 = anp.optimise_masks(cnn(), layout, x, y)
    assert torch.equal(m1, m2) and m1.min() >= 0 and m1.max() <= 1 and (m1 < 1).any()
    result = anp.run(model, x, y)
    assert all(param.requires_grad for param in model.parameters())
    assert sorted(result.pruned) == sorted(torch.nonzero(1 - result.scores < 0.2).flatten().tolist())


ARCHS = [("small_cnn", {}), ("vgg", {"width": 0.25}), ("preact_resnet18", {"width": 0.125})]


@pytest.mark.parametrize("cls", METHODS)
@pytest.mark.parametrize(("arch", "kw"), ARCHS)
def test_every_method_runs_on_the_zoo_architectures_deterministically(cls, arch, kw):
    torch.manual_seed(0)
    model = build_model(arch, (1, 8, 8), 10, **kw).eval()
    x, y = data()
    a, b = make(cls, seed=3).run(model, x, y), make(cls, seed=3).run(model, x, y)
    assert a.pruned == b.pruned and torch.equal(a.scores, b.scores)
    assert a.model(x[:2]).shape == (2, 10)


def test_methods_that_need_convolutions_say_so():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10)).eval()
    for cls in (CLP, FinePruning):
        with pytest.raises(OnpError, match="needs (Conv2d|a Conv2d)"):
            make(cls).run(mlp, *data())
    with pytest.raises(OnpError, match="unknown key"):
        CLP(k=2)


@pytest.mark.parametrize("cls", METHODS)
def test_policies_in_the_env_end_with_the_standalone_masks(cls):
    model = cnn()
    with torch.no_grad():
        model.features[4].weight[7] *= 25  # gives CLP something to prune
    x, y = data()
    env = NeuronPruningEnv(targets=[PruningTarget("m", model, x, y)], score="anp", budget=1.0, max_acc_drop=1.0)
    policy = BaselinePolicy(make(cls, seed=1))
    record = run_policy(policy, env, seed=0)
    standalone = make(cls, seed=1).run(model, x, y)
    assert sorted(env.task.masks.pruned()) == sorted(standalone.pruned)
    assert record[-1]["pruned"] == len(standalone.pruned) and record[-1].get("stopped")


def rnp_on_the_default_model(seed: int = 0):
    """RNP (batch 16) on the embedded default BadNets model trained with `seed`, itself seeded so."""
    import dataclasses

    from onp_env import build_artifact, load_artifact
    from onp_env.zoo import default_config

    art = load_artifact(build_artifact(dataclasses.replace(default_config(), seed=seed), progress=False))
    x, y = art.defense_set()
    return art, RNP(batch_size=16, seed=seed).run(art.model, x, y)


def rnp_unlearning(seed: int) -> dict[str, float]:
    _, result = rnp_on_the_default_model(seed)
    u = result.details["unlearning"]
    return {
        "reached": float(u["reached_threshold"]),
        "final_batch_acc": u["final_batch_acc"],
        "pruned": len(result.pruned),
    }


def test_rnp_unlearns_to_the_threshold_and_prunes_the_original_weights():
    # Over model and defense seeds 0-19: the threshold is reached on all 20 (final batch accuracy
    # 0-0.19: reaching it means <= 0.2), and 16-49 units are pruned.
    art, result = rnp_on_the_default_model()
    unlearning = result.details["unlearning"]
    assert unlearning["reached_threshold"] and unlearning["final_batch_acc"] <= 0.2
    assert result.pruned, "recovering masks on the unlearned model leaves some below 0.2"
    original, pruned = art.model.state_dict(), result.model.state_dict()
    for name in ("features.0.weight", "features.4.weight", "classifier.weight"):  # not unit parameters
        assert torch.equal(original[name], pruned[name])


def bnp_on_a_dead_unit(seed: int = 0):
    """BNP (3 epochs) on a CNN whose hidden unit 9 does nothing on clean data but carries a bias."""
    model = cnn(seed)
    with torch.no_grad():
        model.fc.weight[9] *= 0.0  # neuron 9 of the hidden Linear layer does nothing on clean data
        model.fc.bias[9] = 0.3
        model.classifier.weight[:, 9] = 0.0
    layout, _ = find_units(model, data()[0][:2])
    return layout.by_name["fc"].offset + 9, make(BNP, epochs=3, seed=seed).run(model, *data(seed=seed))


def bnp_dead_unit(seed: int) -> dict[str, float]:
    unit, result = bnp_on_a_dead_unit(seed)
    return {"position": result.pruned.index(unit) if unit in result.pruned else len(result.pruned),
            "tuned_bias": abs(result.finetuned.fc.bias[9].item())}  # fmt: skip


def test_bnp_marks_the_least_salient_unit_and_adaptive_regularisation_shrinks_it():
    # Over seeds 0-19: the dead unit is pruned at position 1-5, and its bias ends at 0.299 on every
    # seed: no data gradient reaches it, only the regulariser's shrink (by design, not by luck).
    unit, result = bnp_on_a_dead_unit()
    assert unit in result.pruned[:9]
    tuned = result.finetuned
    assert tuned is not None and abs(tuned.fc.bias[9].item()) < 0.3
    assert result.model.fc.bias[9] == 0  # the pruned model removes it


def test_mnp_reports_its_magnitude_saliency_correlation():
    result = make(MNP).run(cnn(), *data())
    corr = result.details["magnitude_saliency_correlation"]
    assert -1 <= corr <= 1 and "suppression" in result.details


def test_anp_perturbation_starts_in_the_box_and_takes_one_signed_step(monkeypatch):
    model = cnn()
    x, y = data()
    layout, _ = find_units(model, x[:2])
    anp = make(ANP, iterations=3, anp_steps=2)
    seen = []
    real = ANP.ascend

    def record(self, noise, grads):
        before = [n.detach().clone() for n in noise]
        real(self, noise, grads)
        seen.append((before, [g.clone() for g in grads], [n.detach().clone() for n in noise]))

    monkeypatch.setattr(ANP, "ascend", record)
    anp.optimise_masks(model, layout, x, y)
    assert len(seen) == 3 * 2
    for i, (before, grads, after) in enumerate(seen):
        for b, g, a in zip(before, grads, after, strict=True):
            if i % 2 == 0:  # first step of an iteration starts from U[-eps, eps]
                assert b.abs().max() <= 0.4
            torch.testing.assert_close(a, b + 0.2 * g.sign(), rtol=0, atol=1e-6)


def plant_backdoor_unit(seed: int = 0):
    """A clean digits model (trained with `seed`) with one hand-planted backdoor unit in its hidden
    Linear layer: it reads the direction in which the BadNets patch moves the features, sits below
    threshold on clean images, fires on triggered ones and votes hard for class 0."""
    from onp_env.attacks import build_attack

    from .test_attack_quality import _build

    art = _build("clean", seed)  # the attack-quality tests' clean model, through the session cache
    model, ds = art.model, art.dataset()
    patch = build_attack("badnets", (1, 8, 8), 10, params={"patch_size": 2})
    seen = {}
    hook = model.fc.register_forward_hook(lambda m, i, o: seen.__setitem__("h", i[0]))
    with torch.no_grad():
        model(ds.train_x[:500])
        clean = seen["h"].clone()
        model(patch.apply(ds.train_x[:500]))
        trig = seen["h"].clone()
    hook.remove()
    j = int(model.classifier.weight.abs().sum(0).argmin())
    w = (trig - clean).mean(0)
    with torch.no_grad():
        bias = -(torch.quantile(clean @ w, 0.99) + (trig @ w).median()) / 2
        model.fc.weight[j], model.fc.bias[j] = w, bias
        model.classifier.weight[:, j] = 0
        model.classifier.weight[0, j] = 30 / (trig @ w + bias).clamp_min(0).mean()
    x, y = art.defense_set()
    layout, _ = find_units(model, x[:2])
    return model, x, y, layout.by_name["fc"].offset + j


@pytest.fixture(scope="module")
def planted():
    return plant_backdoor_unit()


@pytest.fixture(scope="module")
def planted_seeds():
    """The planted model at seeds 0-4: for the properties that hold on most seeds, not on every one."""
    return {seed: plant_backdoor_unit(seed) for seed in range(5)}


MASK_LEARNERS = {"anp": (ANP, {"iterations": 150}), "rnp": (RNP, {"batch_size": 16}), "mnp": (MNP, {"batch_size": 16})}


def planted_unit_rank(method: str, seed: int, planted=None) -> dict[str, float]:
    """Where a mask-learning defense ranks the planted unit: units scored above it, the share of
    units tied at the top score, whether it pruned it (model and defense seeded with `seed`)."""
    model, x, y, unit = planted or plant_backdoor_unit(seed)
    cls, kw = MASK_LEARNERS[method]
    result = cls(**kw, seed=seed).run(model, x, y)
    top = result.scores.max()
    return {"above": int((result.scores > result.scores[unit]).sum()), "pruned": float(unit in result.pruned),
            "tied_top_share": float((result.scores == top).sum()) / len(result.scores)}  # fmt: skip


# Over seeds 0-19 (model and defense; benchmarks/results/test_margins.md): ANP and MNP rank the planted
# unit first and prune it on all 20, with 6.3-13.6% (ANP) and 0.6-16.5% (MNP) of the units tied at
# the top. RNP does so on 18 of 20 (on seeds 3 and 16, 93-94 units score above it), with 5.7-20.5% tied.
@pytest.mark.parametrize("method", ["anp", "mnp"])
def test_mask_learning_defenses_rank_a_planted_backdoor_unit_most_suspicious(planted, method):
    m = planted_unit_rank(method, 0, planted)
    assert m["above"] == 0 and m["pruned"]  # its mask went to 0...
    assert m["tied_top_share"] < 0.25  # ...with a quarter of the units at most


@pytest.mark.slow  # 4 more clean models to train (about 15 s); seed 0's planted model serves ANP and MNP
def test_rnp_ranks_a_planted_backdoor_unit_most_suspicious_on_most_seeds(planted_seeds):
    # 3 of 5 at least: with the measured 18 of 20, the chance that a machine whose numbers differ
    # from ours sees fewer is under 1% (binomial)
    ranks = [planted_unit_rank("rnp", seed, planted) for seed, planted in planted_seeds.items()]
    assert sum(m["above"] == 0 and m["pruned"] == 1 for m in ranks) >= 3
    assert all(m["tied_top_share"] < 0.25 for m in ranks)


def mnp_suppression(seed: int, planted=None) -> dict[str, float]:
    """MNP's suppression on the planted model: whether it reached its threshold, and how much less
    the clean hidden units' weight norms kept than the planted one's (> 0: all clean ones shrank more)."""
    model, x, y, unit = planted or plant_backdoor_unit(seed)
    exposed, report = MNP(seed=seed).suppress(model, x, y)
    ratio = exposed.fc.weight.norm(dim=1) / model.fc.weight.norm(dim=1)
    j = unit - (16 + 32)  # fc units follow the two BatchNorm layers
    clean = torch.cat([ratio[:j], ratio[j + 1 :]])
    return {"reached": float(report["reached_threshold"]), "margin": float((ratio[j] - clean.max()).detach())}


@pytest.mark.slow  # the planted models of seeds 0-4, as above
def test_mnp_suppression_shrinks_clean_units_more_than_the_planted_one(planted_seeds):
    # Over seeds 0-19: suppression reaches its threshold on 13; on each of those the planted unit keeps
    # 0.11-0.57 more of its weight norm than any clean unit. Where it stops short (7 of 20), the
    # planted unit ties with the most-kept clean one (margin -0.007 to 0.14). P(none of 5 reach) < 1%.
    runs = [mnp_suppression(seed, planted) for seed, planted in planted_seeds.items()]
    reached = [m for m in runs if m["reached"]]
    assert reached and all(m["margin"] > 0.05 for m in reached)


def test_parallel_anp_gives_bit_identical_masks():
    model = cnn()
    x, y = data()
    layout, _ = find_units(model, x[:2])
    sequential = make(ANP, iterations=30, seed=4).optimise_masks(cnn(), layout, x, y)
    parallel = make(ANP, iterations=30, seed=4, parallel=True).optimise_masks(cnn(), layout, x, y)
    assert torch.equal(sequential, parallel) and (sequential < 1).any()


def test_defense_augmentation_follows_the_images_and_rejects_what_it_cannot_do():
    from onp_env.training import augment_defense_batch, defense_augment

    gray, colour = data()[0], data((3, 32, 32))[0]
    assert defense_augment("auto", gray) == "none" and defense_augment("auto", colour) == "crop-flip"
    assert defense_augment("crop", gray) == "crop"
    with pytest.raises(OnpError, match="needs images"):
        defense_augment("crop", gray.flatten(1))
    for cls in (ANP, RNP):
        with pytest.raises(OnpError, match="unknown augment 'flip'"):
            cls(augment="flip")
    shifted = augment_defense_batch(torch.ones(64, 1, 32, 32), "crop", torch.Generator().manual_seed(0))
    zero_rows = (shifted == 0).all(3).squeeze(1).sum(1)  # padding shifted into view: 4 pixels at most on 32x32
    assert zero_rows.max() == 4 and (zero_rows < 4).any()


@pytest.mark.parametrize("cls", [ANP, RNP])
def test_augmented_mask_learning_is_seeded_and_reported(cls):
    model = cnn()
    x, y = data()
    plain = make(cls, seed=2, augment="none").run(model, x, y)
    auto = make(cls, seed=2).run(model, x, y)  # grayscale: auto means none
    a, b = make(cls, seed=2, augment="crop").run(model, x, y), make(cls, seed=2, augment="crop").run(model, x, y)
    assert torch.equal(plain.scores, auto.scores) and auto.details["augment"] == "none"
    assert torch.equal(a.scores, b.scores) and a.details["augment"] == "crop"
    assert not torch.equal(a.scores, plain.scores)


@pytest.mark.parametrize("cls", [ANP, RNP])
def test_anp_and_rnp_prune_masks_at_the_threshold_as_released(cls):
    scores = 1 - torch.tensor([0.0, 0.5, 1.0, 0.1])  # masks
    assert cls(threshold=0.0).select(scores, None, None, None, None) == [0]
    assert cls(threshold=0.5).select(scores, None, None, None, None) == [0, 3, 1]


def test_recovery_masks_see_the_augmentation_and_none_draws_nothing():
    from baselines.masked_training import train_masks
    from onp_env.training import augment_defense_batch

    model = cnn()
    x, y = data()
    layout, _ = find_units(model, x[:2])

    def loss(logits, labels, mask):
        return F.cross_entropy(logits, labels)

    plain = train_masks(cnn(), layout, x, y, loss, 2, 0.2, 0.9, 16, 0)
    cropped = train_masks(cnn(), layout, x, y, loss, 2, 0.2, 0.9, 16, 0, augment="crop")
    assert not torch.equal(plain, cropped)
    g = torch.Generator().manual_seed(0)
    before = g.get_state()
    assert augment_defense_batch(x, "none", g) is x and torch.equal(g.get_state(), before)
    with pytest.raises(OnpError, match="unknown augment"):
        train_masks(cnn(), layout, x, y, loss, 1, 0.2, 0.9, 16, 0, augment="flip")


def test_mask_bn_eval_learns_masks_on_the_running_statistics():
    from baselines.masked_training import train_masks

    x, y = data()
    layout, _ = find_units(cnn(), x[:2])

    def loss(logits, labels, mask):
        return F.cross_entropy(logits, labels) + mask.mean()

    def running(model):
        return [m.running_mean.clone() for m in model.modules() if isinstance(m, nn.BatchNorm2d)]

    learnt = {}
    for bn in ("train", "eval"):
        model = cnn()
        before = running(model)
        learnt[bn] = train_masks(model, layout, x, y, loss, 2, 0.2, 0.9, 16, 0, bn=bn)
        moved = [not torch.equal(a, b) for a, b in zip(before, running(model), strict=True)]
        assert all(moved) if bn == "train" else not any(moved)  # eval: batch statistics never used
    assert not torch.equal(learnt["train"], learnt["eval"])
    for cls in (RNP, MNP):
        assert make(cls, mask_bn="eval").run(cnn(), x, y).details["params"]["mask_bn"] == "eval"
        with pytest.raises(OnpError, match="unknown mask_bn 'frozen'"):
            cls(mask_bn="frozen")


def test_a_repair_trained_in_channels_last_returns_its_model_in_the_default_layout(monkeypatch):
    import baselines.common
    from baselines.common import finetune_pruned
    from onp_env.config import TrainConfig

    x, y = data(n=64)
    model = cnn()
    layout, _ = find_units(model, x[:2])
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.01, threads=1)
    seen: list[bool] = []  # whether every 4-d weight is channels-last at each training step
    real = baselines.common.train

    def spy(tuned, *a, **kw):
        hook = tuned.register_forward_pre_hook(lambda m, _: seen.append(all(
            q.is_contiguous(memory_format=torch.channels_last) and q.stride(1) == 1
            for q in m.parameters() if q.dim() == 4)))  # fmt: skip
        try:
            return real(tuned, *a, **kw)
        finally:
            hook.remove()

    monkeypatch.setattr(baselines.common, "train", spy)
    tuned = {}
    for fmt in (torch.contiguous_format, torch.channels_last):
        seen.clear()
        tuned[fmt] = finetune_pruned(model, layout, [0, 5], x, y, cfg, "zero", 0, "repair", False, cpu_layout=fmt)
        assert seen and all(seen) == (fmt == torch.channels_last)
    weights = {fmt: dict(m.named_parameters()) for fmt, m in tuned.items()}
    for name, w in model.named_parameters():
        for fmt in tuned:
            assert weights[fmt][name].stride() == w.stride()  # the model's own layout, whatever it trained in
        # the same training, its sums possibly in another order: close
        assert torch.allclose(weights[torch.channels_last][name], weights[torch.contiguous_format][name], atol=1e-4)
