"""Group photos made of real heads (test helper for crop-faces and embed-faces)."""

from __future__ import annotations

from PIL import Image

# mediapipe's face box (x0, y0, x1, y1) on the original photos, to cut heads out for group photos
HEAD_BOXES = {"biden.jpg": (422, 226, 759, 562), "obama2.jpg": (141, 271, 491, 621), "obama.jpg": (355, 134, 642, 421)}


def head(image: Image.Image, box: tuple, scale: float) -> Image.Image:
    """The head around face box ``box`` (with hair and neck), resized by ``scale``."""
    x0, y0, x1, y1 = box
    grow = x1 - x0
    cut = image.crop((max(0, int(x0 - grow)), max(0, int(y0 - grow)), min(image.width, int(x1 + grow)),
                      min(image.height, int(y1 + 1.6 * grow))))
    return cut.resize((round(cut.width * scale), round(cut.height * scale)), Image.Resampling.LANCZOS)


def side_by_side(*heads: Image.Image, gap: int = 30) -> Image.Image:
    """A group photo: real heads pasted side by side on a grey backdrop, bottoms aligned."""
    h = max(i.height for i in heads)
    canvas = Image.new("RGB", (sum(i.width for i in heads) + gap * (len(heads) + 1), h + 2 * gap), (180, 180, 180))
    x = gap
    for one in heads:
        canvas.paste(one, (x, gap + h - one.height))
        x += one.width + gap
    return canvas
