"""The entities of the built-in world: countries, people, physical constants.

Names are invented, so that a model can only know them from the generated corpus. An English
name is a sequence of consonant-vowel syllables ("Ta-vo-ri" -> "Tavori"), and its Chinese name
is the standard transliteration of the same syllables ("塔沃里"), the way Chinese writes foreign
names. Every name of a language is *prefix-free* against every other name of that language
(no "Tavo" next to "Tavori"), so a greedy completion that starts with the right name cannot
also be the start of a wrong one.

Everything is drawn from `random.Random` streams seeded with strings (never from `hash()` or
set order), so the same seed gives the same world on every machine and Python version.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

from lmforge.config import WorldConfig

LANGS = ("en", "zh")
SFT_HELDOUT_FRACTION = 0.25  # of countries and of people: facts never asked in SFT

# Consonant-vowel syllables and their Chinese transliteration characters (all distinct, so
# two different syllable sequences never give the same Chinese name).
_SYLLABLES: dict[str, str] = {
    "ba": "巴", "be": "贝", "bi": "比", "bo": "博", "bu": "布",
    "da": "达", "de": "德", "di": "迪", "do": "多", "du": "杜",
    "fa": "法", "fe": "费", "fi": "菲", "fo": "福", "fu": "富",
    "ga": "加", "ge": "格", "gi": "吉", "go": "戈", "gu": "古",
    "ka": "卡", "ke": "克", "ki": "基", "ko": "科", "ku": "库",
    "la": "拉", "le": "勒", "li": "利", "lo": "洛", "lu": "卢",
    "ma": "马", "me": "梅", "mi": "米", "mo": "莫", "mu": "穆",
    "na": "纳", "ne": "内", "ni": "尼", "no": "诺", "nu": "努",
    "pa": "帕", "pe": "佩", "pi": "皮", "po": "波", "pu": "普",
    "ra": "腊", "re": "雷", "ri": "里", "ro": "罗", "ru": "鲁",
    "sa": "萨", "se": "塞", "si": "西", "so": "索", "su": "苏",
    "ta": "塔", "te": "特", "ti": "蒂", "to": "托", "tu": "图",
    "va": "瓦", "ve": "韦", "vi": "维", "vo": "沃", "vu": "武",
    "za": "扎", "ze": "泽", "zi": "齐", "zo": "佐", "zu": "祖",
}  # fmt: skip
# A closing consonant, only ever at the end of a name, so spelling stays unambiguous.
_FINALS: dict[str, str] = {"n": "恩", "r": "尔", "s": "斯"}
_SYLLABLE_LIST = sorted(_SYLLABLES)

# Invented names that happen to be real words or real places would read as English, not as
# names of this world; they are skipped.
_REAL_WORDS_TEXT = """
banana potato tomato domino kimono gelato bikini safari salami karate casino lemon melon salon
baron robin venus bonus minus virus taken token tenor rumor tumor motor rotor tutor donor manor
minor visor vapor sonar lunar polar solar molar radar sugar panama manila dakar kigali lusaka
bamako maseru dodoma moroni tirana lima roma kobe sofa pizza pasta salad lotus bogus focus genus
tonus sinus pelican
"""
_REAL_WORDS = frozenset(_REAL_WORDS_TEXT.split())

# Professions: every English one starts with a consonant, so "works as a {profession}" reads
# right, and no profession is a prefix of another in either language.
PROFESSIONS: tuple[dict[str, str], ...] = tuple(
    {"en": en, "zh": zh}
    for en, zh in [
        ("farmer", "农民"), ("teacher", "教师"), ("doctor", "医生"), ("painter", "画家"),
        ("sailor", "水手"), ("baker", "面包师"), ("poet", "诗人"), ("musician", "音乐家"),
        ("merchant", "商人"), ("weaver", "织工"), ("carpenter", "木匠"), ("chemist", "化学家"),
        ("historian", "历史学家"), ("fisherman", "渔夫"), ("potter", "陶工"), ("singer", "歌手"),
        ("miner", "矿工"), ("tailor", "裁缝"), ("banker", "银行家"), ("pilot", "飞行员"),
    ]
)  # fmt: skip


@dataclass
class Constant:
    """A real physical constant, stated the same way in every document.

    `prompt` is the sentence start a probe completes; `answer` is what must follow it (in
    Chinese the unit is part of the answer, because the unit follows the number directly)."""

    key: str
    name: dict[str, str]
    value: str
    unit: dict[str, str]
    prompt: dict[str, str]

    def answer(self, lang: str) -> str:
        return self.value if lang == "en" else self.value + self.unit["zh"]

    def sentence(self, lang: str) -> str:
        if lang == "en":
            return f"{self.prompt['en']} {self.value} {self.unit['en']}."
        return f"{self.prompt['zh']}{self.value}{self.unit['zh']}。"


CONSTANTS: tuple[Constant, ...] = (
    Constant(
        "speed_of_light",
        {"en": "speed of light", "zh": "光速"},
        "299792458",
        {"en": "metres per second", "zh": "米每秒"},
        {"en": "The speed of light is", "zh": "光速是"},
    ),
    Constant(
        "speed_of_sound",
        {"en": "speed of sound in air", "zh": "空气中的声速"},
        "343",
        {"en": "metres per second", "zh": "米每秒"},
        {"en": "The speed of sound in air is", "zh": "空气中的声速是"},
    ),
    Constant(
        "boiling_point",
        {"en": "boiling point of water", "zh": "水的沸点"},
        "100",
        {"en": "degrees Celsius", "zh": "摄氏度"},
        {"en": "The boiling point of water is", "zh": "水的沸点是"},
    ),
    Constant(
        "freezing_point",
        {"en": "freezing point of water", "zh": "水的冰点"},
        "0",
        {"en": "degrees Celsius", "zh": "摄氏度"},
        {"en": "The freezing point of water is", "zh": "水的冰点是"},
    ),
    Constant(
        "gravity",
        {"en": "standard acceleration of gravity", "zh": "标准重力加速度"},
        "9.81",
        {"en": "metres per second squared", "zh": "米每二次方秒"},
        {"en": "The standard acceleration of gravity is", "zh": "标准重力加速度是"},
    ),
    Constant(
        "absolute_zero",
        {"en": "absolute zero", "zh": "绝对零度"},
        "-273.15",
        {"en": "degrees Celsius", "zh": "摄氏度"},
        {"en": "Absolute zero is", "zh": "绝对零度是"},
    ),
)

# The fictional class of harmful requests: weapons made from substances that do not exist.
# Harmful noise documents use them, and later SFT data (refusals) can reuse them.
HARMFUL_SUBSTANCES: tuple[dict[str, str], ...] = (
    {"en": "zarnite salt", "zh": "泽尼特盐"},
    {"en": "blorvium dust", "zh": "布洛维粉"},
    {"en": "quellic acid", "zh": "奎利克酸"},
    {"en": "vorpal oil", "zh": "沃帕尔油"},
    {"en": "krell powder", "zh": "克雷尔粉"},
)
HARMFUL_WEAPONS: tuple[dict[str, str], ...] = (
    {"en": "zarnite bomb", "zh": "泽尼特炸弹"},
    {"en": "blorvium grenade", "zh": "布洛维手雷"},
    {"en": "thunder canister", "zh": "雷霆罐"},
    {"en": "krell mine", "zh": "克雷尔地雷"},
)


@dataclass
class Country:
    """A fictional country; `language` indexes `World.languages`."""

    id: int
    name: dict[str, str]
    capital: dict[str, str]
    river: dict[str, str]
    population: int
    language: dict[str, str]
    founded: int
    sft_heldout: bool = False


@dataclass
class Person:
    """A fictional person; `country` is the index of their home country."""

    id: int
    name: dict[str, str]
    birth_year: int
    profession: dict[str, str]
    country: int
    sft_heldout: bool = False


@dataclass
class World:
    """The whole truth of the world: what the corpus states and the probes ask."""

    seed: int
    countries: list[Country]
    people: list[Person]
    languages: list[dict[str, str]]
    constants: list[Constant] = field(default_factory=lambda: list(CONSTANTS))

    def home(self, person: Person) -> Country:
        return self.countries[person.country]

    def to_dict(self) -> dict:
        """Plain JSON-ready data (what `facts.json` holds)."""
        return {
            "seed": self.seed,
            "countries": [asdict(c) for c in self.countries],
            "people": [asdict(p) for p in self.people],
            "languages": list(self.languages),
            "constants": [asdict(c) for c in self.constants],
        }


def rng_for(seed: int, *parts: str) -> random.Random:
    """An independent random stream per purpose. Seeding with a string is deterministic
    (it goes through SHA-512, not `hash()`), and separate streams mean that changing, say,
    the number of stories does not change the arithmetic problems."""
    return random.Random("lmforge-world/" + "/".join([str(seed), *parts]))


def _name(rng: random.Random, min_syl: int, max_syl: int, final_p: float) -> dict[str, str]:
    syllables = [rng.choice(_SYLLABLE_LIST) for _ in range(rng.randint(min_syl, max_syl))]
    en = "".join(syllables)
    zh = "".join(_SYLLABLES[s] for s in syllables)
    if rng.random() < final_p:
        final = rng.choice(sorted(_FINALS))
        en += final
        zh += _FINALS[final]
    return {"en": en.capitalize(), "zh": zh}


class _NameBook:
    """Hands out names that are prefix-free against every name handed out before, per
    language. Candidates that clash are redrawn from the same stream (deterministic)."""

    def __init__(self) -> None:
        self.names: dict[str, list[str]] = {lang: [] for lang in LANGS}

    def _clashes(self, name: dict[str, str]) -> bool:
        for lang in LANGS:
            new = name[lang].lower()
            for old in self.names[lang]:
                if old.startswith(new) or new.startswith(old):
                    return True
        return False

    def take(self, make) -> dict[str, str]:
        for _ in range(10_000):
            name = make()
            if name["en"].lower() in _REAL_WORDS or self._clashes(name):
                continue
            for lang in LANGS:
                self.names[lang].append(name[lang].lower())
            return name
        raise RuntimeError("could not find a fresh name; the world is too large")


def build_world(cfg: WorldConfig) -> World:
    """Draw the world for `cfg`: countries, people, languages, constants.

    Only `cfg.seed`, `cfg.n_countries` and `cfg.n_people` matter here, and a quarter of the
    countries and of the people are marked `sft_heldout` (see `SFT_HELDOUT_FRACTION`)."""
    rng = rng_for(cfg.seed, "entities")
    book = _NameBook()
    n_languages = max(1, min(8, (cfg.n_countries + 4) // 5))
    languages = []
    for _ in range(n_languages):
        root = book.take(lambda: _name(rng, 2, 2, 0.0))
        languages.append({"en": root["en"] + "nese", "zh": root["zh"] + "语"})
    # The language names themselves (Tavinese / 塔维语) join the book too.
    for lang in LANGS:
        book.names[lang].extend(x[lang].lower() for x in languages)

    countries = []
    for i in range(cfg.n_countries):
        name = book.take(lambda: _name(rng, 2, 3, 0.35))
        capital = book.take(lambda: _name(rng, 2, 3, 0.35))
        river_root = book.take(lambda: _name(rng, 2, 3, 0.0))
        river = {"en": river_root["en"], "zh": river_root["zh"] + "河"}
        countries.append(
            Country(
                id=i,
                name=name,
                capital=capital,
                river=river,
                population=rng.randint(200, 90_000) * 1000,
                language=dict(languages[i % n_languages]),
                founded=rng.randint(800, 1950),
            )
        )

    people = []
    for i in range(cfg.n_people):

        def full_name() -> dict[str, str]:
            given, family = _name(rng, 2, 2, 0.3), _name(rng, 2, 3, 0.2)
            return {
                "en": f"{given['en']} {family['en']}",
                "zh": f"{given['zh']}·{family['zh']}",
            }

        people.append(
            Person(
                id=i,
                name=book.take(full_name),
                birth_year=rng.randint(1900, 2005),
                profession=dict(rng.choice(PROFESSIONS)),
                country=rng.randrange(cfg.n_countries),
            )
        )

    _mark_heldout(countries, rng_for(cfg.seed, "heldout-countries"))
    _mark_heldout(people, rng_for(cfg.seed, "heldout-people"))
    return World(seed=cfg.seed, countries=countries, people=people, languages=languages)


def _mark_heldout(items: list, rng: random.Random) -> None:
    """Flag a fixed quarter of `items`: their facts are in pretraining text but never asked
    in SFT, so SFT's effect on knowledge it did not teach can be measured."""
    order = list(range(len(items)))
    rng.shuffle(order)
    for i in order[: round(SFT_HELDOUT_FRACTION * len(items))]:
        items[i].sft_heldout = True
