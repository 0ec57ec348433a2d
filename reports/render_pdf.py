"""The PDF report, with reportlab's platypus (pure Python): A4 portrait, the report's blocks
(``reports.document``) walked in order, as the HTML renderer walks them. DejaVu fonts (shipped
with matplotlib) cover γ, λ, ∇ and the other symbols.

Layout keeps pages full: a level-1 heading starts a new page only when less than a third of the
page is left, and no figure is taller than 0.58 of the page, so a figure moved to the next page
leaves at least a third of the page filled."""

from __future__ import annotations

import io
from pathlib import Path
from xml.sax.saxutils import escape

from reportlab.lib import colors
from reportlab.lib.enums import TA_RIGHT
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle
from reportlab.lib.units import mm
from reportlab.lib.utils import ImageReader
from reportlab.platypus import (
    CondPageBreak,
    Flowable,
    LongTable,
    Paragraph,
    Preformatted,
    SimpleDocTemplate,
    Spacer,
    TableStyle,
)

from .assemble import Report
from .document import Box, Bullets, FigureBlock, Formula, Heading, Para, Pre, Table
from .text import markup

__all__ = ["render_pdf"]

MARGIN = 15 * mm
FRAME_W = A4[0] - 2 * MARGIN
FRAME_H = A4[1] - 2 * MARGIN - 8 * mm  # room for the footer
GRID = colors.HexColor("#cccccc")
HEAD_BG = colors.HexColor("#e9edf3")
RED_BG = colors.HexColor("#fbe3e3")
GROUP_BG = colors.HexColor("#f4f4f4")


def _fonts() -> None:
    """Register DejaVu Sans / Sans Mono / Serif from matplotlib's data (once)."""
    import matplotlib
    from reportlab.lib.fonts import addMapping
    from reportlab.pdfbase import pdfmetrics
    from reportlab.pdfbase.ttfonts import TTFont

    if "DejaVu" in pdfmetrics.getRegisteredFontNames():
        return
    ttf = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    for name, file in (("DejaVu", "DejaVuSans"), ("DejaVu-Bold", "DejaVuSans-Bold"),
                       ("DejaVu-Oblique", "DejaVuSans-Oblique"),
                       ("DejaVu-BoldOblique", "DejaVuSans-BoldOblique"),
                       ("DejaVuMono", "DejaVuSansMono"), ("DejaVuSerif", "DejaVuSerif")):
        pdfmetrics.registerFont(TTFont(name, str(ttf / f"{file}.ttf")))
    for bold, italic, face in ((0, 0, "DejaVu"), (1, 0, "DejaVu-Bold"), (0, 1, "DejaVu-Oblique"),
                               (1, 1, "DejaVu-BoldOblique")):
        addMapping("DejaVu", bold, italic, face)


def _styles() -> dict[str, ParagraphStyle]:
    base = ParagraphStyle("body", fontName="DejaVu", fontSize=9, leading=12.5, spaceAfter=4)
    return {
        "title": ParagraphStyle("title", base, fontName="DejaVu-Bold", fontSize=17, leading=21,
                                spaceAfter=8),
        "h1": ParagraphStyle("h1", base, fontName="DejaVu-Bold", fontSize=13, leading=16,
                             spaceBefore=10, spaceAfter=6, textColor=colors.HexColor("#1f3b63")),
        "h2": ParagraphStyle("h2", base, fontName="DejaVu-Bold", fontSize=10.5, leading=13,
                             spaceBefore=8, spaceAfter=4),
        "h3": ParagraphStyle("h3", base, fontName="DejaVu-Bold", fontSize=9.5, leading=12,
                             spaceBefore=4, spaceAfter=3),
        "body": base,
        "meta": ParagraphStyle("meta", base, fontSize=8, leading=11, textColor=colors.HexColor("#555555")),
        "formula": ParagraphStyle("formula", base, fontName="DejaVuSerif", fontSize=10.5, leading=14,
                                  leftIndent=10, backColor=colors.HexColor("#f4f4f7"), borderPadding=3,
                                  spaceBefore=3, spaceAfter=7),
        "bullet": ParagraphStyle("bullet", base, leftIndent=12, bulletIndent=3, fontSize=8.5,
                                 leading=11.5),
        "caption": ParagraphStyle("caption", base, fontSize=8, leading=10.5,
                                  textColor=colors.HexColor("#333333"), spaceBefore=3, spaceAfter=10),
        "note": ParagraphStyle("note", base, fontName="DejaVu-Oblique", fontSize=8.5,
                               textColor=colors.HexColor("#8a5a00")),
        "cell": ParagraphStyle("cell", base, fontSize=6.8, leading=8.2, spaceAfter=0),
        "cellnum": ParagraphStyle("cellnum", base, fontSize=6.8, leading=8.2, spaceAfter=0,
                                  alignment=TA_RIGHT),
        "cellmono": ParagraphStyle("cellmono", base, fontName="DejaVuMono", fontSize=6.3, leading=8.2,
                                   spaceAfter=0, wordWrap="CJK"),
        "head": ParagraphStyle("head", base, fontName="DejaVu-Bold", fontSize=6.8, leading=8.2,
                               spaceAfter=0),
        "pre": ParagraphStyle("pre", base, fontName="DejaVuMono", fontSize=6.5, leading=8.2),
        "cells": ParagraphStyle("cells", base, fontSize=6.2, leading=7.4, spaceAfter=0),
        "cellnums": ParagraphStyle("cellnums", base, fontSize=6.2, leading=7.4, spaceAfter=0,
                                   alignment=TA_RIGHT),
        "cellmonos": ParagraphStyle("cellmonos", base, fontName="DejaVuMono", fontSize=5.8,
                                    leading=7.4, spaceAfter=0, wordWrap="CJK"),
        "heads": ParagraphStyle("heads", base, fontName="DejaVu-Bold", fontSize=6.2, leading=7.4,
                                spaceAfter=0),
    }


def _p(text: str, style: ParagraphStyle) -> Paragraph:
    """A paragraph of text with the report's inline markup."""
    return Paragraph(markup(str(text), "pdf"), style)


def _table(t: Table, st: dict) -> LongTable:
    """A table that splits across pages and repeats its header; string rows are group headings."""
    small = "s" if t.small else ""
    cell = {"t": st[f"cell{small}"], "n": st[f"cellnum{small}"], "m": st[f"cellmono{small}"]}
    data = [[_p(h, st[f"head{small}"]) for h in t.head]]
    style = [("GRID", (0, 0), (-1, -1), 0.3, GRID), ("BACKGROUND", (0, 0), (-1, 0), HEAD_BG),
             ("VALIGN", (0, 0), (-1, -1), "TOP"), ("LEFTPADDING", (0, 0), (-1, -1), 2.2),
             ("RIGHTPADDING", (0, 0), (-1, -1), 2.2), ("TOPPADDING", (0, 0), (-1, -1), 1.2),
             ("BOTTOMPADDING", (0, 0), (-1, -1), 1.8)]
    for i, row in enumerate(t.rows, start=1):
        if isinstance(row, str):
            data.append([_p(row, st[f"head{small}"])] + [""] * (len(t.head) - 1))
            style += [("SPAN", (0, i), (-1, i)), ("BACKGROUND", (0, i), (-1, i), GROUP_BG)]
            if i + 1 <= len(t.rows):  # a group heading stays with its first row
                style.append(("NOSPLIT", (0, i), (-1, i + 1)))
        else:
            data.append([_p(v, cell[k]) for v, k in zip(row, t.kinds, strict=True)])
        if i - 1 in t.red:
            style.append(("BACKGROUND", (0, i), (-1, i), RED_BG))
    total = sum(t.widths)
    table = LongTable(data, colWidths=[w * FRAME_W / total for w in t.widths], repeatRows=1)
    table.setStyle(TableStyle(style))
    return table


MAX_FIGURE = 0.58  # of the frame height: a figure moved to the next page leaves >= 1/3 filled


class _Figure(Flowable):
    """A figure as one flowable: an optional heading, the image, its caption. It takes its
    natural size where that fits, shrinks the image down to SHRINK of it to fit the space left
    on the page, and only then moves to the next page (which therefore happens with less than
    SHRINK x MAX_FIGURE of the page left: the page it leaves is more than half full)."""

    def __init__(self, png: bytes, width: float, height: float, caption: Paragraph,
                 heading: Paragraph | None = None):
        super().__init__()
        self.png, self.full = png, (width, height)
        self.caption, self.heading = caption, heading
        self.size, self.parts = self.full, (0.0, 0.0)

    def wrap(self, avail_w: float, avail_h: float):
        head = self.heading.wrap(avail_w, avail_h)[1] + 8 if self.heading else 0.0
        cap = self.caption.wrap(avail_w, avail_h)[1] + 4
        w, h = self.full
        room = avail_h - head - cap - 10
        k = 1.0 if h <= room else (room / h if room >= SHRINK * h else 1.0)
        self.size, self.parts = (w * k, h * k), (head, cap)
        return avail_w, head + self.size[1] + cap + 10

    def draw(self) -> None:
        """Bottom up: the caption, 10 pt, the image (centred), the heading at the top."""
        head, cap = self.parts
        w, h = self.size
        if self.heading:
            top = head + h + cap + 10
            self.heading.drawOn(self.canv, 0, top - self.heading.height)
        self.canv.drawImage(ImageReader(io.BytesIO(self.png)), (FRAME_W - w) / 2, cap + 6, w, h)
        self.caption.drawOn(self.canv, 0, 0)


SHRINK = 0.7


def _figure(fig, st: dict, heading: Paragraph | None = None) -> list:
    """The PNG scaled to the frame width (and to MAX_FIGURE of the page, keeping its aspect)."""
    from PIL import Image as PILImage

    if not fig.png:
        note = Paragraph(f"<b>{escape(fig.title)}:</b> {markup(fig.note or '', 'pdf')}", st["note"])
        return [heading, note] if heading else [note]
    w_px, h_px = PILImage.open(io.BytesIO(fig.png)).size
    caption = Paragraph(f"<b>{escape(fig.title)}.</b> {markup(fig.caption, 'pdf')}", st["caption"])
    width = min(FRAME_W, w_px / 150 * 72)  # PNGs are 150 dpi: never enlarge them
    height = width * h_px / w_px
    room = FRAME_H * MAX_FIGURE - caption.wrap(FRAME_W, FRAME_H)[1]
    if height > room:
        width, height = width * room / height, room
    return [_Figure(fig.png, width, height, caption, heading), Spacer(1, 8)]


def _box(b: Box, st: dict) -> LongTable:
    inner = [_p(b.title, st["h3"])] + [Paragraph(markup(i, "pdf"), st["bullet"], bulletText="•")
                                       for i in b.items]
    frame = LongTable([[inner]], colWidths=[FRAME_W])
    frame.setStyle(TableStyle([("BACKGROUND", (0, 0), (-1, -1), colors.HexColor("#fff8e6")),
                               ("BOX", (0, 0), (-1, -1), 0.5, colors.HexColor("#f0d68a")),
                               ("LEFTPADDING", (0, 0), (-1, -1), 6),
                               ("BOTTOMPADDING", (0, 0), (-1, -1), 6)]))
    return frame


def _flowables(blocks: list, st: dict) -> list:
    """The blocks as platypus flowables; a heading is kept with what follows it."""
    out: list = []
    first_h1 = True
    heading = None
    for i, b in enumerate(blocks):
        if not isinstance(b, FigureBlock | Heading):
            heading = None
        if isinstance(b, Heading):
            if b.level == 1:
                if not first_h1:
                    out.append(CondPageBreak(FRAME_H / 3))
                first_h1 = False
            else:
                out.append(CondPageBreak(40 * mm))
            out.append(_p(b.text, st[f"h{b.level}"]))
            # kept with a following paragraph or figure (at most 0.58 of a page: what they leave
            # behind is still a third full); a long table may split, and a heading kept with
            # it would carry the table to the next page whole
            nxt = blocks[i + 1] if i + 1 < len(blocks) else None
            out[-1].keepWithNext = isinstance(nxt, Para | Formula | Bullets)
            heading = out.pop() if isinstance(nxt, FigureBlock) else None
        elif isinstance(b, Para):
            out.append(_p(b.text, st[b.style]))
        elif isinstance(b, Bullets):
            out += [Paragraph(markup(item, "pdf"), st["bullet"], bulletText="•") for item in b.items]
        elif isinstance(b, Box):
            out.append(_box(b, st))
        elif isinstance(b, Formula):
            out.append(Paragraph(markup(f"${b.text}$", "pdf"), st["formula"]))
            out[-1].keepWithNext = True
        elif isinstance(b, Table):
            out.append(_table(b, st))
        elif isinstance(b, FigureBlock):
            out += _figure(b.figure, st, heading)  # the heading just before it moves with it
            heading = None
        elif isinstance(b, Pre):
            out.append(Preformatted(b.text, st["pre"]))
        else:
            raise TypeError(f"unknown block {type(b).__name__} at {i}")
    return out


def _footer(name: str):
    def draw(canvas, doc) -> None:
        canvas.saveState()
        canvas.setFont("DejaVu", 7.5)
        canvas.setFillColor(colors.HexColor("#777777"))
        canvas.drawString(MARGIN, 9 * mm, f"Study {name}: policy-gradient estimators")
        canvas.drawRightString(A4[0] - MARGIN, 9 * mm, f"page {doc.page}")
        canvas.restoreState()
    return draw


def render_pdf(report: Report) -> bytes:
    """The report as PDF bytes (deterministic: no creation date or random document id)."""
    _fonts()
    st = _styles()
    story = [_p(report.title, st["title"])] + _flowables(report.blocks, st)
    buf = io.BytesIO()
    doc = SimpleDocTemplate(buf, pagesize=A4, leftMargin=MARGIN, rightMargin=MARGIN,
                            topMargin=MARGIN, bottomMargin=MARGIN + 8 * mm, invariant=1,
                            title=f"Study {report.name}", author="pg-variance-suite",
                            subject="policy-gradient estimators: bias and variance")
    footer = _footer(report.name)
    doc.build(story, onFirstPage=footer, onLaterPages=footer)
    return buf.getvalue()
