"""The PDF report, with reportlab's platypus (pure Python): A4 portrait, the same sections as the
HTML page. DejaVu fonts (shipped with matplotlib) cover γ, λ, ∇ and the other symbols."""

from __future__ import annotations

import io
from pathlib import Path
from xml.sax.saxutils import escape

from reportlab.lib import colors
from reportlab.lib.enums import TA_RIGHT
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle
from reportlab.lib.units import mm
from reportlab.platypus import (
    CondPageBreak,
    Image,
    KeepTogether,
    LongTable,
    PageBreak,
    Paragraph,
    Preformatted,
    SimpleDocTemplate,
    Spacer,
    TableStyle,
)

from .assemble import Report
from .derivation import markup

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
    }


def _p(text: str, style: ParagraphStyle) -> Paragraph:
    return Paragraph(escape(str(text)), style)


def _mono(text: str, style: ParagraphStyle) -> Paragraph:
    """Monospace cell text (the style breaks long names such as GAE specs anywhere)."""
    return Paragraph(escape(str(text)), style)


def _table(head: list[str], rows: list, widths: list[float], st: dict,
           red_rows: tuple[int, ...] = (), kinds: str = "") -> LongTable:
    """A table that splits across pages and repeats its header. kinds: per column t/n/m (text,
    number, monospace). A row given as a plain string is a group heading across all columns."""
    kinds = kinds or "t" * len(head)
    cell = {"t": st["cell"], "n": st["cellnum"], "m": st["cellmono"]}
    data = [[_p(h, st["head"]) for h in head]]
    style = [("GRID", (0, 0), (-1, -1), 0.3, GRID), ("BACKGROUND", (0, 0), (-1, 0), HEAD_BG),
             ("VALIGN", (0, 0), (-1, -1), "TOP"), ("LEFTPADDING", (0, 0), (-1, -1), 2.5),
             ("RIGHTPADDING", (0, 0), (-1, -1), 2.5), ("TOPPADDING", (0, 0), (-1, -1), 1.5),
             ("BOTTOMPADDING", (0, 0), (-1, -1), 2)]
    for i, row in enumerate(rows, start=1):
        if isinstance(row, str):
            data.append([_p(row, st["head"])] + [""] * (len(head) - 1))
            style += [("SPAN", (0, i), (-1, i)), ("BACKGROUND", (0, i), (-1, i), GROUP_BG)]
        else:
            data.append([_mono(v, cell["m"]) if k == "m" else _p(v, cell[k])
                         for v, k in zip(row, kinds, strict=True)])
    total = sum(widths)
    table = LongTable(data, colWidths=[w * FRAME_W / total for w in widths], repeatRows=1)
    style += [("BACKGROUND", (0, i + 1), (-1, i + 1), RED_BG) for i in red_rows]
    table.setStyle(TableStyle(style))
    return table


def _figure(fig, st: dict) -> list:
    """The PNG scaled to the frame width (and to the page height, keeping its aspect ratio)."""
    from PIL import Image as PILImage

    w_px, h_px = PILImage.open(io.BytesIO(fig.png)).size
    caption = Paragraph(f"<b>{escape(fig.title)}.</b> {escape(fig.caption)}", st["caption"])
    width = min(FRAME_W, w_px / 150 * 72)  # PNGs are 150 dpi: never enlarge them
    height = width * h_px / w_px
    room = FRAME_H - caption.wrap(FRAME_W, FRAME_H)[1] - 30
    if height > room:
        width, height = width * room / height, room
    return [KeepTogether([Image(io.BytesIO(fig.png), width=width, height=height), caption])]


def _footer(name: str):
    def draw(canvas, doc) -> None:
        canvas.saveState()
        canvas.setFont("DejaVu", 7.5)
        canvas.setFillColor(colors.HexColor("#777777"))
        canvas.drawString(MARGIN, 9 * mm, f"Study {name}: policy-gradient estimators")
        canvas.drawRightString(A4[0] - MARGIN, 9 * mm, f"page {doc.page}")
        canvas.restoreState()
    return draw


def _summary(r: Report, st: dict) -> list:
    out = [_p("1. Summary per environment", st["h1"]), _p(r.summary_note, st["body"])]
    for env, block in r.summary.items():
        head = r.summary_head_one if block["n"] == 1 else r.summary_head_many
        rows = [[x["estimator"], x["claim"], x["rel_bias"], x["test"], x["agrees"], x["var_ratio"],
                 x["nts"], x["batch"]] for x in block["rows"]]
        red = tuple(i for i, x in enumerate(block["rows"]) if not x["agree_flag"])
        n = block["n"]
        out += [CondPageBreak(60 * mm),
                _p(f"{env} ({n} condition{'s' if n != 1 else ''})", st["h2"]),
                _table(head, rows, [28, 9.5, 20, 12, 8, 21, 9, 10], st, red, "mttttnnn")]
    return out


def _derivation(r: Report, st: dict) -> list:
    out = [PageBreak(), _p("2. The derivation, checked step by step", st["h1"]),
           _p("The policy-gradient theorem is often derived in six steps. Each step names the "
              "estimators it yields and what this study measured for them, so the step where the "
              "popular final formula goes wrong, and its repair, can be read off the numbers.",
              st["body"])]
    box = [_p("Measured in this study", st["h2"])]
    box += [Paragraph(markup(c, "super"), st["bullet"], bulletText="•") for c in r.conclusions]
    frame = LongTable([[box]], colWidths=[FRAME_W])
    frame.setStyle(TableStyle([("BACKGROUND", (0, 0), (-1, -1), colors.HexColor("#fff8e6")),
                               ("BOX", (0, 0), (-1, -1), 0.5, colors.HexColor("#f0d68a")),
                               ("LEFTPADDING", (0, 0), (-1, -1), 6),
                               ("BOTTOMPADDING", (0, 0), (-1, -1), 6)]))
    out.append(frame)
    for s in r.steps:
        block = [_p(f"{s.key}. {s.title}", st["h2"]),
                 Paragraph(markup(f"${s.formula}$", "super"), st["formula"]),
                 Paragraph(markup(s.text, "super"), st["body"])]
        if s.estimators:
            names = ", ".join(f"<font face='DejaVuMono'>{escape(e)}</font>" for e in s.estimators)
            block.append(Paragraph(f"Estimators: {names}.", st["body"]))
        block += [Paragraph(escape(f), st["bullet"], bulletText="•") for f in s.findings]
        out.append(KeepTogether(block))
    return out


def _figures(r: Report, st: dict) -> list:
    out = [PageBreak(), _p("3. Figures", st["h1"])]
    notes = [f for f in r.figures if not f.png]
    for f in notes:  # the left-out figures first, one line each
        out.append(Paragraph(f"<b>{escape(f.title)}:</b> {escape(f.note or '')}", st["note"]))
    for f in r.figures:
        if f.png:
            out += _figure(f, st)
    return out


def _methodology(r: Report, st: dict) -> list:
    out = [PageBreak(), _p("4. Methodology", st["h1"])]
    for term, text in r.methodology:
        out.append(Paragraph(f"<b>{escape(term)}.</b> {markup(text, 'super')}", st["body"]))
    out += [_p("5. Estimators", st["h1"]),
            _p("ψ_t = ∇log π(a_t | s_t); G_t is the discounted return from t; T the trajectory's "
               "length.", st["body"]),
            _table(["estimator", "formula", "claim", "reference"],
                   [[e["name"], e["formula"], e["claim"], e["reference"]] for e in r.estimators],
                   [23, 30, 25, 22], st, kinds="mmtt")]
    return out


def _conditions(r: Report, st: dict) -> list:
    out = [PageBreak(), _p("6. Results per condition", st["h1"]),
           _p(f"Every condition with its 95% intervals, straight from the estimator runs. "
              f"“test”: rejects 'mean = ∇J' at level {r.alpha:g}, or not (—).", st["body"])]
    for env, blocks in r.conditions.items():
        rows, red = [], []
        for block in blocks:
            rows.append(block["condition"])
            for x in block["rows"]:
                if x["agrees"] == "NO":
                    red.append(len(rows))
                rows.append([x["estimator"], x["claim"], x["rel_bias"], x["p"], x["verdict"],
                             x["agrees"], x["var_ratio"], x["nts"], x["batch"]])
        out += [CondPageBreak(50 * mm), _p(env, st["h2"]),
                _table(r.condition_head, rows, [26, 8, 17, 7.5, 6.5, 7.5, 20.5, 7.5, 7.5], st,
                       tuple(red), "mttnttnnn")]
    return out


def _provenance(r: Report, st: dict) -> list:
    p = r.provenance
    out = [PageBreak(), _p("7. Provenance", st["h1"]),
           _p(f"MLflow tracking URI {p['uri']}, experiment {p['experiment']}; latest run started "
              f"{p['as_of']}.", st["body"]), _p("Invocations", st["h2"])]
    for inv in p["invocations"]:
        out += [_table(["field", "value"], [[k, v] for k, v in inv.items()], [18, 82], st,
                       kinds="tm"), Spacer(1, 6)]
    if p["skipped"]:
        out.append(_p("Left out: " + "; ".join(p["skipped"]) + ".", st["body"]))
    out += [_p("Condition runs", st["h2"]),
            _table(["environment", "condition", "trial", "MLflow run", "invocation run"],
                   [[c["env"], c["condition"], c["trial"], c["run"], c["invocation"]]
                    for c in p["conditions"]], [18, 26, 6, 25, 25], st, kinds="ttnmm"),
            _p("Study file", st["h2"])]
    for f in p["files"]:
        out += [_p(f"SHA-256 {f['sha']}", st["meta"]), Preformatted(f["text"], st["pre"])]
    if not p["files"]:
        out.append(_p("The study file could not be read from the invocation runs' artifacts.",
                      st["note"]))
    return out


def render_pdf(report: Report) -> bytes:
    """The report as PDF bytes (deterministic: no creation date or random document id)."""
    _fonts()
    st = _styles()
    story = [_p(f"Study “{report.name}”: bias and variance of policy-gradient estimators",
                st["title"])]
    if report.description:
        story.append(_p(report.description, st["body"]))
    story.append(_p(report.overview, st["meta"]))
    story += _summary(report, st) + _derivation(report, st) + _figures(report, st)
    story += _methodology(report, st) + _conditions(report, st) + _provenance(report, st)
    buf = io.BytesIO()
    doc = SimpleDocTemplate(buf, pagesize=A4, leftMargin=MARGIN, rightMargin=MARGIN,
                            topMargin=MARGIN, bottomMargin=MARGIN + 8 * mm, invariant=1,
                            title=f"Study {report.name}", author="pg-variance-suite",
                            subject="policy-gradient estimators: bias and variance")
    footer = _footer(report.name)
    doc.build(story, onFirstPage=footer, onLaterPages=footer)
    return buf.getvalue()
