"""Heat maps of the good-only detector: overlays written as images are scored, and a contact sheet of the most
anomalous, on one colour scale fixed by the detector's threshold."""
from __future__ import annotations

import heapq
import math
from pathlib import Path

import numpy as np

from lab_io import atomic_write


def gives_maps(model) -> bool:
    """A model says where the defect is when its score() returns maps [N, h, w] (higher = more anomalous) and it
    declares "anomaly_map": the good-only detector (inference.PatchDetector) does, the supervised classifier not."""
    return bool(getattr(model, "meta", {}).get("anomaly_map"))


def _colormap(values: np.ndarray) -> np.ndarray:
    """[h, w] in [0, 1] -> uint8 [h, w, 3], dark blue -> red -> yellow (readable on grey parts)."""
    stops = np.array([[0, 0, 80], [0, 60, 200], [230, 30, 30], [255, 230, 0]], np.float32)
    pos = np.clip(values, 0, 1) * (len(stops) - 1)
    lo = np.minimum(pos.astype(int), len(stops) - 2)
    frac = (pos - lo)[..., None]
    return (stops[lo] * (1 - frac) + stops[lo + 1] * frac).astype(np.uint8)


def overlay(pixels_uint8: np.ndarray, amap: np.ndarray, scale: tuple[float, float], size: int = 320):
    """The model's input image (uint8 [3, H, W]) with its anomaly map (scaled by `scale` = (low, high)) on top."""
    from PIL import Image

    base = Image.fromarray(np.ascontiguousarray(pixels_uint8.transpose(1, 2, 0))).resize((size, size),
                                                                                          Image.BILINEAR)
    low, high = scale
    norm = (np.asarray(amap, np.float32) - low) / max(high - low, 1e-12)
    heat = Image.fromarray(_colormap(norm)).resize((size, size), Image.BILINEAR)
    alpha = Image.fromarray((np.clip(norm, 0, 1) * 150 + 40).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    out = base.convert("RGB")
    out.paste(heat, mask=alpha)
    return out


def contact_sheet(tiles: list[tuple[object, str]], columns: int = 6):
    """[(PIL image, caption)] -> one PNG-ready sheet, captions under each tile."""
    from PIL import Image, ImageDraw

    size = tiles[0][0].size[0]
    rows = math.ceil(len(tiles) / columns)
    sheet = Image.new("RGB", (columns * size, rows * (size + 28)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (img, caption) in enumerate(tiles):
        x, y = (i % columns) * size, (i // columns) * (size + 28)
        sheet.paste(img, (x, y))
        draw.text((x + 4, y + size + 4), caption[:48], fill=(0, 0, 0))
    return sheet


HEATMAP_SCALE = (0.0, 1.5)  # overlay colours in multiples of the model's map_reference (red): the detector's
# threshold, or a hybrid classifier's 95th percentile of val good scores


class HeatmapWriter:
    """--heatmaps, streamed: the overlay PNG of each anomalous image (folder/<name>_<hash>_heatmap.png) is written as
    soon as the image is scored, and contact_sheet.png of the max_tiles most anomalous at the end: only those tiles
    are kept in memory, whatever the number of images. One colour scale for the whole run, fixed by the model's
    map_reference (HEATMAP_SCALE), so that two overlays can be compared and none waits for the last image."""

    def __init__(self, folder: str | Path, reference: float, max_tiles: int = 48):
        self.folder, self.max_tiles = Path(folder), max_tiles
        self.scale = (HEATMAP_SCALE[0] * reference, HEATMAP_SCALE[1] * reference)
        self.written = 0
        self._top: list[tuple[float, int, object, str]] = []  # min-heap on the score: the weakest goes first

    def add(self, result: dict) -> None:
        if result.get("label") != "anomaly" or result.get("map") is None:
            return
        img = overlay(result["uint8"], result["map"], self.scale)
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.folder / f"{Path(result['path']).stem}_{_short_hash(result['path'])}_heatmap.png"
        atomic_write(target, lambda p: img.save(p, format="PNG"), overwrite=False)
        self.written += 1
        tile = (float(result["score"]), -self.written, img, f"{Path(result['path']).name} {result['score']:.3g}")
        (heapq.heappush if len(self._top) < self.max_tiles else heapq.heappushpop)(self._top, tile)

    def close(self) -> Path | None:
        """Writes contact_sheet.png (most anomalous first); None when no image was anomalous."""
        if not self._top:
            return None
        tiles = [(img, caption) for _, _, img, caption in sorted(self._top, reverse=True)]
        sheet = contact_sheet(tiles)
        sheet_path = self.folder / "contact_sheet.png"
        atomic_write(sheet_path, lambda p: sheet.save(p, format="PNG"), overwrite=False)
        self._top = []
        return sheet_path


def _short_hash(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:6]  # two folders may hold the same file name
