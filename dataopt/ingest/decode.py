"""Validate and decode images with Pillow: header probe, decode, conversion to RGB, resize.

Two passes over the images, both in a thread pool (Pillow releases the GIL while decoding):
:func:`probe_all` reads only headers (size, mode) so that decompression bombs are rejected before any
pixel is decoded and the target size can be chosen; :func:`decode_all` decodes, converts to 8-bit RGB,
resizes to the target and writes straight into one preallocated ``uint8`` array.
Each failure is returned as a ``(reason, detail)`` pair with a reason from
:data:`dataopt.schema.QUARANTINE_REASONS`; nothing raises out of a worker.
"""
from __future__ import annotations

import hashlib
import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

# magic numbers of common image formats: an unreadable file that starts like one is corrupt, not "not an image"
_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"II*\x00", b"MM\x00*", b"RIFF", b"\x00\x00\x01\x00")
_IMAGE_EXTS = {ext.lower() for ext in Image.registered_extensions()}
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")
_ORIENTATION = 0x0112  # EXIF tag
_ORIENTATIONS = range(2, 9)  # the EXIF orientations that move pixels (1 = as stored)
CHUNK = 256


def _open(file: Optional[str], data: Optional[bytes]) -> Image.Image:
    return Image.open(file) if file is not None else Image.open(io.BytesIO(data))


def _head(file: Optional[str], data: Optional[bytes]) -> bytes:
    if data is not None:
        return bytes(data[:16])
    with open(file, "rb") as f:
        return f.read(16)


def _unreadable(file: Optional[str], data: Optional[bytes]) -> tuple[str, str]:
    """Reason for content Pillow cannot identify: corrupt if it claims to be an image, else not one."""
    ext = Path(file).suffix.lower() if file is not None else ""
    if ext in _IMAGE_EXTS or _head(file, data).startswith(_MAGIC):
        what = f"has an image extension ({ext})" if ext in _IMAGE_EXTS else "starts like an image"
        return "corrupt_image", f"{what} but Pillow cannot identify its content"
    return "not_an_image", "not an image file (Pillow cannot identify its content)"


def _load_error(exc: Exception) -> tuple[str, str]:
    msg = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, EOFError) or "truncat" in str(exc).lower():
        return "truncated_image", f"truncated image data ({msg})"
    return "corrupt_image", f"cannot decode the image data ({msg})"


def probe(file: Optional[str], data: Optional[bytes], max_pixels: int) -> tuple:
    """Read one image header.

    Returns
    -------
    tuple
        ``(reason, detail, height, width, mode)``; ``reason`` is None when the header is usable.
    """
    try:
        if file is not None:
            if os.path.getsize(file) == 0:
                return "empty_file", "file is empty (0 bytes)", -1, -1, ""
        elif data is None or len(data) == 0:
            return "empty_file", "image bytes are empty", -1, -1, ""
        try:
            with _open(file, data) as im:
                w, h = im.size
                mode = im.mode
        except UnidentifiedImageError:
            return (*_unreadable(file, data), -1, -1, "")
        except Image.DecompressionBombError as exc:
            return "decompression_bomb", f"decompression bomb refused by Pillow ({exc})", -1, -1, ""
    except FileNotFoundError:
        return "missing_file", "file not found", -1, -1, ""
    except Exception as exc:  # a broken header: Pillow raises many types (SyntaxError, ValueError, ...)
        return (*_load_error(exc), -1, -1, "")
    if w * h > max_pixels:
        return "decompression_bomb", f"{w}x{h} = {w * h} pixels exceeds ingest.max_pixels={max_pixels}", h, w, mode
    return None, "", h, w, mode


def to_rgb(im: Image.Image) -> tuple[np.ndarray, str]:
    """Convert a loaded image of any mode to ``uint8`` RGB.

    Returns
    -------
    rgb : ndarray, shape (H, W, 3), uint8
    note : str
        What was done ("" for RGB input).
    """
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im, dtype=np.uint8), ""
    if mode in _SIXTEEN_BIT:
        # Pillow's own convert("L") clips 16-bit values at 255; scale the full 0..65535 range instead
        a = np.clip(np.asarray(im).astype(np.int64), 0, 65535)
        a8 = ((a * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(a8[..., None], 3, axis=2), f"converted from {mode} (16-bit scaled to 8-bit)"
    if mode == "F":
        a8 = np.clip(np.rint(np.asarray(im)), 0, 255).astype(np.uint8)
        return np.repeat(a8[..., None], 3, axis=2), "converted from F (float clipped to 0..255)"
    if mode in _ALPHA or (mode == "P" and "transparency" in im.info):
        rgba = np.asarray(im.convert("RGBA"), dtype=np.float32)
        alpha = rgba[..., 3:4] / 255.0
        # composite on white so transparent regions do not turn into arbitrary (often black) pixels
        rgb = rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)
        return np.rint(rgb).astype(np.uint8), f"converted from {mode} (alpha composited on white)"
    return np.asarray(im.convert("RGB"), dtype=np.uint8), f"converted from {mode}"


MAX_COVER_PIXELS = 1 << 22  # above this, fit_size crops before resizing


def fit_size(rgb: np.ndarray, target: tuple[int, int]) -> tuple[np.ndarray, str]:
    """Resize ``rgb`` (H, W, 3) to ``target`` (h, w) with Pillow's antialiased Lanczos filter.

    A different aspect ratio is resized to cover the target, then centre-cropped (no distortion).
    """
    h, w = rgb.shape[:2]
    th, tw = target
    if (h, w) == (th, tw):
        return rgb, ""
    scale = max(th / h, tw / w)
    nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
    crop = (nh, nw) != (th, tw)
    note = f"resized from {w}x{h} to {tw}x{th}" + (" (centre crop)" if crop else "")
    if nh * nw > max(4 * h * w, MAX_COVER_PIXELS):
        # an extreme aspect ratio (a 1 x 50M-pixel header, say) would make the cover image huge: crop
        # the centre box in the source first, then resize only that (same framing, bounded memory)
        bh, bw = th / scale, tw / scale
        box = ((w - bw) / 2, (h - bh) / 2, (w + bw) / 2, (h + bh) / 2)
        out = Image.fromarray(rgb).resize((tw, th), Image.Resampling.LANCZOS, box=box)
        return np.asarray(out, dtype=np.uint8), note
    out = np.asarray(Image.fromarray(rgb).resize((nw, nh), Image.Resampling.LANCZOS), dtype=np.uint8)
    top, left = (nh - th) // 2, (nw - tw) // 2
    return out[top : top + th, left : left + tw], note


def decode(file: Optional[str], data: Optional[bytes], target: tuple[int, int]) -> tuple:
    """Decode one image to ``uint8`` RGB of size ``target``.

    Returns
    -------
    tuple
        ``(reason, detail, rgb, note, resized)``: ``rgb`` is (h, w, 3) uint8 or None on failure.
    """
    try:
        with _open(file, data) as im:
            frames = _n_frames(im)
            im.load()
            notes = [f"first of {frames} frames kept"] if frames > 1 else []
            # photos store their orientation in EXIF; apply it so the stored pixels are upright
            orientation = im.getexif().get(_ORIENTATION, 1)
            if orientation in _ORIENTATIONS:
                im = ImageOps.exif_transpose(im)
                notes.append(f"EXIF orientation {orientation} applied")
            elif orientation not in (None, 1):
                notes.append(f"EXIF orientation {orientation!r} ignored (invalid; valid values are 1..8)")
            rgb, converted = to_rgb(im)
            if min(rgb.shape[:2]) == 0:
                return "corrupt_image", "the image has no pixels (0 width or height)", None, "", False
            rgb, resized = fit_size(rgb, target)
    except FileNotFoundError:
        return "missing_file", "file disappeared while decoding", None, "", False
    except UnidentifiedImageError:
        return (*_unreadable(file, data), None, "", False)
    except Exception as exc:  # truncated (OSError/EOFError) or corrupt (OSError, SyntaxError, ValueError, ...)
        return (*_load_error(exc), None, "", False)
    return None, "", rgb, "; ".join(n for n in (*notes, converted, resized) if n), bool(resized)


def _n_frames(im: Image.Image) -> int:
    """How many frames (GIF, APNG, multi-page TIFF, ...) the image has; the first one is decoded."""
    n = getattr(im, "n_frames", 1)  # may seek through the file: a broken later frame raises (quarantined)
    im.seek(0)
    return int(n)


def _pool(n_items: int, workers: Optional[int]):
    workers = workers or min(8, os.cpu_count() or 1)
    return ThreadPoolExecutor(max_workers=max(1, min(workers, n_items)))


def probe_all(
    files: Sequence[Optional[str]],
    data: Sequence[Optional[bytes]],
    idx: np.ndarray,
    max_pixels: int,
    workers: Optional[int] = None,
) -> tuple[list, list, np.ndarray, np.ndarray, list]:
    """Probe the headers of rows ``idx``.

    Returns
    -------
    reasons, details : list of length len(idx)
    heights, widths : ndarray, shape (len(idx),), int64 (-1 where unreadable)
    modes : list of str
    """
    n = len(idx)
    reasons, details, modes = [None] * n, [""] * n, [""] * n
    hw = np.full((n, 2), -1, dtype=np.int64)

    def work(lo: int) -> int:
        for k in range(lo, min(lo + CHUNK, n)):
            i = idx[k]
            r, d, h, w, m = probe(files[i], data[i], max_pixels)
            reasons[k], details[k], hw[k], modes[k] = r, d, (h, w), m
        return min(lo + CHUNK, n) - lo

    if n:
        with _pool(n, workers) as pool, tqdm(total=n, desc="ingest: probe", unit="img", mininterval=1.0) as bar:
            for done in pool.map(work, range(0, n, CHUNK)):
                bar.update(done)
    return reasons, details, hw[:, 0], hw[:, 1], modes


def decode_all(
    files: Sequence[Optional[str]],
    data: Sequence[Optional[bytes]],
    idx: np.ndarray,
    target: tuple[int, int],
    workers: Optional[int] = None,
) -> tuple[np.ndarray, list, list, list, np.ndarray, list]:
    """Decode rows ``idx`` into one array.

    Returns
    -------
    images : ndarray, shape (len(idx), h, w, 3), uint8
        Zero where decoding failed.
    reasons, details, notes : list of length len(idx)
    resized : ndarray, shape (len(idx),), bool
    hashes : list of str
        sha1 of each stored image's pixels ("" where decoding failed).
    """
    n = len(idx)
    images = np.zeros((n, *target, 3), dtype=np.uint8)
    reasons, details, notes, hashes = [None] * n, [""] * n, [""] * n, [""] * n
    resized = np.zeros(n, dtype=bool)

    def work(lo: int) -> int:
        for k in range(lo, min(lo + CHUNK, n)):
            i = idx[k]
            r, d, rgb, note, rs = decode(files[i], data[i], target)
            reasons[k], details[k], notes[k], resized[k] = r, d, note, rs
            if rgb is not None:
                images[k] = rgb
                hashes[k] = hashlib.sha1(images[k].tobytes()).hexdigest()
        return min(lo + CHUNK, n) - lo

    if n:
        with _pool(n, workers) as pool, tqdm(total=n, desc="ingest: decode", unit="img", mininterval=1.0) as bar:
            for done in pool.map(work, range(0, n, CHUNK)):
                bar.update(done)
    return images, reasons, details, notes, resized, hashes
