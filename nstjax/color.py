"""Colour preservation (Gatys, Bethge, Hertzmann & Shechtman 2016, "Preserving Color in Neural
Artistic Style Transfer"): pure functions on (H, W, 3) RGB arrays in [0, 255].

Two methods, as in the paper:

- **Luminance-only transfer** (section 3): the style transfer runs on luminance alone. The content
  and style images are converted to YIQ (or YUV); the style's luminance is matched to the
  content's mean and standard deviation; the transfer runs on the luminance images (replicated to
  three channels for VGG); the output's luminance is recombined with the content's chroma (I, Q).
- **Colour histogram matching** (section 2): before the transfer, each style image's colours are
  transformed linearly, x' = A x + b, so that their mean and covariance equal the content's. The
  paper uses the symmetric square-root solution of the image-analogies colour transfer,
  A = S_c^{1/2} S_s^{-1/2} (``method="sqrt"``); the Cholesky one, A = L_c L_s^{-1}, is
  ``method="cholesky"``.

Everything here runs once per run in float64 numpy, outside the compiled loop.
"""

from __future__ import annotations

import numpy as np

from nstjax.errors import ConfigError

PRESERVE_COLOR = ("none", "luminance", "histogram")
SPACES = ("yiq", "yuv")

# RGB -> YIQ (NTSC 1953, as in the paper) and RGB -> YUV (BT.601); rows give Y, then chroma.
_RGB_TO = {
    "yiq": np.array([[0.299, 0.587, 0.114],
                     [0.595716, -0.274453, -0.321263],
                     [0.211456, -0.522591, 0.311135]]),
    "yuv": np.array([[0.299, 0.587, 0.114],
                     [-0.14713, -0.28886, 0.436],
                     [0.615, -0.51499, -0.10001]]),
}
_TO_RGB = {k: np.linalg.inv(v) for k, v in _RGB_TO.items()}


def _space(space: str) -> str:
    if space not in SPACES:
        raise ConfigError(f"color_space must be one of {', '.join(SPACES)}, not {space!r}")
    return space


def rgb_to(image, space: str = "yiq") -> np.ndarray:
    """(H, W, 3) RGB -> (H, W, 3) Y, chroma1, chroma2 in the same units (Y in [0, 255])."""
    return np.asarray(image, np.float64) @ _RGB_TO[_space(space)].T


def to_rgb(image, space: str = "yiq") -> np.ndarray:
    """Inverse of :func:`rgb_to` (not clipped)."""
    return np.asarray(image, np.float64) @ _TO_RGB[_space(space)].T


def luminance(image, space: str = "yiq") -> np.ndarray:
    """(H, W) luminance Y of an RGB image (the same in YIQ and YUV)."""
    return rgb_to(image, space)[..., 0]


def chroma(image, space: str = "yiq") -> np.ndarray:
    """(H, W, 2) chroma (I, Q or U, V) of an RGB image."""
    return rgb_to(image, space)[..., 1:]


def gray3(y) -> np.ndarray:
    """A luminance image (H, W) as three equal channels, float32 in [0, 255]."""
    y = np.clip(np.asarray(y, np.float64), 0.0, 255.0)
    return np.repeat(y[..., None], 3, axis=-1).astype(np.float32)


def match_luminance(style_y, content_y) -> np.ndarray:
    """The style's luminance shifted and scaled to the content's mean and standard deviation."""
    s, c = np.asarray(style_y, np.float64), np.asarray(content_y, np.float64)
    return (s - s.mean()) * (c.std() / max(s.std(), 1e-6)) + c.mean()


def luminance_inputs(content, styles, space: str = "yiq") -> tuple[np.ndarray, list[np.ndarray]]:
    """The luminance-only transfer's inputs: the content's luminance and each style's luminance
    matched to it, each replicated to three channels (float32, [0, 255])."""
    cy = luminance(content, space)
    return gray3(cy), [gray3(match_luminance(luminance(s, space), cy)) for s in styles]


def recombine(output, content, space: str = "yiq") -> np.ndarray:
    """The output's luminance with the content's chroma, as RGB float32 clipped to [0, 255]."""
    out = rgb_to(content, space)
    out[..., 0] = luminance(output, space)
    return np.clip(to_rgb(out, space), 0.0, 255.0).astype(np.float32)


def mean_cov(image) -> tuple[np.ndarray, np.ndarray]:
    """Mean (3,) and covariance (3, 3) of an image's pixel colours."""
    x = np.asarray(image, np.float64).reshape(-1, 3)
    mu = x.mean(axis=0)
    d = x - mu
    return mu, d.T @ d / len(x)


def _sqrtm(a: np.ndarray, inverse: bool = False) -> np.ndarray:
    lam, v = np.linalg.eigh(0.5 * (a + a.T))
    lam = np.maximum(lam, 1e-6 * max(lam.max(), 1e-12))  # a flat-coloured image is singular
    return (v * (lam ** (-0.5 if inverse else 0.5))) @ v.T


def match_color(style, content, method: str = "sqrt") -> np.ndarray:
    """The style image with its colours transformed so that their mean and covariance equal the
    content's (x' = A x + b), clipped to [0, 255]; float32."""
    mu_s, cov_s = mean_cov(style)
    mu_c, cov_c = mean_cov(content)
    if method == "sqrt":
        a = _sqrtm(cov_c) @ _sqrtm(cov_s, inverse=True)
    elif method == "cholesky":
        eps = 1e-6 * max(np.trace(cov_s) / 3, 1e-12)
        lc = np.linalg.cholesky(cov_c + eps * np.eye(3))
        ls = np.linalg.cholesky(cov_s + eps * np.eye(3))
        a = lc @ np.linalg.inv(ls)
    else:
        raise ConfigError(f"method must be 'sqrt' or 'cholesky', not {method!r}")
    x = np.asarray(style, np.float64)
    out = (x - mu_s) @ a.T + mu_c
    return np.clip(out, 0.0, 255.0).astype(np.float32)


def prepare(mode: str, content, styles, space: str = "yiq") -> tuple[np.ndarray, list[np.ndarray]]:
    """The content and style images the transfer runs on, for ``preserve_color`` = ``mode``."""
    if mode == "none":
        return np.asarray(content, np.float32), [np.asarray(s, np.float32) for s in styles]
    if mode == "luminance":
        return luminance_inputs(content, styles, space)
    if mode == "histogram":
        return np.asarray(content, np.float32), [match_color(s, content) for s in styles]
    raise ConfigError(f"preserve_color must be one of {', '.join(PRESERVE_COLOR)}, not {mode!r}")


def finish(mode: str, output, content, space: str = "yiq") -> np.ndarray:
    """The final image from the transfer's output: recombined with the content's chroma for
    ``"luminance"``, unchanged otherwise."""
    if mode == "luminance":
        return recombine(output, content, space)
    return np.asarray(output, np.float32)
