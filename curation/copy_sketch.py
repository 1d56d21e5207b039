"""Local hashes of a picture that survive the copies a global perceptual hash loses: crops and
overlays. Two pictures sharing one of them become a copies-level candidate pair
(`curation.copy_candidates.local_pairs`); the pixel check still decides.

- keypoint hashes: the KEYPOINTS strongest blob-like points of the grey thumbnail (difference of
  Gaussians, local maxima), each with the DCT hash of the patch around it. A crop at the same
  pixel scale moves every point by the same offset, so the points it keeps carry the same hash;
- cell hashes: the DCT hash of each cell of a CELL_GRID x CELL_GRID grid, salted by the cell's
  place. An overlay covers a few cells and leaves the others' hashes as they were. Nearly flat
  cells (grey deviation under CELL_MIN_STD) hash noise and are left out. At 20k generated
  samples a shared cell hash found 78% of the planted overlays (the banded phash 49%, the
  embedding neighbours 75%; all sources together 97%).

Both are computed on the copy check's thumbnail (`curation.copies.thumbnail`), so a crop is
found at the scale the pixel check aligns it: a crop of a picture larger than the thumbnail
lands at another scale and is left to the other candidate sources.
"""

from __future__ import annotations

import numpy as np
from scipy.fft import dctn
from scipy.ndimage import gaussian_filter, maximum_filter

#: keypoints hashed per picture: at 20k generated samples one shared keypoint hash found 92% of
#: the planted crops (the banded phash 6%, the embedding neighbours 85%) with 16; with the cells
#: and the other sources 99% were candidates (`python -m bench.scale_copies`, key
#: `copies.by_rows.*.planted.among_candidates_by_transform`)
KEYPOINTS = 16
#: half the side of a keypoint's patch (pixels of the thumbnail)
PATCH_RADIUS = 8
#: the difference of Gaussians that finds keypoints (blobs of about this size, in pixels)
DOG_SIGMAS = (1.0, 2.5)
#: a keypoint's response must reach this (grey levels): flat regions have no keypoints
MIN_RESPONSE = 1.0
#: cells per side of the grid of cell hashes
CELL_GRID = 4
#: a cell's grey standard deviation below which its hash is noise and is not kept
CELL_MIN_STD = 8.0
#: the DCT block a hash keeps (its sign against the median: 64 bits, as `pipelines.phash`)
_HASH_SIDE = 8
_GREY = np.array([0.299, 0.587, 0.114], np.float32)
#: a different salt per cell place, so that equal content in different cells is no match
_SALT = np.uint64(0x9E3779B97F4A7C15)


def _hashes(blocks: np.ndarray) -> np.ndarray:
    """64-bit DCT hashes (as int64) of a stack of square grey blocks (m, s, s), s >= 8."""
    if not len(blocks):
        return np.zeros(0, np.int64)
    low = dctn(blocks, axes=(1, 2), norm="ortho")[:, :_HASH_SIDE, :_HASH_SIDE].reshape(
        len(blocks), -1
    )
    bits = low > np.median(low, axis=1, keepdims=True)
    return np.packbits(bits, axis=1).view(">u8").ravel().astype(np.uint64).view(np.int64)


def keypoint_hashes(grey: np.ndarray) -> np.ndarray:
    """The patch hashes of the KEYPOINTS strongest keypoints of a grey picture (fewer when it has
    fewer: none on a flat one)."""
    r = PATCH_RADIUS
    h, w = grey.shape
    if h <= 2 * r or w <= 2 * r:
        return np.zeros(0, np.int64)
    response = np.abs(gaussian_filter(grey, DOG_SIGMAS[0]) - gaussian_filter(grey, DOG_SIGMAS[1]))
    peak = (response == maximum_filter(response, size=5)) & (response > MIN_RESPONSE)
    peak[:r] = peak[h - r :] = False
    peak[:, :r] = peak[:, w - r :] = False
    ys, xs = np.nonzero(peak)
    order = np.argsort(-response[ys, xs], kind="stable")[:KEYPOINTS]
    if not len(order):
        return np.zeros(0, np.int64)
    smooth = gaussian_filter(grey, 0.7)  # JPEG noise must not flip a patch's bits
    patches = np.stack([smooth[y - r : y + r, x - r : x + r] for y, x in zip(ys[order], xs[order])])
    return _hashes(patches)


def cell_hashes(grey: np.ndarray) -> np.ndarray:
    """The salted hashes of the grid's textured cells (none when cells are under 8 pixels)."""
    h, w = grey.shape
    side = min(h, w) // CELL_GRID
    if side < _HASH_SIDE:
        return np.zeros(0, np.int64)
    cells, places = [], []
    for a in range(CELL_GRID):
        for b in range(CELL_GRID):
            y, x = a * h // CELL_GRID, b * w // CELL_GRID
            cell = grey[y : y + side, x : x + side]
            if cell.std() >= CELL_MIN_STD:
                cells.append(cell)
                places.append(a * CELL_GRID + b + 1)
    if not cells:
        return np.zeros(0, np.int64)
    salt = (np.array(places, np.uint64) * _SALT).view(np.int64)
    return _hashes(np.stack(cells)) ^ salt


def local_hashes(thumb: np.ndarray) -> np.ndarray:
    """Distinct keypoint and cell hashes (int64) of an RGB uint8 thumbnail."""
    grey = thumb.astype(np.float32) @ _GREY
    return np.unique(np.concatenate([keypoint_hashes(grey), cell_hashes(grey)]))
