"""The copy rule: is picture B the same picture as A, re-encoded, resized, cropped, colour-shifted
or overlaid? One rule for `curation.dedup --level copies` and for anything else that needs a
copy verdict (the memorisation audit of generated images).

Embedding neighbours and perceptual hashes only propose candidates: neither alone separates a
copy from a distinct picture of the same kind (a tiny CLIP moves a lot under an overlay, a
perceptual hash under a crop; `python -m bench.insight`, keys `copies.*`). The verdict is a
pixel check on small thumbnails:

1. align: the two frames resized to a common size, and, when one side is a plausible crop of
   the other (each side at least MIN_CROP of the other's), the smaller slid over the larger at
   native scale to the best offset;
2. fit a colour change of the family brightness x contrast x saturation (grey level affine,
   chroma scaled), excluding pixels it cannot explain (an overlay) from the fit;
3. copy when most pixels agree (MIN_INLIERS) and the image structure (gradient energy above
   EDGE_FLOOR) agrees where the pictures were not overlaid (MIN_STRUCTURE), in at least one
   of the raw or lightly smoothed versions (JPEG re-encoding and overlay filters blur edges).
   A changed region counts as overlaid only where it could be a blend toward a grey level
   (text or a logo at some opacity): its colour is the other picture's, faded, never another
   hue. A coloured object moved or added is a change the structure must still agree on.
   Only one picture may be the overlaid one, and the changes no overlay explains must hold no
   solid patch (a recoloured object);
4. no copy where some object-sized window of one picture is the other's content, mapped by the
   colour fit, shifted by a few pixels, seen both ways (MOVE_*): a shape moved a little, which
   the smoothed look would otherwise pass; nor where one picture's ground is shaded across
   the frame and the other's flat (RAMP_*), which a colour change cannot do and the
   overlay rule would otherwise explain as a faded patch.

Distinct renders of one description differ along their edges (a shape a pixel away), so step
3 rejects them even on identical flat backgrounds. The thresholds were chosen on generated
pairs (seed 1, every transform of `pipelines.near_duplicates`) and are measured on other data
by `python -m bench.insight` (`copies.sieve`).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image, ImageFilter
from scipy.ndimage import uniform_filter

#: thumbnails' longer side: the check costs the same whatever the source resolution
CHECK_SIDE = 64
#: a pixel agrees when the colour model explains it within this many levels (max over RGB)
INLIER_LEVEL = 20.0
#: residual above which a pixel counts as changed (an overlay) and leaves the colour fit
OUTLIER_LEVEL = 40.0
#: gradient magnitude (RGB norm of central differences) that counts as structure
EDGE_FLOOR = 24.0
#: chroma (RGB distance from grey) an overlay may add to a pixel, beyond fading the colour it
#: covers toward grey: JPEG's halved chroma resolution bleeds colour across text strokes. At 20k
#: generated samples every planted overlay stayed within it and 60% of the distinct pictures
#: the check had called copies did not (`python -m bench.scale_copies`)
OVERLAY_CHROMA = 30.0
#: an overlay is strokes (text, a logo's ring and initials): a region it explains that is
#: still there after this many steps of erosion is a solid object added or taken away (an
#: achromatic one passes the fading rule: black is any colour faded to a dark grey). At 100k
#: generated samples it turns away 73 more of the 1,224 distinct pairs the check had called
#: copies (objects more or fewer, a shape recoloured toward white) and 6 of 5,060 planted
#: pairs; 3 steps turned away 20 more distinct pairs and 13 more planted ones
OVERLAY_STROKE = 4
#: where either picture has structure (and was not overlaid), the 90% quantile of the colour
#: model's residual must stay under this: distinct renders of a small object on one ground
#: agree on most pixels and most edges but differ on the object itself. Planted copies of 20k
#: generated samples stayed under 33 but one; 19% of the distinct pairs still called copies
#: after the overlay rule went over it
EDGE_RESIDUAL = 40.0
#: fraction of pixels that must agree
MIN_INLIERS = 0.7
#: fraction of the structure's gradient energy that must agree outside changed regions
MIN_STRUCTURE = 0.8
#: an aligned view whose grey levels correlate less than this is not checked further: a cheap
#: gate before the colour fit (most candidate pairs are distinct pictures). Every planted copy
#: of 6,000 generated samples (seed 0) correlated at least 0.29 (an overlay on a flat picture is
#: the lowest); 5% of random pairs reach 0.3
MIN_GREY_CORRELATION = 0.2
#: a crop keeps at least this fraction of each side
MIN_CROP = 0.75
#: a crop's colour statistics must come from this many pixels at least
_MIN_FIT_PIXELS = 50
#: how far below MIN_INLIERS a view may be and still be worth a smoothed second look
_NEAR = 0.2
#: a shape moved a little: an object-sized window (MOVE_WINDOW px) of one picture whose squared
#: RGB difference from the other, after the colour fit maps one onto the other, averages over
#: MOVE_FLOOR, while a shift of the other by up to MOVE_SHIFT px leaves under MOVE_RATIO of it.
#: The smoothed second look (JPEG and overlay filters blur edges) lets most moved shapes through;
#: comparing after the colour fit lets the test see a one-pixel move of a low-contrast shape
#: (a raw floor high enough for colour-shifted copies missed those) and spares colour-shifted
#: copies. On the hard pairs of 20k generated samples it took precision from 0.961 to 0.985 at
#: recall 0.979 (was 0.982; bench/results/copy_verdict_pairs.json)
MOVE_SHIFT = 3
MOVE_WINDOW = 9
MOVE_FLOOR = 200.0
MOVE_RATIO = 0.2
#: a ground shaded in one picture and flat in the other: each picture's colours fitted by a
#: plane (robustly, over the pixels the colour fit explains), the larger change across the
#: frame at least RAMP_MIN levels and the smaller at most RAMP_RATIO of it. A brightness,
#: contrast or saturation change scales a ramp (0.5-2x); it never flattens one or makes one.
#: At 100k generated samples, 572 of the 1,224 distinct pairs the check had called copies
#: were a gradient ground against a flat one; 11 of 5,060 planted pairs meet the rule
RAMP_MIN = 16.0
RAMP_RATIO = 0.2
#: a pixel leaves the ramp's plane fit beyond this many levels from it (the objects on the
#: ground: their colour is far from the ground's by construction of any picture worth keeping)
_RAMP_OUTLIER = 30.0
_GREY = np.array([0.299, 0.587, 0.114], np.float32)


def thumbnail(image: Any) -> np.ndarray:
    """RGB uint8 array of `image` (PIL image or HxWx3 array) with its longer side <= CHECK_SIDE."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"copy check: expected an HxWx3 RGB array, got shape {image.shape}")
        if max(image.shape[:2]) <= CHECK_SIDE and image.dtype == np.uint8:
            return image
        image = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), "RGB")
    image = image.convert("RGB")
    w, h = image.size
    scale = CHECK_SIDE / max(w, h)
    if scale < 1:
        image = image.resize(
            (max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS
        )
    return np.asarray(image, dtype=np.uint8)


def _resize(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if a.shape[:2] == shape:
        return a
    img = Image.fromarray(a, "RGB").resize((shape[1], shape[0]), Image.Resampling.LANCZOS)
    return np.asarray(img, dtype=np.uint8)


def _best_window(big: np.ndarray, small: np.ndarray) -> np.ndarray:
    """The window of `big` (small's shape) whose grey pattern best
    matches `small` (means removed)."""
    gb, gs = big.astype(np.float32) @ _GREY, small.astype(np.float32) @ _GREY
    h, w = gs.shape
    n = h * w
    sc = gs - gs.mean()
    windows = sliding_window_view(gb, gs.shape)
    cross = np.tensordot(windows, sc, axes=([2, 3], [0, 1]))  # sum(window * sc): sc has zero mean
    # integral images of the values and squares
    ii = np.pad(gb, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    ii2 = np.pad(gb * gb, ((1, 0), (1, 0))).cumsum(0).cumsum(1)

    def box(t: np.ndarray) -> np.ndarray:
        return t[h:, w:] - t[:-h, w:] - t[h:, :-w] + t[:-h, :-w]

    sums = box(ii)
    ssd = box(ii2) - sums * sums / n - 2 * cross  # + sum(sc^2), the same for every window
    oy, ox = np.unravel_index(int(np.argmin(ssd)), ssd.shape)
    return big[oy : oy + h, ox : ox + w]


def _views(a: np.ndarray, b: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Aligned (a-part, b-part) pairs of equal shape: the whole frames,
    and b as a crop of a or a of b."""
    shape = (min(a.shape[0], b.shape[0]), min(a.shape[1], b.shape[1]))
    out = [(_resize(a, shape), _resize(b, shape))]
    for big, small, flip in ((a, b, False), (b, a, True)):
        fits = (
            small.shape[0] <= big.shape[0]
            and small.shape[1] <= big.shape[1]
            and small.shape != big.shape
        )
        if (
            fits
            and small.shape[0] >= MIN_CROP * big.shape[0]
            and small.shape[1] >= MIN_CROP * big.shape[1]
        ):
            window = _best_window(big, small)
            out.append((small, window) if flip else (window, small))
    return out


def _grey_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two aligned uint8 views' grey levels (1 when both are flat: the
    colour fit decides those)."""
    ga, gb = a.astype(np.float32) @ _GREY, b.astype(np.float32) @ _GREY
    ga -= ga.mean()
    gb -= gb.mean()
    va, vb = float((ga * ga).sum()), float((gb * gb).sum())
    if va < 1e-3 * ga.size or vb < 1e-3 * gb.size:
        return 1.0
    return float((ga * gb).sum()) / float(np.sqrt(va * vb))


def _planes(x: np.ndarray) -> np.ndarray:
    """HxWx3 -> contiguous float32 (3, H, W): numpy reduces over a length-3 last axis slowly."""
    return np.ascontiguousarray(np.moveaxis(x, -1, 0), dtype=np.float32)


def _grey(p: np.ndarray) -> np.ndarray:
    return _GREY[0] * p[0] + _GREY[1] * p[1] + _GREY[2] * p[2]


def _colour_fit(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    """Per-pixel residual (max over RGB) of v against the best
    brightness/contrast/saturation change of u, that change's chroma scale, and u's grey
    levels after it (u mapped onto v is that grey plus the scaled chroma).

    u and v are (3, H, W) planes. The family is closed under composition: grey levels change
    affinely, chroma (colour minus grey) scales. Pixels over OUTLIER_LEVEL leave the fit (an
    overlay must not bend it).
    """
    gu, gv = _grey(u), _grey(v)
    cu, cv = u - gu, v - gv
    cuu = cu[0] * cu[0] + cu[1] * cu[1] + cu[2] * cu[2]
    cuv = cu[0] * cv[0] + cu[1] * cv[1] + cu[2] * cv[2]
    weight = np.ones(gu.shape, np.float32)
    residual = np.zeros(gu.shape, np.float32)
    chroma = 1.0
    base = gu
    for _ in range(3):
        n = float(weight.sum())
        mx, my = float((weight * gu).sum()) / n, float((weight * gv).sum()) / n
        dx = (gu - mx) * weight
        slope = float(
            np.clip((dx * (gv - my)).sum() / max(float((dx * (gu - mx)).sum()), 1e-6), 0.5, 2.0)
        )
        cc = float((weight * cuu).sum())
        chroma = float(np.clip((weight * cuv).sum() / cc, 0.3, 2.0)) if cc > 1e-3 else 1.0
        base = my + slope * (gu - mx)
        residual = np.abs(v[0] - base - chroma * cu[0])
        np.maximum(residual, np.abs(v[1] - base - chroma * cu[1]), out=residual)
        np.maximum(residual, np.abs(v[2] - base - chroma * cu[2]), out=residual)
        again = residual < OUTLIER_LEVEL
        if again.sum() < _MIN_FIT_PIXELS:
            break
        weight = again.astype(np.float32)
    return residual, chroma, base


def _chroma(x: np.ndarray) -> np.ndarray:
    """(3, H, W) colour minus grey, averaged over 3x3 (JPEG keeps chroma at half resolution)."""
    return uniform_filter(x - _grey(x), size=(1, 3, 3))


def _faded(source: np.ndarray, copy: np.ndarray) -> np.ndarray:
    """Where `copy`'s chroma could be `source`'s faded toward grey (same hue, no stronger),
    within OVERLAY_CHROMA: what an overlay of a grey level at any opacity leaves."""
    norm = np.sqrt((source * source).sum(0)) + 1e-6
    along = (copy * source).sum(0) / norm
    across = np.sqrt(np.maximum((copy * copy).sum(0) - along * along, 0.0))
    beyond = np.maximum(along - norm, 0.0) + np.maximum(-along, 0.0)
    return np.maximum(across, beyond) <= OVERLAY_CHROMA


def _gradient(x: np.ndarray) -> list[np.ndarray]:
    """Central differences of (3, H, W) planes: six (H, W) arrays."""
    out = []
    for plane in x:
        out += [_diff(plane, 1), _diff(plane, 0)]
    return out


def _diff(p: np.ndarray, axis: int) -> np.ndarray:
    """np.gradient of a 2-d array along one axis (central inside, one-sided at the edges),
    without its general-purpose overhead: the copy check calls it on many small arrays."""
    if p.shape[axis] < 2:
        return np.zeros_like(p)
    q = p if axis == 0 else p.T
    out = np.empty_like(q)
    out[1:-1] = (q[2:] - q[:-2]) * 0.5
    out[0] = q[1] - q[0]
    out[-1] = q[-1] - q[-2]
    return out if axis == 0 else out.T


def _norm(parts: list[np.ndarray]) -> np.ndarray:
    total = parts[0] * parts[0]
    for p in parts[1:]:
        total += p * p
    return np.sqrt(total)


def _dilate(mask: np.ndarray, steps: int = 2) -> np.ndarray:
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def _erode(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    """A mask shrunk by `steps` pixels (what is left is at least that thick)."""
    return ~_dilate(~mask, steps)


def _structure(u: np.ndarray, v: np.ndarray, residual: np.ndarray, chroma: float) -> float:
    """Fraction of structure (gradient energy) that agrees between two aligned views.

    One picture's structure must survive in the other; the other's may be hidden where the
    colour model failed (an overlay), so the two directions are taken both ways. 0 when the
    colours disagree along the structure outside overlays (EDGE_RESIDUAL).
    """
    gu, gv = _gradient(u), _gradient(v)
    err = _norm([b - a for a, b in zip(gu, gv)])
    mu, mv = _norm(gu), _norm(gv)
    mu *= mu >= EDGE_FLOOR
    mv *= mv >= EDGE_FLOOR
    changed = residual >= OUTLIER_LEVEL
    cu, cv = _chroma(u), _chroma(v)
    edges = _dilate((mu >= EDGE_FLOOR) | (mv >= EDGE_FLOOR), 1)

    def agree(m: np.ndarray, mask: np.ndarray | None = None) -> float:
        if mask is not None:
            m = m * ~mask
        total = float(m.sum())
        return float((m * (err < 0.5 * m + 8)).sum()) / total if total > 1e-6 else 0.0

    best = 0.0
    # one side overlaid at a time: with both at once an object's old place passed as u
    # overlaid and its new place as v overlaid
    for over, kept, covered in (
        (changed & _faded(chroma * cu, cv), mu, mv),  # v is u overlaid
        (changed & _faded(cv / chroma, cu), mv, mu),  # u is v overlaid
    ):
        if _erode(changed & ~over).any():  # a solid patch no overlay explains: a recolouring
            continue
        if _erode(over, OVERLAY_STROKE).any():  # a solid object added or removed, not strokes
            continue
        over = _dilate(over)
        e = edges & ~over
        if e.sum() >= 10 and float(np.quantile(residual[e], 0.9)) > EDGE_RESIDUAL:
            continue
        best = max(best, min(agree(kept), agree(covered, over)))
    return best


def _features(u: np.ndarray, v: np.ndarray) -> tuple[float, float]:
    """(fraction of agreeing pixels, structure agreement) of one aligned view ((3, H, W) planes);
    structure 0 when so few pixels agree that no smoothing could make a copy of it."""
    residual, chroma, _ = _colour_fit(u, v)
    inliers = float((residual < INLIER_LEVEL).mean())
    if inliers < MIN_INLIERS - _NEAR:
        return inliers, 0.0
    return inliers, _structure(u, v, residual, chroma)


def _smooth(x: np.ndarray) -> np.ndarray:
    """PIL's SMOOTH filter on (3, H, W) planes."""
    img = Image.fromarray(np.clip(np.moveaxis(x, 0, -1), 0, 255).astype(np.uint8), "RGB").filter(
        ImageFilter.SMOOTH
    )
    return _planes(np.asarray(img))


def copy_score(a: Any, b: Any) -> tuple[float, float]:
    """(inlier fraction, structure agreement) of the best alignment of two
    pictures (PIL or RGB arrays).

    A copy scores at least (MIN_INLIERS, MIN_STRUCTURE); `is_copy` applies the thresholds.
    """
    ta, tb = thumbnail(a), thumbnail(b)
    if ta.shape == tb.shape and np.array_equal(ta, tb):
        return 1.0, 1.0
    best = (0.0, 0.0)
    views = []
    for u8, v8 in _views(ta, tb):
        if _grey_correlation(u8, v8) < MIN_GREY_CORRELATION:
            continue
        u, v = _planes(u8), _planes(v8)
        score = _features(u, v)
        if _passes(score) and (_moved(u, v) or _shaded(u, v)):
            score = (score[0], 0.0)
        views.append((score, u, v))
        best = max(best, score, key=min)
    if best[0] >= MIN_INLIERS and best[1] >= MIN_STRUCTURE:
        return best
    # JPEG re-encoding and an overlay's smoothing filter blur edges: try lightly smoothed versions
    # of the best-aligned view, unless even its pixels disagree outright
    if not views:
        return best
    score, u, v = max(views, key=lambda t: t[0][0])
    if score[0] < MIN_INLIERS - _NEAR:
        return best
    smoothed = (0.0, 0.0)
    for uu, vv in ((_smooth(u), v), (u, _smooth(v)), (_smooth(u), _smooth(v))):
        smoothed = max(smoothed, _features(uu, vv), key=min)
    if _passes(smoothed) and (_moved(u, v) or _shaded(u, v)):
        smoothed = (smoothed[0], 0.0)
    return max(best, smoothed, key=min)


def _passes(score: tuple[float, float]) -> bool:
    """Whether (inliers, structure) would make a copy."""
    return score[0] >= MIN_INLIERS and score[1] >= MIN_STRUCTURE


def _moved(u: np.ndarray, v: np.ndarray) -> bool:
    """Whether content moved between u and v, seen both ways (`_shifted`): an overlay's edges
    can look shifted one way, a moved shape is moved both ways."""
    return _shifted(u, v) and _shifted(v, u)


def _ramp(x: np.ndarray, keep: np.ndarray) -> float:
    """The largest change across the frame of a plane fitted to each of x's colour planes
    ((3, H, W)) over the pixels `keep`, refitted without the pixels far from it."""
    h, w = x.shape[1:]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    design = np.stack([np.ones(h * w, np.float32), xx.ravel() / w, yy.ravel() / h], 1)
    values = x.reshape(3, -1).T
    keep = keep.ravel()
    change = 0.0
    for _ in range(3):
        if keep.sum() < _MIN_FIT_PIXELS:
            break
        coef = np.linalg.lstsq(design[keep], values[keep], rcond=None)[0]
        change = float(np.hypot(coef[1], coef[2]).max())
        keep = np.abs(values - design @ coef).max(1) < _RAMP_OUTLIER
    return change


def _shaded(u: np.ndarray, v: np.ndarray) -> bool:
    """Whether one picture's ground is shaded across the frame and the other's flat (RAMP_*),
    over the pixels the colour fit explains (an overlay does not tilt the planes)."""
    residual, _, _ = _colour_fit(u, v)
    keep = residual < OUTLIER_LEVEL
    ramps = sorted((_ramp(u, keep), _ramp(v, keep)))
    return ramps[1] >= RAMP_MIN and ramps[0] <= RAMP_RATIO * ramps[1]


def _shifted(u: np.ndarray, v: np.ndarray) -> bool:
    """Whether some object-sized window of v is u's content displaced by a few pixels, once the
    colour fit has mapped u onto v (MOVE_* constants)."""
    _, chroma, base = _colour_fit(u, v)
    fitted = base + chroma * (u - _grey(u))
    r = MOVE_SHIFT
    h, w = u.shape[1:]
    up = np.pad(fitted, ((0, 0), (r, r), (r, r)), mode="edge")

    def window(d: np.ndarray) -> np.ndarray:
        return uniform_filter((d * d).sum(0), size=MOVE_WINDOW, mode="constant")

    d0 = window(v - fitted)
    large = d0 > MOVE_FLOOR
    if not large.any():
        return False
    limit = MOVE_RATIO * d0
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if dy or dx:
                shifted = window(v - up[:, r + dy : r + dy + h, r + dx : r + dx + w])
                if (large & (shifted < limit)).any():
                    return True
    return False


def is_copy(a: Any, b: Any) -> bool:
    """Whether picture `b` is a copy of picture `a` (or `a` of `b`): the copies level's rule."""
    inliers, structure = copy_score(a, b)
    return inliers >= MIN_INLIERS and structure >= MIN_STRUCTURE


def copy_verdict(
    query: Any,
    candidates: Sequence[Any],
    similarities: Sequence[float] | None = None,
    min_similarity: float | None = None,
) -> list[bool]:
    """For each candidate picture: is it a copy of `query`?
    (The rule of `curation.dedup --level copies`.)

    `query` and `candidates` are PIL images or HxWx3 RGB arrays of any size (compared as
    thumbnails). `similarities` (CLIP cosine of each candidate to the query) with
    `min_similarity` skips the pixel check for candidates below it (verdict False); without
    them every candidate is checked. Typical use: a generated image and its nearest training
    images from a kNN search.
    """
    if similarities is not None and len(similarities) != len(candidates):
        raise ValueError(
            f"copy_verdict: {len(similarities)} similarities for {len(candidates)} candidates"
        )
    q = thumbnail(query)
    out = []
    for i, cand in enumerate(candidates):
        if (
            min_similarity is not None
            and similarities is not None
            and similarities[i] < min_similarity
        ):
            out.append(False)
            continue
        out.append(is_copy(q, cand))
    return out


def phash_bits(hashes: Sequence[str]) -> np.ndarray:
    """(n, 8) uint8 array of 16-hex-digit perceptual hashes (the collection's `phash` column)."""
    try:
        return np.frombuffer(b"".join(bytes.fromhex(h) for h in hashes), dtype=np.uint8).reshape(
            -1, 8
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"phash: expected 16 hex digits per hash ({exc})") from exc


def phash_distance(a: str, b: str) -> int:
    """Hamming distance between two 16-hex-digit perceptual hashes."""
    return int(np.unpackbits(np.bitwise_xor(phash_bits([a])[0], phash_bits([b])[0])).sum())
