"""How much style, how much smoothing? The style weight (beta; alpha = content_weight = 1) against
the total-variation weight, 3 x 3 points at the default settings.

Rows of grid.png are the style weights, columns the TV weights. Weights are traced arrays, so all
nine points are one vmapped program, compiled once, with the targets extracted once.

    nstjax --config=configs/ablation_weights.py --workdir=runs/ablation_weights --dry_run
    nstjax --config=configs/ablation_weights.py --workdir=runs/ablation_weights

The TV term is the mean squared difference of neighbouring pixels (0..255 units), about 1e3 for
these images, while content and style terms are around 1e6: in a 128 px, 40-step run a TV weight of
1e3 smooths the result a little and 1e4 clearly (most at the lowest style weight). Add
``--config.size=128`` for a quick look on a CPU (about 2 minutes on 2 busy cores at 40 steps).
"""

from nstjax.config import base_config


def get_config():
    c = base_config()
    c.content = "../shared/images/tubingen.jpg"
    c.style = "../shared/images/starry_night.jpg"
    c.sweep.axes = (
        ("style_weight", (1e2, 5e2, 2.5e3)),
        ("tv_weight", (0.0, 1e3, 1e4)),
    )
    return c
