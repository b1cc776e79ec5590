"""Which style layers? Gatys et al. (2015) Fig. 3 as a sweep: style matched on relu1_1, then on
relu1_1 + relu2_1, ... up to all five of relu1_1..relu5_1, at three style weights.

Rows of grid.png are the layer subsets, columns the style weights; every subset runs through the
same compiled program (a layer that is off has weight zero), so the 15 points compile once.

    nstjax --config=configs/ablation_style_layers.py --workdir=runs/ablation_layers --dry_run
    nstjax --config=configs/ablation_style_layers.py --workdir=runs/ablation_layers

At 256 px and 150 steps that is a few minutes on an accelerator and about 20 on a laptop CPU. For a
quick look on a CPU, the ``quick`` variant runs 4 subsets x 2 style weights at 128 px, 50 steps:

    nstjax --config=configs/ablation_style_layers.py:quick --workdir=runs/ablation_quick

Everything else is the default run (``configs/default.py``): content relu4_2, Grams normalised per
position and channel, started from the content photo, L-BFGS.
"""

from nstjax.config import STYLE_LAYERS_5, base_config

# ("relu1_1",), ("relu1_1", "relu2_1"), ..., the five cumulative subsets of the paper's Fig. 3.
CUMULATIVE = tuple(STYLE_LAYERS_5[: i + 1] for i in range(len(STYLE_LAYERS_5)))


def get_config(variant: str = ""):
    c = base_config()
    c.content = "../shared/images/tubingen.jpg"
    c.style = "../shared/images/starry_night.jpg"
    c.sweep.axes = (
        ("style_layers", CUMULATIVE),
        ("style_weight", (1e2, 5e2, 2.5e3)),
    )
    c.sweep.grid = ("style_layers", "style_weight")
    if variant == "quick":
        c.size = 128
        c.steps = 50
        c.sweep.axes = (
            ("style_layers", CUMULATIVE[1:]),  # relu1_1..relu2_1 up to relu1_1..relu5_1
            ("style_weight", (1e2, 1e3)),
        )
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of ablation_style_layers.py (try 'quick')")
    return c
