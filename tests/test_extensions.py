"""Beyond Gatys 2015: histogram loss, colour preservation, spatial control, other style statistics.

Numeric checks against numpy/scipy on small arrays, then behaviour tests that measure each paper's
claim on real 64 px runs: luminance-only transfer and colour matching keep the content's chroma;
masks confine each style to its region; the histogram loss brings the output's per-channel
activation histograms closer to the style's than the Gram loss alone in the same number of steps.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from jax.test_util import check_grads
from PIL import Image

from nstjax import color, features, histogram, masks, stats
from nstjax.batch import optimise_problem
from nstjax.config import base_config, validate
from nstjax.errors import ConfigError, ImageError
from nstjax.losses import Objective, loss_terms, objective_weights
from nstjax.optimize import OptimizerSpec, init_image, run_steps
from nstjax.problem import load_problem
from nstjax.run import run
from nstjax.targets import compute_targets

RNG = np.random.default_rng(7)
L5 = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")


# ---- histogram matching and loss -----------------------------------------------------------------


def _numpy_match(x, t, mask=None):
    """Exact histogram matching, column by column, written the obvious way."""
    out = x.astype(np.float64).copy()
    idx = np.arange(len(x)) if mask is None else np.flatnonzero(mask)
    for c in range(x.shape[1]):
        out[idx[np.argsort(x[idx, c], kind="stable")], c] = np.sort(t[:, c])
    return out


def test_histogram_match_is_exact():
    x = RNG.normal(size=(40, 3)).astype(np.float32)
    t = RNG.gamma(2.0, 3.0, size=(40, 3)).astype(np.float32)
    r = np.asarray(histogram.histogram_match(x, histogram.quantiles(t, 40)))
    np.testing.assert_array_equal(r, _numpy_match(x, t))
    for c in range(3):  # the output keeps its ranks and takes exactly the target's values
        np.testing.assert_array_equal(np.sort(r[:, c]), np.sort(t[:, c]))
        np.testing.assert_array_equal(np.argsort(r[:, c]), np.argsort(x[:, c]))
    mask = RNG.random(40) < 0.4
    n = int(mask.sum())
    r = np.asarray(histogram.histogram_match(x, histogram.quantiles(t[:n], n), mask))
    np.testing.assert_array_equal(r, _numpy_match(x, t[:n], mask))


def test_quantiles():
    t = RNG.normal(size=(30, 2)).astype(np.float32)
    np.testing.assert_array_equal(histogram.quantiles(t, 30), np.sort(t, axis=0))
    np.testing.assert_allclose(histogram.weighted_quantiles(t, None, 30), np.sort(t, axis=0),
                               rtol=1e-6)
    w = (RNG.random(30) < 0.5).astype(np.float32)  # weight 0 = not counted
    k = int(w.sum())
    np.testing.assert_allclose(histogram.weighted_quantiles(t, w, k), np.sort(t[w > 0], axis=0),
                               rtol=1e-6)
    # Two images, equal weights: the pooled activations' sorted values.
    u = RNG.normal(2.0, 1.0, size=(30, 2)).astype(np.float32)
    both = histogram.weighted_quantiles(np.concatenate([t, u]), np.full(60, 1 / 60, np.float32), 60)
    np.testing.assert_allclose(both, np.sort(np.concatenate([t, u]), axis=0), rtol=1e-4, atol=1e-4)
    # Other sizes: linear interpolation of the quantile function, each sample at (i + 1/2) / N.
    q = np.asarray(histogram.quantiles(t, 7))
    p = (np.arange(7) + 0.5) / 7
    for c in range(2):
        np.testing.assert_allclose(q[:, c],
                                   np.interp(p, (np.arange(30) + 0.5) / 30, np.sort(t[:, c])),
                                   rtol=1e-5, atol=1e-6)


def test_histogram_loss_value_and_gradient():
    """Value: the squared 1-D W2 distance per channel (sorted differences); gradient: that of the
    paper's form, 2 (O - R(O)) / size with the remapped R held constant."""
    x = RNG.normal(size=(50, 4)).astype(np.float32)
    t = RNG.normal(3.0, 2.0, size=(50, 4)).astype(np.float32)
    tq = histogram.quantiles(t, 50)
    np.testing.assert_allclose(histogram.histogram_loss(x, tq),
                               np.mean((np.sort(x, 0) - np.sort(t, 0)) ** 2), rtol=1e-5)
    g = jax.grad(lambda z: histogram.histogram_loss(z, tq))(jnp.asarray(x))
    np.testing.assert_allclose(g, 2 * (x - _numpy_match(x, t)) / x.size, rtol=1e-4, atol=1e-7)
    assert float(histogram.histogram_loss(t, tq)) == 0.0
    mask = np.zeros(50, bool)
    assert float(histogram.histogram_loss(x, tq, mask)) == 0.0  # an empty region costs nothing


# ---- mean/std and Wasserstein-2 ------------------------------------------------------------------


def test_mean_std_loss_against_numpy():
    f = RNG.normal(size=(60, 5)).astype(np.float32) * 2 + 1
    s = RNG.normal(size=(80, 5)).astype(np.float32) * 3 - 1
    target = stats.mean_std_target(s, stats.uniform_weights(80))
    np.testing.assert_allclose(target["mean"], s.mean(0), rtol=1e-5)
    np.testing.assert_allclose(target["std"], s.std(0), rtol=1e-4)
    expected = (((f.mean(0) - s.mean(0)) ** 2).sum() + ((f.std(0) - s.std(0)) ** 2).sum()) / 5
    np.testing.assert_allclose(stats.mean_std_loss(f, stats.uniform_weights(60), target), expected,
                               rtol=1e-4)
    # Weights restrict the statistics to a region.
    region = RNG.random(60) < 0.5
    w = region / region.sum()
    fr = f[region]
    expected = (((fr.mean(0) - s.mean(0)) ** 2).sum() + ((fr.std(0) - s.std(0)) ** 2).sum()) / 5
    np.testing.assert_allclose(stats.mean_std_loss(f, jnp.asarray(w, jnp.float32), target),
                               expected, rtol=1e-4)


def test_w2_between_gaussians_closed_forms():
    # Commuting (diagonal) covariances: ||mu1 - mu2||^2 + sum (sqrt(a) - sqrt(b))^2.
    a, b = RNG.uniform(0.1, 4, 6), RNG.uniform(0.1, 4, 6)
    m1, m2 = RNG.normal(size=6), RNG.normal(size=6)
    expected = ((m1 - m2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    got = stats.gaussian_w2(*(jnp.asarray(v, jnp.float32)
                              for v in (m1, np.diag(a), m2, np.diag(b))))
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    # Full covariances, against scipy's sqrtm in float64.
    A, B = RNG.normal(size=(6, 6)), RNG.normal(size=(6, 6))
    s1, s2 = A @ A.T + 0.1 * np.eye(6), B @ B.T + 0.1 * np.eye(6)
    r2 = scipy.linalg.sqrtm(s2).real
    expected = ((m1 - m2) ** 2).sum() + np.trace(s1 + s2
                                                 - 2 * scipy.linalg.sqrtm(r2 @ s1 @ r2).real)
    got = stats.gaussian_w2(*(jnp.asarray(v, jnp.float32) for v in (m1, s1, m2, s2)))
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    np.testing.assert_allclose(
        stats.gaussian_w2(*(jnp.asarray(v, jnp.float32) for v in (m1, s1, m1, s1))), 0.0, atol=1e-3)


@pytest.mark.parametrize("m", [200, 4])  # more positions than channels, and fewer (rank-deficient)
def test_w2_loss_from_activations(m):
    c = 6
    mix = RNG.normal(size=(c, c)).astype(np.float32)
    s = RNG.normal(size=(300, c)).astype(np.float32) @ mix + 2.0
    f = RNG.normal(size=(m, c)).astype(np.float32)
    target = stats.w2_target(s, stats.uniform_weights(300))
    np.testing.assert_allclose(target["cov_sqrt"] @ target["cov_sqrt"], np.cov(s.T, bias=True),
                               rtol=1e-3, atol=1e-3)
    s_cov, f_cov = np.cov(s.T, bias=True), np.cov(f.T, bias=True)
    r = scipy.linalg.sqrtm(s_cov).real
    cross = np.trace(scipy.linalg.sqrtm(r @ f_cov @ r).real)
    expected = (((f.mean(0) - s.mean(0)) ** 2).sum() + np.trace(f_cov) + np.trace(s_cov)
                - 2 * cross) / c
    np.testing.assert_allclose(stats.w2_loss(f, stats.uniform_weights(m), target), expected,
                               rtol=2e-3)
    with jax.enable_x64(True):  # the custom gradient of tr(sqrt) agrees with finite differences
        t64 = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), target)
        w64 = jnp.full((m,), 1.0 / m, jnp.float64)
        check_grads(lambda z: stats.w2_loss(z, w64, t64), (jnp.asarray(f, jnp.float64),), order=1,
                    modes=["rev"], eps=1e-4, rtol=1e-3)


def test_w2_gradient_is_finite_at_a_singular_covariance():
    """Activations with dead channels and fewer positions than channels: eigenvalue gaps of zero."""
    f = np.zeros((3, 8), np.float32)
    f[:, :2] = RNG.normal(size=(3, 2))
    target = stats.w2_target(jnp.asarray(f), stats.uniform_weights(3))
    g = jax.grad(lambda z: stats.w2_loss(z, stats.uniform_weights(3), target))(jnp.asarray(f))
    assert np.isfinite(np.asarray(g)).all()
    assert float(stats.w2_loss(f, stats.uniform_weights(3), target)) < 1e-4


# ---- masks and guided Grams ----------------------------------------------------------------------


def test_guided_gram_against_numpy(params):
    """Masks pooled to each layer's exact shape; G_k = sum T^2 f f^T / sum T^2 (Gatys et al.
    2017)."""
    img = RNG.uniform(0, 255, (37, 53, 3)).astype(np.float32)  # odd sizes: VGG pools drop a row
    mask = np.zeros((37, 53), np.float32)
    mask[:, :20] = 1.0
    feats = features(params, img, L5)
    for layer in L5:
        f = np.asarray(feats[layer][0], np.float64)
        t = np.asarray(masks.layer_mask(mask, layer), np.float64)
        assert t.shape == f.shape[:2], layer
        ff = f.reshape(-1, f.shape[-1])
        w = (t ** 2).reshape(-1)
        expected = (ff * w[:, None]).T @ ff / w.sum()
        np.testing.assert_allclose(masks.guided_gram(feats[layer], t), expected, rtol=2e-4,
                                   atol=1e-4 * np.abs(expected).max())
    # A full mask gives the ordinary per-position Gram.
    from nstjax.losses import style_target
    np.testing.assert_allclose(masks.guided_gram(feats["relu2_1"],
                                                 np.ones(feats["relu2_1"].shape[1:3])),
                               style_target(feats["relu2_1"]), rtol=1e-5, atol=1e-3)


def test_style_mask_restricts_the_style_statistics(params):
    """A style mask: the target is the guided statistic of the masked part of the style image."""
    content = RNG.uniform(0, 255, (16, 16, 3)).astype(np.float32)
    style = RNG.uniform(0, 255, (24, 20, 3)).astype(np.float32)
    smask = np.zeros((24, 20), np.float32)
    smask[:12] = 1.0
    f = features(params, style, ["relu2_1"])["relu2_1"]
    t = compute_targets(params, Objective((), ("relu2_1",)), content, [style], style_masks=[smask])
    np.testing.assert_allclose(t["style"]["relu2_1"],
                               masks.guided_gram(f, masks.layer_mask(smask, "relu2_1")), rtol=1e-5)
    top = np.asarray(f[0, :6], np.float64).reshape(-1, 128)  # relu2_1 is pooled once: rows 0..5
    t = compute_targets(params, Objective((), ("relu2_1",), style_stat="mean_std"), content,
                        [style], style_masks=[smask])
    np.testing.assert_allclose(t["style"]["relu2_1"]["mean"], top.mean(0), rtol=1e-4, atol=1e-3)


def test_pool_mask_averages_blocks():
    m = RNG.random((9, 6)).astype(np.float32)
    expected = m[:8].reshape(4, 2, 3, 2).mean(axis=(1, 3))
    np.testing.assert_allclose(masks.pool_mask(m, 1), expected, rtol=1e-6)
    assert masks.pool_mask(m, 2).shape == (2, 1)


def test_load_mask(tmp_path):
    a = np.zeros((20, 30), np.uint8)
    a[:, 15:] = 255
    Image.fromarray(a).save(tmp_path / "m.png")
    m = masks.load_mask(tmp_path / "m.png", (60, 40))
    assert m.shape == (40, 60) and m.min() == 0.0 and m.max() == 1.0
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / "black.png")
    with pytest.raises(ImageError, match="black everywhere"):
        masks.load_mask(tmp_path / "black.png", (5, 5))


# ---- colour --------------------------------------------------------------------------------------


def test_color_spaces_round_trip_and_luminance():
    img = RNG.uniform(0, 255, (5, 4, 3))
    for space in color.SPACES:
        np.testing.assert_allclose(color.to_rgb(color.rgb_to(img, space), space), img, atol=1e-9)
        np.testing.assert_allclose(color.luminance(img, space), img @ [0.299, 0.587, 0.114],
                                   atol=1e-9)
    gray = np.full((3, 3, 3), 100.0)
    np.testing.assert_allclose(color.chroma(gray), 0.0, atol=1e-9)  # gray has no chroma
    content = RNG.uniform(0, 255, (6, 6, 3))
    out = color.recombine(RNG.uniform(0, 255, (6, 6, 3)), content)
    inside = (out > 0.5).all(-1) & (out < 254.5).all(-1)  # away from clipping
    np.testing.assert_allclose(color.chroma(out)[inside], color.chroma(content)[inside], atol=1e-3)


def test_match_luminance_and_color():
    s = RNG.uniform(0, 255, (40, 40))
    c = RNG.normal(120, 20, (30, 30))
    m = color.match_luminance(s, c)
    np.testing.assert_allclose([m.mean(), m.std()], [c.mean(), c.std()], rtol=1e-9)
    # Mean/covariance colour matching: exact where nothing clips (smooth mid-range images).
    base = RNG.normal(size=(32, 32, 3))
    style = 128 + base @ np.array([[20, 5, 0], [0, 15, 3], [2, 0, 10.0]])
    content = 110 + RNG.normal(size=(24, 24, 3)) @ np.array([[12, 4, 2], [0, 18, 1], [1, 1, 9.0]])
    for method in ("sqrt", "cholesky"):
        out = color.match_color(style, content, method)
        assert out.min() > 0 and out.max() < 255
        mu_o, cov_o = color.mean_cov(out)
        mu_c, cov_c = color.mean_cov(content)
        np.testing.assert_allclose(mu_o, mu_c, atol=1e-3)
        np.testing.assert_allclose(cov_o, cov_c, rtol=1e-4, atol=1e-2)
    with pytest.raises(ConfigError):
        color.match_color(style, content, "lab")


# ---- objective, targets, config ------------------------------------------------------------------


def test_objective_fields_are_static_and_weights_traced(params):
    obj = Objective(("relu2_1",), ("relu1_1", "relu2_1"), hist_layers=("relu1_1",), regions=2)
    hash(obj)  # a jit static argument
    assert obj.layers == ("relu1_1", "relu2_1")
    assert obj.term_names[-2:] == ("hist", "hist/relu1_1")
    assert "hist" not in Objective(("relu2_1",), ("relu1_1",)).term_names
    w = objective_weights(obj, 1.0, 10.0, 0.0, hist_weight=3.0)
    assert float(w["hist_weight"]) == 3.0 and float(w["hist_layers"]["relu1_1"]) == 1.0
    assert "hist_weight" not in objective_weights(Objective(("relu2_1",), ("relu1_1",)), 1, 1, 0)
    for bad in ({"style_stat": "kl"}, {"hist_layers": ("relu9_1",)}, {"regions": -1}):
        with pytest.raises(ConfigError):
            dataclasses.replace(obj, **bad)

    # Targets: shapes per statistic and region; one compiled loss, vmapped over a batch of weights
    # (as a sweep does): histogram and region weights are traced, not static.
    content = RNG.uniform(0, 255, (16, 24, 3)).astype(np.float32)
    styles = [RNG.uniform(0, 255, (20, 20, 3)).astype(np.float32) for _ in range(2)]
    left = np.zeros((16, 24), np.float32)
    left[:, :12] = 1
    t = compute_targets(params, obj, content, styles, content_masks=[left, 1 - left])
    assert t["style"]["relu2_1"].shape == (2, 128, 128)
    assert t["hist"]["relu1_1"].shape == (2, 16 * 24, 64)
    assert t["masks"]["relu2_1"].shape == (2, 8, 12)
    batch = jax.tree.map(lambda *xs: jnp.stack(xs),
                         *[objective_weights(obj, 1.0, 10.0, 0.0, hist_weight=h)
                           for h in (0.0, 1.0, 2.0)])
    losses = jax.jit(jax.vmap(lambda w: loss_terms(params, jnp.asarray(content), t, w, obj)))(batch)
    np.testing.assert_allclose(losses["hist"], [0.0, losses["hist"][1], 2 * losses["hist"][1]],
                               rtol=1e-5)
    assert float(losses["hist"][1]) > 0
    np.testing.assert_allclose(losses["loss"], losses["content"] + losses["style"] + losses["tv"]
                               + losses["hist"], rtol=1e-5)
    for stat, key, shape in (("gram", None, (64, 64)), ("mean_std", "std", (64,)),
                             ("w2", "cov_sqrt", (64, 64))):
        o = Objective((), ("relu1_1",), style_stat=stat)
        target = compute_targets(params, o, content, styles, [1.0, 3.0])["style"]["relu1_1"]
        assert (target if key is None else target[key]).shape == shape
        o = dataclasses.replace(o, regions=2)
        target = compute_targets(params, o, content, styles,
                                 content_masks=[left, 1 - left])["style"]["relu1_1"]
        assert (target if key is None else target[key]).shape == (2,) + shape
    with pytest.raises(ConfigError, match="content masks"):
        compute_targets(params, obj, content, styles)
    with pytest.raises(ConfigError, match="style_blend"):
        compute_targets(params, obj, content, styles, [1.0, 2.0], content_masks=[left, 1 - left])


def test_blended_statistics_are_the_mixtures(params):
    """Several style images, blended: the mixture of their activations (pooled, weighted)."""
    content = RNG.uniform(0, 255, (16, 16, 3)).astype(np.float32)
    a, b = (RNG.uniform(0, 255, (16, 16, 3)).astype(np.float32) for _ in range(2))
    fa = np.asarray(features(params, a, ["relu1_1"])["relu1_1"][0], np.float64).reshape(-1, 64)
    fb = np.asarray(features(params, b, ["relu1_1"])["relu1_1"][0], np.float64).reshape(-1, 64)
    pooled = np.concatenate([fa, fb])  # equal sizes and equal weights: the pooled activations
    t = compute_targets(params, Objective((), ("relu1_1",), style_stat="mean_std",
                                          hist_layers=("relu1_1",)),
                        content, [a, b], [1.0, 1.0])
    np.testing.assert_allclose(t["style"]["relu1_1"]["mean"], pooled.mean(0), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(t["style"]["relu1_1"]["std"], pooled.std(0), rtol=1e-3, atol=1e-2)
    q = np.asarray(t["hist"]["relu1_1"])  # 256 quantiles of 512 pooled values: pairs' midpoints
    s = np.sort(pooled, axis=0)
    np.testing.assert_allclose(q, 0.5 * (s[0::2] + s[1::2]), rtol=1e-4, atol=1e-3)
    w2 = compute_targets(params, Objective((), ("relu1_1",), style_stat="w2"), content, [a, b])
    cov = np.asarray(w2["style"]["relu1_1"]["cov_sqrt"], np.float64)
    np.testing.assert_allclose(cov @ cov, np.cov(pooled.T, bias=True), rtol=1e-2,
                               atol=1e-2 * np.abs(cov @ cov).max())


def test_config_fields(tmp_path, image_dir):
    def cfg(**kw):
        c = base_config()
        c.content, c.style = str(image_dir / "tubingen.jpg"), str(image_dir / "starry_night.jpg")
        for k, v in kw.items():
            c[k] = v
        return c

    spec = validate(cfg())
    assert spec.objective.style_stat == "gram" and not spec.objective.hist_layers
    assert spec.objective.regions == 0 and spec.preserve_color == "none"
    spec = validate(cfg(style_stat="w2", hist_layers=("relu1_1", "relu4_1"),
                        hist_layer_weights=(2.0, 1.0), hist_weight=7.0, preserve_color="luminance",
                        color_space="yuv"))
    assert (spec.objective.style_stat == "w2"
            and spec.objective.hist_layers == ("relu1_1", "relu4_1"))
    assert spec.hist_weight == 7.0 and spec.hist_layer_weights == (2.0, 1.0)
    assert spec.preserve_color == "luminance" and spec.color_space == "yuv"
    two = f"{image_dir / 'starry_night.jpg'},{image_dir / 'shipwreck.jpg'}"
    spec = validate(cfg(style=two, content_masks="a.png, b.png"))
    assert spec.objective.regions == 2 and spec.content_masks == ("a.png", "b.png")
    for bad, match in (({"style_stat": "gramm"}, "style_stat"),
                       ({"hist_layers": ("relu9_1",)}, "unknown hist layer"),
                       ({"hist_layers": ("relu1_1",), "hist_layer_weights": (1.0, 2.0)},
                        "hist_layer_weights"),
                       ({"hist_weight": float("nan")}, "hist_weight"),
                       ({"preserve_color": "yes"}, "preserve_color"),
                       ({"color_space": "lab"}, "color_space"),
                       ({"style": two, "content_masks": "a.png"}, "1 masks for 2 style images"),
                       ({"style": two, "content_masks": "a.png,b.png", "style_blend": (1.0, 2.0)},
                        "style_blend"),
                       ({"style_masks": "a.png,b.png"}, "style_masks has 2 masks")):
        with pytest.raises(ConfigError, match=match):
            validate(cfg(**bad))
    # One style image and one mask: valid ("style only the sky").
    assert validate(cfg(content_masks="a.png")).objective.regions == 1


# ---- behaviour: each paper's claim, measured ---------------------------------------------------


def _config(image_dir, **kw):
    c = base_config()
    c.content, c.style = str(image_dir / "tubingen.jpg"), str(image_dir / "starry_night.jpg")
    c.size, c.steps, c.progress, c.log_every, c.chunk = 64, 20, False, 5, 5
    for k, v in kw.items():
        c[k] = v
    return c


def _chroma_distance(image, content):
    """Per-pixel distance of the chroma (YIQ's I, Q) and of its mean and covariance."""
    a, b = color.chroma(image).reshape(-1, 2), color.chroma(content).reshape(-1, 2)
    return (np.abs(a - b).mean(), np.linalg.norm(a.mean(0) - b.mean(0)),
            np.linalg.norm(np.cov(a.T) - np.cov(b.T)))


def test_colour_preservation_keeps_the_contents_chroma(params, image_dir, tmp_path):
    """Gatys et al. 2016: both methods leave the output's chroma closer to the content's than plain
    transfer does; luminance-only transfer keeps it exactly (final.png is the recombined image)."""
    problem = load_problem(validate(_config(image_dir)), params)
    plain, content = optimise_problem(problem).image, problem.content
    d_plain = _chroma_distance(plain, content)
    assert d_plain[0] > 5.0  # the plain transfer does change the colours (blue and yellow)

    matched = optimise_problem(
        load_problem(validate(_config(image_dir, preserve_color="histogram")), params)).image
    d_hist = _chroma_distance(matched, content)
    assert all(h < 0.9 * p for h, p in zip(d_hist, d_plain)), (d_hist, d_plain)

    run(_config(image_dir, preserve_color="luminance"), tmp_path / "lum", params=params)
    final = np.asarray(Image.open(tmp_path / "lum" / "final.png"), np.float32)
    d_lum = _chroma_distance(final, content)
    assert d_lum[0] < 1.0 and d_lum[1] < 0.5, d_lum  # 8-bit rounding and clipping only
    # ...while its luminance was styled: it differs from the content's.
    assert np.abs(color.luminance(final) - color.luminance(content)).mean() > 3.0


def _flat_styles():
    """Two flat-colour-ish textures: red-orange stripes and blue waves."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    red = np.stack([200 + 40 * np.sin(xx / 2.0), 40 + 30 * np.sin(yy / 3.0),
                    30 + 20 * rng.random((64, 64))], -1)
    blue = np.stack([30 + 20 * rng.random((64, 64)), 60 + 40 * np.sin((xx + yy) / 3.0),
                     210 + 30 * np.cos(yy / 2.0)], -1)
    return red.astype(np.float32), blue.astype(np.float32)


def test_masks_confine_each_style_to_its_region(params, tubingen):
    """Gatys et al. 2017: with left/right masks, each half of the output is closer in colour to its
    own style than to the other; without masks (the two styles blended) neither half is."""
    red, blue = _flat_styles()
    h, w = tubingen.shape[:2]
    left = np.zeros((h, w), np.float32)
    left[:, : w // 2] = 1.0
    spec = OptimizerSpec("lbfgs")
    gaps = {}
    for masked in (True, False):
        obj = Objective(("relu4_2",), L5, content_norm="mean", gram_norm="chw",
                        regions=2 if masked else 0)
        t = compute_targets(params, obj, tubingen, [red, blue],
                            content_masks=[left, 1 - left] if masked else None)
        weights = objective_weights(obj, 1.0, 500.0, 0.0)
        x = init_image("noise", jax.random.PRNGKey(0), tubingen)
        state = spec.build().init(x)
        for _ in range(4):  # 20 steps, compiled 5 at a time (compiling is the slow part on a CPU)
            x, state, _, _, ok = run_steps(params, t, weights, x, state, obj=obj, spec=spec,
                                           n_steps=5)
        assert bool(ok)
        x = np.asarray(x)
        halves = x[:, : w // 2].reshape(-1, 3).mean(0), x[:, w // 2:].reshape(-1, 3).mean(0)
        def dist(a, s):
            return float(np.linalg.norm(a - s.reshape(-1, 3).mean(0)))

        # How much closer each half is to its own style than to the other one.
        gaps[masked] = (dist(halves[0], blue) - dist(halves[0], red),
                        dist(halves[1], red) - dist(halves[1], blue))
    assert gaps[True][0] > 10 and gaps[True][1] > 10, gaps
    assert abs(gaps[False][0] + gaps[False][1]) < 5, gaps  # unmasked: the halves do not separate


def test_histogram_loss_matches_activation_histograms_better_than_gram(params, tubingen, starry):
    """Risser et al. 2017: adding the histogram loss to the Gram loss brings the output's
    per-channel activation histograms closer to the style's than the Gram loss alone, in the same
    number of steps (texture synthesis from noise, where the Gram loss's instabilities show)."""
    layers = ("relu1_1", "relu4_1")
    spec = OptimizerSpec("lbfgs")
    fs = features(params, starry, layers)
    distances = {}
    for with_hist in (False, True):
        obj = Objective((), L5, content_norm="mean", gram_norm="chw",
                        hist_layers=layers if with_hist else ())
        t = compute_targets(params, obj, tubingen, [starry])
        weights = objective_weights(obj, 0.0, 500.0, 0.0, **(
            {"hist_weight": 500.0, "hist_layer_weights": (100.0, 1.0)} if with_hist else {}))
        x = init_image("noise", jax.random.PRNGKey(0), tubingen)
        state = spec.build().init(x)
        for _ in range(4):  # 20 steps, compiled 5 at a time (compiling is the slow part on a CPU)
            x, state, _, _, ok = run_steps(params, t, weights, x, state, obj=obj, spec=spec,
                                           n_steps=5)
        assert bool(ok)
        fo = features(params, x, layers)
        distances[with_hist] = [
            float(histogram.histogram_distance(fo[l][0], histogram.quantiles(
                np.asarray(fs[l][0]).reshape(-1, fs[l].shape[-1]),
                fo[l].shape[1] * fo[l].shape[2])))
            for l in layers]
    assert all(h < 0.95 * g for h, g in zip(distances[True], distances[False])), distances


def test_command_line_with_masks_histogram_and_statistic(image_dir, tmp_path, capsys):
    """The options as a user types them: mask files, histogram layers, another statistic."""
    from nstjax.cli import main

    sky = np.zeros((48, 64), np.uint8)
    sky[:20] = 255
    Image.fromarray(sky).save(tmp_path / "sky.png")
    base = ["nstjax", f"--config.content={image_dir / 'tubingen.jpg'}",
            f"--config.style={image_dir / 'starry_night.jpg'}", "--config.size=64",
            "--config.steps=5", "--config.chunk=5", "--config.log_every=5",
            "--config.progress=False"]
    work = tmp_path / "run"
    assert main(base + [f"--workdir={work}", f"--config.content_masks={tmp_path / 'sky.png'}",
                        "--config.hist_layers=('relu1_1','relu3_1')",
                        "--config.style_stat=mean_std"]) == 0
    lines = [json.loads(l) for l in (work / "metrics.jsonl").read_text().splitlines()]
    last = lines[-1]
    assert last["step"] == 5 and last["hist/relu3_1"] > 0
    assert last["loss"] == pytest.approx(
        last["content"] + last["style"] + last["tv"] + last["hist"], rel=1e-5)
    assert (json.loads((work / "config.json").read_text())["content_masks"]
            == str(tmp_path / "sky.png"))
    final = np.asarray(Image.open(work / "final.png"), np.float32)
    content = np.asarray(Image.open(image_dir / "tubingen.jpg").resize((64, 48), Image.LANCZOS),
                         np.float32)
    # Only the sky (top rows) was given a style: the bottom rows changed less.
    change = np.abs(final - content).mean(axis=(1, 2))
    assert change[:16].mean() > 1.5 * change[-16:].mean(), change
    capsys.readouterr()
    for extra, message in (
            ([f"--config.content_masks={tmp_path / 'sky.png'},{tmp_path / 'sky.png'}"],
             "2 masks for 1 style"),
            ([f"--config.content_masks={tmp_path / 'nope.png'}"], "no such image file"),
            (["--config.preserve_color=grayscale"], "preserve_color must be one of")):
        assert main(base + [f"--workdir={tmp_path / 'bad'}", *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("nstjax: error:") and message in err and err.count("\n") == 1, err
