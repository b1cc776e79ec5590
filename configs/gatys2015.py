"""The settings of Gatys, Ecker & Bethge (2015), "A Neural Algorithm of Artistic Style".

- the normalised VGG-19: each conv filter rescaled to mean activation 1 over a set of photographs
  (``network="vgg19_normalized"``; nstjax/network.py, and how nstjax's image set differs from the
  paper's ImageNet in docs/extensions.md);
- content layer conv4_2, style layers conv1_1, conv2_1, conv3_1, conv4_1, conv5_1 with w_l = 1/5;
- content loss 1/2 sum (F - P)^2 (eq. 1), style loss E_l = 1/(4 N^2 M^2) sum (G - A)^2 (eq. 4);
- alpha/beta = 1e-3 (Fig. 2 uses 1e-3 and 1e-4), average pooling, white-noise init, L-BFGS.

alpha and beta are the paper's numbers, used as they are, at every size: the normalised network is
what they were chosen for. (On the plain ImageNet network, whose filters average 23 at relu1_1 and
565 at relu4_1 on the normalisation's photographs, relu4_1 alone makes 91 % of the style loss at
the same alpha/beta: ``python experiments/figures.py networks --quick`` shows both networks.) The
content loss grows with the pixel count and the style loss does not, so a smaller output weighs
the style more: at 96 px, 1e-4 no longer converges (experiments/README.md).

Layer names: the authors' Caffe network applied each ReLU in place, so the response the paper calls
"conv4_2" is the rectified one, nstjax's ``relu4_2`` (nstjax's ``conv4_2`` is the pre-ReLU output).
Gatys' own PyTorch re-implementation uses the rectified responses too.

Running from white noise takes many steps: 500 here (the paper ran L-BFGS to convergence), at
512 px on an accelerator: ``nstjax --config=configs/gatys2015.py --workdir=runs/gatys``. For a quick
look on a CPU: ``--config.size=256 --config.steps=200``.
"""

from nstjax.config import base_config


def get_config():
    c = base_config()
    c.content = "../shared/images/tubingen.jpg"
    c.style = "../shared/images/starry_night.jpg"
    c.size = 512
    c.network = "vgg19_normalized"
    c.content_layers = ("relu4_2",)
    c.style_layers = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
    c.style_layer_weights = (0.2, 0.2, 0.2, 0.2, 0.2)
    c.content_norm = "paper"
    c.gram_norm = "paper"
    c.content_weight = 1.0  # alpha
    c.style_weight = 1e3  # beta: alpha/beta = 1e-3
    c.tv_weight = 0.0
    c.pooling = "avg"
    c.init = "noise"
    c.steps = 500
    c.optimizer.name = "lbfgs"
    return c
