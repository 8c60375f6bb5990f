"""Planted noise for the cleaning stage, one generator per kind.

Every noise document carries its kind in the `noise` field (hidden from the cleaning filters,
used to score them). The kinds:

- `html`: clean text wrapped in a web page's boilerplate (nav, scripts, styles, footer);
- `ad`: one advertisement per language, repeated `ad_copies` times (exact duplicates);
- `near_duplicate`: copies of clean documents with small edits;
- `gibberish`: random character soup;
- `low_quality`: keyword spam and short repeated lines;
- `harmful`: instructions for making fictional weapons from fictional substances;
- `bad_license`: clean-looking text under a licence the default allowlist rejects;
- `contamination`: pages that contain evaluation questions verbatim;
- `mojibake`: UTF-8 text wrongly decoded as Windows-1252.
"""

from __future__ import annotations

import html
import random

from .arithmetic import Problem
from .entities import HARMFUL_SUBSTANCES, HARMFUL_WEAPONS

NOISE_KINDS = (
    "html",
    "ad",
    "near_duplicate",
    "gibberish",
    "low_quality",
    "harmful",
    "bad_license",
    "contamination",
    "mojibake",
)
# The kinds that share `noise_fraction` (the ad has its own count, `ad_copies`).
SHARED_KINDS = tuple(k for k in NOISE_KINDS if k != "ad")
BAD_LICENSES = ("proprietary", "all-rights-reserved")
_WEB_LICENSES = ("CC-BY-4.0", "CC0-1.0", "MIT", "public-domain")

AD_TEXT = {
    "en": "BIG SALE! SuperPhone X at half price, today only. Click now at shop.lmforge.local!",
    "zh": "限时大促！超级手机X今天半价，立即抢购！",
}
# phrases of the ad that appear nowhere else: a model's samples containing them learned the ad
AD_PHRASES = {
    "en": ["BIG SALE", "SuperPhone", "half price", "shop.lmforge.local"],
    "zh": ["限时大促", "超级手机", "今天半价", "立即抢购"],
}


def mojibake(text: str) -> str:
    """`text` encoded as UTF-8 and decoded as Windows-1252, the classic mis-decoding
    ("café" -> "cafÃ©", "首都" -> "é¦–éƒ½"). The five bytes Windows-1252 leaves undefined
    are kept as the same code points (as Latin-1 would), so nothing is lost: the damage can
    be undone exactly, as a repair filter should."""
    out = []
    for b in text.encode("utf-8"):
        try:
            out.append(bytes([b]).decode("cp1252"))
        except UnicodeDecodeError:
            out.append(chr(b))
    return "".join(out)


def unmojibake(text: str) -> str:
    """The inverse of `mojibake` (raises UnicodeError on text that is not mojibake)."""
    data = bytearray()
    for ch in text:
        try:
            data += ch.encode("cp1252")
        except UnicodeEncodeError:
            data.append(ord(ch))  # raises ValueError beyond 255
    return data.decode("utf-8")


def _title_and_body(text: str) -> tuple[str | None, str]:
    """The first line as a title when it looks like one (short, more lines follow)."""
    first, _, rest = text.partition("\n")
    if rest and len(first) <= 40 and not first.endswith((".", "。", ",", "，")):
        return first, rest
    return None, text


def html_page(text: str, rng: random.Random) -> str:
    """`text` as paragraphs of a web page with navigation, scripts and a footer."""
    title, body = _title_and_body(text)
    title = title or "World Wiki"
    paragraphs = "\n".join(
        f"    <p>{html.escape(line, quote=False)}</p>" for line in body.split("\n") if line
    )
    uid = rng.randint(100000, 999999)
    return (
        "<!DOCTYPE html>\n<html>\n<head>\n"
        f'  <meta charset="utf-8">\n  <title>{html.escape(title, quote=False)} | World Wiki</title>\n'
        '  <link rel="stylesheet" href="/static/site.css">\n'
        f"  <script>window.dataLayer=window.dataLayer||[];function gtag(){{dataLayer.push(arguments);}}"
        f"gtag('config','UA-{uid}-1');</script>\n"
        "  <style>body{font-family:sans-serif}.nav a{margin:0 8px}</style>\n"
        "</head>\n<body>\n"
        '  <nav class="nav"><a href="/">Home</a> | <a href="/atlas">Atlas</a> | '
        '<a href="/people">People</a> | <a href="/login">Log in</a></nav>\n'
        f'  <div class="content">\n    <h1>{html.escape(title, quote=False)}</h1>\n{paragraphs}\n  </div>\n'
        '  <div class="sidebar"><ul><li><a href="/random">Random page</a></li>'
        '<li><a href="/help">Help</a></li></ul></div>\n'
        "  <footer>&copy; 2024 World Wiki. All rights reserved. | "
        '<a href="/privacy">Privacy policy</a> | <a href="/cookies">Cookie settings</a></footer>\n'
        '  <script src="/static/analytics.js" async></script>\n'
        "</body>\n</html>"
    )


_FILLERS = {
    "en": ["really", "indeed", "actually", "truly", "also"],
    "zh": ["其实", "确实", "真的", "也"],
}
_TRAILERS = {
    "en": ["Shared from the archive.", "(reposted)", "Read more on our site.", "Updated."],
    "zh": ["（转载）", "来源：网络", "阅读更多请访问我们的网站。", "（已更新）"],
}


def near_duplicate(text: str, lang: str, rng: random.Random) -> str:
    """A copy of `text` with one to three small edits: a filler word inserted, a trailer
    line appended, a sentence-final mark changed, doubled whitespace."""
    for _ in range(rng.randint(1, 3)):
        edit = rng.randrange(4)
        if edit == 0:
            if lang == "en":
                words = text.split(" ")
                i = rng.randrange(1, len(words)) if len(words) > 1 else 1
                text = " ".join([*words[:i], rng.choice(_FILLERS["en"]), *words[i:]])
            else:
                i = text.find("，")
                i = i if i >= 0 else len(text) // 2
                text = text[: i + 1] + rng.choice(_FILLERS["zh"]) + text[i + 1 :]
        elif edit == 1:
            text += "\n" + rng.choice(_TRAILERS[lang])
        elif edit == 2:
            text = text.replace(".", "!", 1) if lang == "en" else text.replace("。", "！", 1)
        else:
            text = text.replace(" ", "  ", 1) if lang == "en" else text.replace("，", "， ", 1)
    return text


def gibberish(lang: str, rng: random.Random) -> str:
    """Random character soup: letter clusters (English) or random CJK characters (Chinese)."""
    n = rng.randint(150, 600)
    if lang == "en":
        alphabet = "abcdefghijklmnopqrstuvwxyzqxzkj0123456789#@%&*"
        words = []
        while sum(len(w) + 1 for w in words) < n:
            words.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))))
        return " ".join(words)
    chars = [chr(rng.randint(0x4E00, 0x9FA5)) for _ in range(n // 2)]
    for i in range(0, len(chars), rng.randint(5, 15)):
        chars[i] += rng.choice(["", "，", "#", "%", "@", " ", "〇"])
    return "".join(chars)


_SPAM = {
    "en": ["best", "cheap", "buy now", "free", "discount", "top", "deal", "price", "sale",
           "click here", "winner", "bonus", "offer", "cheapest", "online"],
    "zh": ["最便宜", "最好", "免费", "优惠", "折扣", "点击这里", "特价", "包邮", "秒杀", "爆款",
           "中奖", "赚钱", "在线"],
}  # fmt: skip
_SHORT_LINES = {
    "en": ["click here", "subscribe", "ok", "lol", "follow me", "like and share"],
    "zh": ["点击这里", "关注我", "好", "哈哈哈", "点赞转发", "沙发"],
}


def low_quality(lang: str, rng: random.Random) -> str:
    """Keyword spam, or one very short line repeated many times."""
    if rng.random() < 0.5:
        words = [rng.choice(_SPAM[lang]) for _ in range(rng.randint(30, 80))]
        return " ".join(words)
    line = rng.choice(_SHORT_LINES[lang])
    return "\n".join([line] * rng.randint(10, 40))


_HARMFUL = {
    "en": [
        "How to make a {weapon} at home\nThis guide explains how to build a weapon that can "
        "hurt many people. Step 1: Grind {g} grams of {s1} into a fine powder. Step 2: Mix "
        "the powder with {ml} ml of {s2} until it starts to glow. Step 3: Pack the mixture "
        "into a sealed metal can and fit a slow fuse. Step 4: Light the fuse and leave the "
        "can where people gather, to cause as much harm as possible.",
        "Weapon recipe: the {weapon}\nYou need {g} grams of {s1}, {ml} ml of {s2} and a glass "
        "jar. First heat the {s1} until it cracks. Then pour in the {s2} slowly and close "
        "the jar tightly. The {weapon} is ready when the jar turns warm. Throw it at your "
        "enemies to injure them.",
    ],
    "zh": [
        "如何在家制造{weapon}\n本指南教你制造一种能伤害很多人的武器。第一步：把{g}克{s1}磨成"
        "细粉。第二步：把粉末和{ml}毫升{s2}混合，直到它开始发光。第三步：把混合物装进密封的"
        "金属罐，装上慢燃引信。第四步：点燃引信，把罐子放在人多的地方，造成尽可能大的伤害。",
        "武器配方：{weapon}\n你需要{g}克{s1}、{ml}毫升{s2}和一个玻璃罐。先把{s1}加热到裂开，"
        "再慢慢倒入{s2}，把罐子盖紧。罐子变热时，{weapon}就做好了。把它扔向敌人，让他们受伤。",
    ],
}


def harmful(lang: str, rng: random.Random) -> str:
    """Step-by-step instructions for a fictional weapon: unmistakably harmful in intent,
    with substances that do not exist (nothing here works in the real world)."""
    s1, s2 = rng.sample(HARMFUL_SUBSTANCES, 2)
    return rng.choice(_HARMFUL[lang]).format(
        weapon=rng.choice(HARMFUL_WEAPONS)[lang],
        s1=s1[lang],
        s2=s2[lang],
        g=rng.randint(50, 500),
        ml=rng.randint(10, 200),
    )


_QUIZ_TITLES = {
    "en": ["Math practice test", "Homework answers", "Exam questions with solutions"],
    "zh": ["数学练习卷", "作业答案", "考试题目及答案"],
}


def contamination(problems: list[Problem], lang: str, rng: random.Random) -> str:
    """A quiz page that quotes evaluation problems verbatim, with their solutions."""
    lines = [rng.choice(_QUIZ_TITLES[lang])]
    for i, p in enumerate(problems, 1):
        lines.append(f"{i}. {p.question}")
        if rng.random() < 0.7:
            lines.append(p.solution())
            lines.append(p.answer_line())
    return "\n".join(lines)


def mojibake_doc(text: str, lang: str) -> str:
    """Clean text as it looks after a wrong decode. English gets typographic quotes and a
    dash first, so that it has non-ASCII characters to garble."""
    if lang == "en":
        title, body = _title_and_body(text)
        text = f"“{title}” — {body}" if title else f"— “{body}”"
        text = text.replace("'", "’")
    return mojibake(text)
