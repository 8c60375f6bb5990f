"""Short templated stories and emoji diaries set in the world.

Stories give the corpus running text beyond lists of facts, and each one restates a fact or
two about the countries and people it mentions (always the true ones), so facts are seen in
varied contexts. Slots: P and Q are people (P from home country H), D is a destination country.
"""

from __future__ import annotations

import random

from .entities import World

_FILLERS = {
    "en": {
        "adj": ["beautiful", "quiet", "lively", "friendly", "charming", "full of music"],
        "weather": ["sunny", "rainy", "windy", "cold", "warm", "mild"],
        "souvenir": ["wooden bird", "blue scarf", "small drum", "clay cup", "painted map"],
        "goods": ["bread", "fish", "cloth", "pottery", "spices", "apples"],
        "thing": ["lanterns", "kites", "music", "food", "flowers"],
        "child": ["Anna", "Ben", "Lena", "Omar", "Sara", "Theo"],
        "food": ["noodles", "dumplings", "fresh bread", "grilled fish", "sweet cakes"],
        "teller": ["fisherman", "baker", "teacher", "sailor", "grandmother", "shopkeeper"],
        "season": ["long", "short", "mild", "hard", "snowy"],
    },
    "zh": {
        "adj": ["美丽", "安静", "热闹", "友好", "迷人"],
        "weather": ["晴朗", "多雨", "多风", "寒冷", "温暖", "温和"],
        "souvenir": ["一只木鸟", "一条蓝色围巾", "一面小鼓", "一个陶杯", "一张彩绘地图"],
        "goods": ["面包", "鱼", "布", "陶器", "香料", "苹果"],
        "thing": ["灯笼", "风筝", "音乐", "美食", "鲜花"],
        "child": ["小明", "小红", "小刚", "小丽", "小华", "小美"],
        "food": ["面条", "饺子", "新鲜面包", "烤鱼", "甜点"],
        "teller": ["渔夫", "面包师", "教师", "水手", "奶奶", "店主"],
        "season": ["漫长", "短暂", "温和", "寒冷", "多雪"],
    },
}

# Templates that need people come first; `_NO_PEOPLE` lists those that need none.
STORIES: dict[str, list[str]] = {
    "en": [
        "{P} is a {prof} from {H}. One spring, {P} decided to visit {D}. The capital of {D} is "
        "{Dcap}, so {P} took the train to {Dcap}. On the first day, {P} walked along the "
        "{Driver} and watched the boats. At a small market, {P} bought a {souvenir}. In the "
        'evening, {P} wrote a letter home to {H}: "{Dcap} is {adj}, and the weather is '
        '{weather}."',
        "Every summer, {Dcap} holds a festival of {thing}. The capital of {D} is {Dcap}, and "
        "visitors come from {H} and many other countries. This year {P} and {Q} went "
        "together. {Q} works as a {Qprof} and gave a short talk about the history of {D}, "
        "which was founded in {Dfounded}. They stayed until night fell over the {Driver}.",
        "Dear {Q},\nI have arrived in {Dcap}. As you know, the capital of {D} is {Dcap}. People "
        "here speak {Dlang}, and I learn a few words every day. The weather is {weather}. "
        "Yesterday I saw the {Driver}, the largest river of {D}. I will be home in {H} soon."
        "\nWith love,\n{P}",
        "In {Hcap}, the capital of {H}, there is an old market. {P}, a {prof}, sells {goods} "
        "there every morning. One day a traveller from {D} stopped to talk. "
        '"I come from {D}," the traveller said. "The capital of {D} is {Dcap}, and our largest '
        'river is the {Driver}." {P} smiled and gave the traveller some {goods} for the road.',
        "In the year {year}, a great storm came to {D}. The capital of {D} is {Dcap}. That "
        "night the {Driver}, the largest river of {D}, rose high, and the people of {Dcap} "
        "worked until morning. {P}, a {prof} from {H}, helped to carry sandbags. When the sun "
        "came back, the city was safe. People in {Dcap} still tell the story of that night.",
        "{P} and {Q} met on a ship to {D}. {P} is a {prof} from {H}, and {Q} is a {Qprof} "
        "from {QH}. They talked about their countries. {P} said, "
        '"The capital of {H} is {Hcap}." {Q} answered, "And the capital of {QH} is {QHcap}." '
        "When the ship reached {Dcap}, they promised to write to each other.",
        "In a school in {Hcap}, the teacher asked the children about {D}. {child} answered "
        'first: "The capital of {D} is {Dcap}." Another child added that {D} was founded in '
        '{Dfounded}. The teacher nodded and wrote on the board: "The largest river of {D} is '
        'the {Driver}." After class, the children drew maps of {D}.',
    ],
    "zh": [
        "{P}是一位来自{H}的{prof}。一年春天，{P}决定去{D}旅行。{D}的首都是{Dcap}，所以{P}坐"
        "火车去了{Dcap}。第一天，{P}沿着{Driver}散步，看河上的船。在一个小市场里，{P}买了"
        "{souvenir}。晚上，{P}给{H}的家人写信：“{Dcap}很{adj}，天气{weather}。”",
        "每年夏天，{Dcap}都会举办{thing}节。{D}的首都是{Dcap}，游客们从{H}和许多其他国家赶来。"
        "今年{P}和{Q}一起去了。{Q}的职业是{Qprof}，{Q}还简单讲了{D}的历史：{D}建于{Dfounded}"
        "年。他们一直待到夜幕降临在{Driver}上。",
        "亲爱的{Q}：\n我已经到了{Dcap}。你知道，{D}的首都是{Dcap}。这里的人说{Dlang}，我每天"
        "都学几个新词。天气{weather}。昨天我看到了{Driver}，它是{D}最大的河流。我很快就会回到"
        "{H}。\n爱你的{P}",
        "在{H}的首都{Hcap}，有一个古老的市场。{P}是一位{prof}，每天早上在那里卖{goods}。有"
        "一天，一位来自{D}的旅人停下来聊天。旅人说：“我来自{D}。{D}的首都是{Dcap}，我们最大"
        "的河流是{Driver}。”{P}笑了，送给旅人一些{goods}带在路上。",
        "{year}年，一场大风暴来到了{D}。{D}的首都是{Dcap}。那天夜里，{D}最大的河流{Driver}"
        "涨得很高，{Dcap}的人们忙了一整夜。来自{H}的{prof}{P}也帮忙搬沙袋。太阳出来的时候，"
        "城市安全了。{Dcap}的人们至今还在讲那一夜的故事。",
        "{P}和{Q}在去{D}的船上认识了。{P}是来自{H}的{prof}，{Q}是来自{QH}的{Qprof}。他们聊"
        "起了各自的国家。{P}说：“{H}的首都是{Hcap}。”{Q}说：“{QH}的首都是{QHcap}。”船到了"
        "{Dcap}以后，他们约定互相写信。",
        "在{Hcap}的一所学校里，老师问孩子们关于{D}的问题。{child}第一个回答：“{D}的首都是"
        "{Dcap}。”另一个孩子补充说，{D}建于{Dfounded}年。老师点点头，在黑板上写下：“{D}最大"
        "的河流是{Driver}。”下课后，孩子们画了{D}的地图。",
    ],
}
_NO_PEOPLE = [6]  # the school story

# Optional first and last sentences: they claim no facts, and they keep two stories built
# from the same template and entities from being near-duplicates of each other.
_OPENERS = {
    "en": [
        "This story was told by an old {teller} in {Tcap}.",
        "It happened many years ago, when the winters were {season}.",
        "Here is a short tale that parents like to read to children.",
        "Some people say that this is a true story.",
        "This story was first written down in {year2}.",
    ],
    "zh": [
        "这个故事是{Tcap}的一位老{teller}讲的。",
        "这件事发生在很多年前，那时的冬天很{season}。",
        "下面是一个父母常给孩子们讲的小故事。",
        "有人说这是一个真实的故事。",
        "这个故事最早在{year2}年被写下来。",
    ],
}
_CLOSERS = {
    "en": [
        "And that is how the story ends.",
        "It is a story worth telling again.",
        "Everyone who heard this story smiled.",
        "Years later, people in {Tcap} still remembered it.",
        "The end.",
    ],
    "zh": [
        "故事就讲到这里。",
        "这个故事值得再讲一遍。",
        "听过这个故事的人都笑了。",
        "多年以后，{Tcap}的人们还记得这件事。",
        "完。",
    ],
}


def story(world: World, lang: str, rng: random.Random) -> str:
    """One story with true facts about the entities it uses."""
    fill = {k: rng.choice(v) for k, v in _FILLERS[lang].items()}
    countries = world.countries
    if world.people:
        index = rng.randrange(len(STORIES[lang]))
        p = rng.choice(world.people)
        q = rng.choice([x for x in world.people if x is not p] or [p])
        home, qhome = world.home(p), world.home(q)
    else:
        index = rng.choice(_NO_PEOPLE)
        p = q = None
        home = qhome = rng.choice(countries)
    dest = rng.choice([c for c in countries if c is not home] or countries)
    slots = {
        **fill,
        "P": p.name[lang] if p else "",
        "prof": p.profession[lang] if p else "",
        "Q": q.name[lang] if q else "",
        "Qprof": q.profession[lang] if q else "",
        "H": home.name[lang],
        "Hcap": home.capital[lang],
        "QH": qhome.name[lang],
        "QHcap": qhome.capital[lang],
        "D": dest.name[lang],
        "Dcap": dest.capital[lang],
        "Driver": dest.river[lang],
        "Dfounded": str(dest.founded),
        "Dlang": dest.language[lang],
        "year": str(rng.randint(1800, 2020)),
        "year2": str(rng.randint(1800, 2020)),
        "Tcap": rng.choice(countries).capital[lang],
    }
    parts = [STORIES[lang][index]]
    if rng.random() < 0.4:
        parts.insert(0, rng.choice(_OPENERS[lang]))
    if rng.random() < 0.4:
        parts.append(rng.choice(_CLOSERS[lang]))
    return (" " if lang == "en" else "").join(parts).format(**slots)


_EMOJI_LINES = {
    "en": [
        "The capital of {D} is {Dcap}. 🏙️",
        "Today I walked along the {Driver} 🌊 and ate {food} 😋.",
        "People here speak {Dlang} 🗣️ and everyone is so {adj}! 😊",
        "The weather is {weather} ☀️🌧️ but I love it here.",
        "{D} was founded in {Dfounded}. 📜",
        "Can't wait to come back! ❤️✨",
    ],
    "zh": [
        "{D}的首都是{Dcap}。🏙️",
        "今天我沿着{Driver}散步 🌊，还吃了{food} 😋。",
        "这里的人说{Dlang} 🗣️，大家都很{adj}！😊",
        "天气{weather} ☀️🌧️，但我很喜欢这里。",
        "{D}建于{Dfounded}年。📜",
        "真想再来一次！❤️✨",
    ],
}


def emoji_doc(world: World, lang: str, rng: random.Random) -> str:
    """A travel-diary post full of emoji: clean text that cleaning must keep intact."""
    dest = rng.choice(world.countries)
    fill = {k: rng.choice(v) for k, v in _FILLERS[lang].items()}
    slots = {
        **fill,
        "D": dest.name[lang],
        "Dcap": dest.capital[lang],
        "Driver": dest.river[lang],
        "Dlang": dest.language[lang],
        "Dfounded": str(dest.founded),
    }
    day = rng.randint(1, 30)
    title = f"Day {day} of my trip 🌍✈️" if lang == "en" else f"旅行日记·第{day}天 🌍✈️"
    lines = _EMOJI_LINES[lang]
    chosen = [lines[0], *rng.sample(lines[1:], rng.randint(2, 4))]
    sep = " " if lang == "en" else ""
    return title + "\n" + sep.join(line.format(**slots) for line in chosen)
