"""The default run: fast and good-looking on a CPU (about 1.5 minutes at 256 px on 2 cores).

Content relu4_2, style relu1_1..relu5_1 with Grams normalised per position and channel (so every
layer pulls with similar strength), alpha/beta = 1/500, started from the content photo and optimised
with L-BFGS for 150 steps. Every field and its meaning: ``nstjax/config.py`` (``base_config``).

    nstjax --workdir=runs/default                                  # built-in image pair
    nstjax --workdir=runs/mine --config.content=photo.jpg --config.style=painting.jpg
"""

from nstjax.config import base_config


def get_config():
    return base_config()
