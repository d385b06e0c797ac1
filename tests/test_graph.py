import torch

from onp_env.graph.build import EDGE_TYPES, build_graph
from onp_env.graph.features import FEATURES
from onp_env.graph.units import find_units
from onp_env.models import build_model


def graph_of(name, **kw):
    torch.manual_seed(0)
    model = build_model(name, (1, 8, 8), 10, **kw).eval()
    x, y = torch.rand(32, 1, 8, 8), torch.arange(32) % 10
    layout, _ = find_units(model, x[:2])
    return build_graph(model, layout, x, y, k=8, tau=0.3, k_intra=4), layout


def edges_of(g, kind):
    return g.edge_index[:, g.edge_attr[:, 1 + EDGE_TYPES.index(kind)] == 1]


def test_inter_layer_edges_keep_the_top_k_incoming_per_node():
    g, _ = graph_of("small_cnn")
    inter = edges_of(g, "inter")
    assert inter.shape[1] == 32 * 8 + 128 * 8  # conv 16->32 and fc 32->128, 8 incoming each
    assert torch.bincount(inter[1], minlength=176)[16:].eq(8).all()
    assert (g.edge_attr[:, 0] >= 0).all() and (g.edge_attr[:, 0] <= 1).all()


def test_inter_layer_weight_is_the_l1_norm_of_the_kernel_slice():
    torch.manual_seed(0)
    model = build_model("small_cnn", (1, 8, 8), 10).eval()
    layout, _ = find_units(model, torch.rand(2, 1, 8, 8))
    g = build_graph(model, layout, torch.rand(8, 1, 8, 8), torch.arange(8), k=16)
    w = model.features[4].weight.detach().abs().sum((2, 3))  # (32, 16)
    inter = g.edge_attr[:, 1] == 1
    src, dst = g.edge_index[:, inter]
    first = (dst >= 16) & (dst < 48)  # targets in features.5
    got = g.edge_attr[inter][first, 0]
    expected = w[dst[first] - 16, src[first]]
    assert torch.allclose(got, expected / expected.max())


def test_skip_edges_follow_residual_groups_and_intra_edges_are_symmetric():
    g, layout = graph_of("preact_resnet18", width=0.125)
    skip = edges_of(g, "skip")
    assert skip.shape[1] == sum((len(grp) - 1) * layout.by_name[grp[0]].size for grp in layout.groups)
    intra = edges_of(g, "intra")
    assert intra.shape[1] > 0
    pairs = set(map(tuple, intra.t().tolist()))
    assert all((b, a) in pairs for a, b in pairs)
    assert (g.layer[intra[0]] == g.layer[intra[1]]).all()


def test_features_are_normalised_per_layer_and_exports_agree():
    g, layout = graph_of("vgg")
    assert g.x.shape == (704, len(FEATURES)) and torch.isfinite(g.x).all()
    gamma = g.x[:, FEATURES.index("gamma")]
    for lay in layout.layers:
        assert abs(gamma[lay.offset : lay.offset + lay.size].mean().item()) < 1e-4
    pruned = torch.zeros(704, dtype=torch.bool)
    pruned[[3, 500]] = True
    data = g.to_pyg(pruned)
    assert data.num_nodes == 704 and data.edge_index.shape == g.edge_index.shape
    assert data.x[3, FEATURES.index("pruned")] == 1 and data.x[4, FEATURES.index("pruned")] == 0
    nxg = g.to_networkx(pruned)
    assert nxg.number_of_nodes() == 704 and nxg.number_of_edges() == len(set(map(tuple, g.edge_index.t().tolist())))
    assert nxg.nodes[500]["pruned"] == 1.0 and nxg.nodes[0]["layer"] == layout.layers[0].name
