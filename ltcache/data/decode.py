"""One decoder from any PIL image mode to 8-bit RGB, shared by stage 1, extraction and ``predict``.

``Image.convert("RGB")`` clips wide modes instead of scaling them: a 16-bit grayscale PNG (mode
``I;16``, or ``I`` from older readers) becomes an all-white picture. Here every mode gives the same
RGB as its 8-bit equivalent:

* 16-bit gray (``I;16`` / ``I;16L`` / ``I;16B`` / ``I;16N``) and 32-bit integer ``I``: values on the
  0..65535 scale, taken to 8 bits by ``>> 8`` (so ``v * 257`` gives back ``v``);
* float ``F``: values on the 0..255 scale (what ``convert("F")`` of an 8-bit image gives), rounded;
* modes with an alpha channel (``RGBA``, ``LA``, ``PA``, ``RGBa``, ``La``) and palette or gray images
  with a transparent colour: the colour channels, alpha dropped (as for ``RGBA -> RGB``);
* everything else (``L``, ``1``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``): PIL's conversion.

16-bit RGB files are reduced to 8 bits by PIL's readers when they are opened.
"""
from __future__ import annotations

import numpy as np

WIDE_INT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(im):
    """``im`` (a PIL image of any mode) as a new 8-bit RGB PIL image; loads the pixels."""
    from PIL import Image

    mode = im.mode
    if mode in WIDE_INT:
        a = np.asarray(im).astype(np.int64)
        gray = (np.clip(a, 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if mode == "F":
        a = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "La":
        im = im.convert("LA")
        mode = "LA"
    if mode in ("LA", "PA", "RGBa") or (mode in ("P", "L", "RGB") and "transparency" in im.info):
        return im.convert("RGBA").convert("RGB")
    return im.convert("RGB")
