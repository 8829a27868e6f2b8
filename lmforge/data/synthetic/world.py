"""A small fictional world (people, cities, countries, companies) built deterministically from a seed.

Why: lmforge has no downloadable data, so every stage trains and measures itself on text generated from
this world. It is small enough that a tiny model can learn its facts, and structured enough that later
stages (SFT, multiple choice, preference, RAG, tools) can ask questions whose answers are known exactly.
Only `random.Random(<str seed>)` is used (seeded through SHA-512, not `hash()`), and every collection is
built in a fixed order, so the same seed gives the same world on any machine and Python >= 3.10.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable

from lmforge.config import opt

REFERENCE_YEAR = 2024  # "this year" inside the world: ages are counted from it

# Closed vocabularies, (English, Chinese). Order matters: it is part of what the seed reproduces.
OCCUPATIONS = (("teacher", "教师"), ("doctor", "医生"), ("engineer", "工程师"), ("farmer", "农民"),
               ("nurse", "护士"), ("painter", "画家"), ("chef", "厨师"), ("lawyer", "律师"),
               ("pilot", "飞行员"), ("baker", "面包师"), ("journalist", "记者"), ("architect", "建筑师"),
               ("musician", "音乐家"), ("librarian", "图书管理员"), ("accountant", "会计"),
               ("carpenter", "木匠"), ("scientist", "科学家"), ("photographer", "摄影师"),
               ("dentist", "牙医"), ("writer", "作家"))
COLOURS = (("red", "红色"), ("blue", "蓝色"), ("green", "绿色"), ("yellow", "黄色"), ("purple", "紫色"),
           ("orange", "橙色"), ("white", "白色"), ("black", "黑色"), ("pink", "粉色"), ("grey", "灰色"),
           ("brown", "棕色"))
FOODS = (("noodles", "面条"), ("dumplings", "饺子"), ("rice", "米饭"), ("apples", "苹果"), ("bread", "面包"),
         ("fish", "鱼"), ("tomato soup", "番茄汤"), ("cheese", "奶酪"), ("chocolate", "巧克力"),
         ("mangoes", "芒果"), ("pizza", "披萨"), ("tofu", "豆腐"), ("honey", "蜂蜜"), ("grapes", "葡萄"))
PETS = (("cat", "猫"), ("dog", "狗"), ("parrot", "鹦鹉"), ("rabbit", "兔子"), ("goldfish", "金鱼"),
        ("turtle", "乌龟"), ("hamster", "仓鼠"))
ANIMALS = (("eagle", "鹰"), ("bear", "熊"), ("deer", "鹿"), ("wolf", "狼"), ("swan", "天鹅"),
           ("tiger", "老虎"), ("horse", "马"), ("crane", "鹤"), ("fox", "狐狸"), ("owl", "猫头鹰"))
INDUSTRIES = (("software", "软件"), ("food", "食品"), ("shipping", "航运"), ("textile", "纺织"),
              ("energy", "能源"), ("pharmaceutical", "医药"), ("publishing", "出版"), ("tourism", "旅游"),
              ("construction", "建筑"), ("furniture", "家具"), ("toy", "玩具"), ("electronics", "电子"))
VOCABULARIES: dict[str, tuple[tuple[str, str], ...]] = {
    "occupation": OCCUPATIONS, "colour": COLOURS, "food": FOODS, "pet": PETS, "animal": ANIMALS,
    "industry": INDUSTRIES,
}
ENTITY_KINDS = ("person", "city", "country", "company")

# (subject kind) -> ((relation, object type), ...). Object types: an entity kind, a vocabulary name,
# or a number type ("age", "year", "population", "count") that decides how the number is written.
SCHEMA: dict[str, tuple[tuple[str, str], ...]] = {
    "person": (("age", "age"), ("birth_year", "year"), ("occupation", "occupation"), ("born_in", "city"),
               ("lives_in", "city"), ("works_at", "company"), ("favourite_colour", "colour"),
               ("favourite_food", "food"), ("pet", "pet"), ("friend_of", "person")),
    "city": (("located_in", "country"), ("population", "population"), ("founded_year", "year")),
    "country": (("capital", "city"), ("population", "population"), ("national_animal", "animal")),
    "company": (("industry", "industry"), ("founded_year", "year"), ("headquartered_in", "city"),
                ("founded_by", "person"), ("employees", "count")),
}
NUMBER_TYPES = ("age", "year", "population", "count")
SYMMETRIC_RELATIONS = frozenset({"friend_of"})  # (a, r, b) implies (b, r, a): both are right answers


@dataclass
class WorldConfig:
    """How many entities of each kind the world holds (the seed comes from the corpus config)."""
    num_people: int = opt(120, "people whose facts appear in the pretraining corpus")
    num_cities: int = opt(24, "cities (each country gets at least one)")
    num_countries: int = opt(6, "countries")
    num_companies: int = opt(24, "companies")
    num_held_out_people: int = opt(24, "people kept out of the pretraining corpus (RAG documents only)")


@dataclass
class Entity:
    """One thing in the world; `attrs` maps relation -> int, vocabulary word (English) or entity id."""
    id: str
    kind: str
    name_en: str
    name_zh: str
    attrs: dict[str, int | str] = field(default_factory=dict)
    gender: str = ""  # "f" or "m" for people; decides pronouns
    held_out: bool = False

    def name(self, lang: str) -> str:
        return self.name_zh if lang == "zh" else self.name_en


@dataclass(frozen=True)
class Fact:
    """One (subject, relation, object) triple with its surface forms in both languages."""
    subject: str        # entity id
    kind: str           # subject's kind
    relation: str
    object: int | str   # number, vocabulary word (English) or entity id
    object_type: str
    subject_en: str
    subject_zh: str
    object_en: str
    object_zh: str

    @property
    def fact_id(self) -> str:
        return f"{self.subject}/{self.relation}"

    def subject_name(self, lang: str) -> str:
        return self.subject_zh if lang == "zh" else self.subject_en

    def object_text(self, lang: str) -> str:
        return self.object_zh if lang == "zh" else self.object_en


def format_number(value: int, object_type: str, lang: str) -> str:
    """A number as the world's text writes it: "1,240,000" / "124万" for populations, "3,200" for counts."""
    if object_type == "population" and lang == "zh":
        return f"{value // 10000}万" if value % 10000 == 0 else f"{value / 10000:g}万"
    if object_type in ("population", "count") and lang == "en":
        return f"{value:,}"
    return str(value)


@dataclass
class World:
    """The entities plus derived indexes; build it with `make_world`, never by hand."""
    seed: int
    config: WorldConfig
    entities: dict[str, Entity]
    _facts: list[Fact] = field(init=False, repr=False)
    _by_key: dict[tuple[str, str], Fact] = field(init=False, repr=False)
    _by_name: dict[str, Entity] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._facts = [self._make_fact(e, rel, otype)
                       for e in self.entities.values() for rel, otype in SCHEMA[e.kind] if rel in e.attrs]
        self._by_key = {(f.subject, f.relation): f for f in self._facts}
        self._by_name = {}
        for e in self.entities.values():
            self._by_name[e.name_en.lower()] = e
            self._by_name[e.name_zh] = e

    def _make_fact(self, entity: Entity, relation: str, object_type: str) -> Fact:
        value = entity.attrs[relation]
        return Fact(entity.id, entity.kind, relation, value, object_type, entity.name_en, entity.name_zh,
                    self.value_text(value, object_type, "en"), self.value_text(value, object_type, "zh"))

    def value_text(self, value: int | str, object_type: str, lang: str) -> str:
        """How an object value reads in `lang`: entity name, vocabulary word or formatted number."""
        if object_type in NUMBER_TYPES:
            return format_number(int(value), object_type, lang)
        if object_type in ENTITY_KINDS:
            return self.entities[str(value)].name(lang)
        words = dict(VOCABULARIES[object_type])
        return str(value) if lang == "en" else words[str(value)]

    def entity(self, entity_id: str) -> Entity:
        return self.entities[entity_id]

    def of_kind(self, kind: str, held_out: bool | None = False) -> list[Entity]:
        """Entities of one kind; held_out=None gives both the corpus and the held-out ones."""
        return [e for e in self.entities.values() if e.kind == kind and (held_out is None or e.held_out == held_out)]

    def facts(self, held_out: bool = False) -> list[Fact]:
        """Facts about corpus entities (default) or, with held_out=True, about the RAG-only people."""
        return [f for f in self._facts if self.entities[f.subject].held_out == held_out]

    def facts_about(self, entity_id: str) -> list[Fact]:
        return [self._by_key[(entity_id, rel)] for rel, _ in SCHEMA[self.entities[entity_id].kind]
                if (entity_id, rel) in self._by_key]

    def fact(self, subject: str, relation: str) -> Fact:
        return self._by_key[(subject, relation)]

    def valid_objects(self, subject: str, relation: str) -> set[int | str]:
        """Every object that makes (subject, relation, ?) true, counting symmetric relations both ways."""
        found = {f.object for f in self._facts if f.subject == subject and f.relation == relation}
        if relation in SYMMETRIC_RELATIONS:
            found |= {f.subject for f in self._facts if f.relation == relation and f.object == subject}
        return found

    def object_pool(self, kind: str, relation: str) -> list[tuple[int | str, str, str]]:
        """Distinct (value, English, Chinese) a (kind, relation) can take: the source of distractors.

        Only corpus entities and corpus values are offered, so a wrong option is never a name the model
        could reject merely for never having seen it.
        """
        object_type = dict(SCHEMA[kind])[relation]
        if object_type in VOCABULARIES:
            values: list[int | str] = [en for en, _ in VOCABULARIES[object_type]]
        elif object_type in ENTITY_KINDS:
            values = [e.id for e in self.of_kind(object_type)]
        else:
            values = sorted({f.object for f in self.facts() if f.kind == kind and f.relation == relation})
        return [(v, self.value_text(v, object_type, "en"), self.value_text(v, object_type, "zh")) for v in values]

    def find(self, name: str) -> Entity | None:
        """The entity called `name` (English, case-insensitive, or Chinese), or None."""
        return self._by_name.get(name.strip().lower()) or self._by_name.get(name.strip())

    def lookup(self, name: str, relation: str, lang: str = "en") -> str | None:
        """Backend of the agents' lookup tool: numbers as plain digits, everything else as a name/word."""
        entity = self.find(name)
        fact = self._by_key.get((entity.id, relation)) if entity else None
        if fact is None:
            return None
        return str(fact.object) if fact.object_type in NUMBER_TYPES else fact.object_text(lang)

    def summary(self) -> dict[str, int]:
        """Entity and fact counts, for manifests."""
        plural = {"person": "people", "city": "cities", "country": "countries", "company": "companies"}
        out = {plural[k]: len(self.of_kind(k, held_out=None)) for k in ENTITY_KINDS}
        out.update(held_out_people=len(self.of_kind("person", held_out=True)), facts=len(self.facts()),
                   held_out_facts=len(self.facts(held_out=True)))
        return out


# ---- names -----------------------------------------------------------------------------------------------
_ONSETS = ("b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z",
           "br", "cl", "dr", "fl", "gr", "st", "th", "tr")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea")
_MIDS = ("l", "r", "n", "v", "d", "s", "m", "th", "nd", "")
_CODAS = ("n", "r", "l", "s", "m", "x", "")
_EN_GIVEN_END = {"f": ("a", "ia", "elle", "ine", "ie", "ora", "eth"), "m": ("o", "an", "en", "ik", "as", "us", "or", "el")}
_EN_SURNAME_END = ("ley", "son", "by", "well", "more", "ner", "ard", "ett", "ington", "ton")
_EN_CITY_END = ("vale", "port", "mouth", "haven", "field", "bridge", "burgh", "stead", "crest", "holm")
_EN_COUNTRY_END = ("ia", "land", "ora", "avia", "onia", "esh")
_EN_COMPANY_END = (" Group", " Holdings", " Works", " Partners", " Industries", " Company")
_ZH_SURNAMES = "李王张刘陈杨赵黄周吴徐孙胡朱高林何郭马罗梁宋郑谢韩唐冯于董萧程曹袁邓许傅沈曾彭吕苏卢蒋蔡贾丁魏薛叶阎余潘杜戴夏钟汪田任姜范方石姚谭"
_ZH_GIVEN = {"m": "明伟强磊军勇杰涛斌浩宇鹏辉刚建国峰超轩博文俊凯晨龙毅健平亮志航",
             "f": "丽芳娜静敏燕艳娟霞婷雪琳欣怡慧玲颖洁倩萍佳悦梅兰月秀红蕾薇晴"}
_ZH_CITY_1 = "北南东西青白金石清新长安平云松桃柳龙凤宁丰临永兴福"
_ZH_CITY_2 = "河山江湖阳州原林泉桥溪岭川港门口田坪湾"
_ZH_COUNTRY_1 = "阿巴贝达埃菲格卡拉马诺奥萨塔维泽索莫"
_ZH_COUNTRY_2 = "尔兰里纳维斯塔德洛米瓦拉"
_ZH_COUNTRY_END = ("亚", "尼亚", "国", "兰", "多")
_ZH_COMPANY = "华创信达腾远恒盛博瑞鑫宏佳金天海联汇鼎康泰星嘉誉润"
_ZH_COMPANY_END = ("集团", "公司", "控股", "实业")


class _NameBook:
    """Hands out names that are unique and never contained in one another, so a name in a text is unambiguous."""

    def __init__(self) -> None:
        self.used: dict[str, list[str]] = {"en": [], "zh": []}

    def claim(self, lang: str, make: Callable[[], str]) -> str:
        for _ in range(10_000):
            name = make()
            if all(name not in u and u not in name for u in self.used[lang]):
                self.used[lang].append(name)
                return name
        raise ValueError(f"ran out of {lang} names after {len(self.used[lang])}: ask for a smaller world")


def _syllable(rng: random.Random, tail: tuple[str, ...]) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(tail)


def _name_makers(rng: random.Random, kind: str, gender: str = "") -> tuple[Callable[[], str], Callable[[], str]]:
    """(English maker, Chinese maker) for one entity kind."""
    c = rng.choice
    if kind == "person":
        return (lambda: (_syllable(rng, _MIDS) + c(_EN_GIVEN_END[gender])).capitalize() + " "
                + (_syllable(rng, _CODAS) + c(_EN_SURNAME_END)).capitalize(),
                lambda: c(_ZH_SURNAMES) + "".join(c(_ZH_GIVEN[gender]) for _ in range(1 + (rng.random() < 0.6))))
    if kind == "city":
        return (lambda: (_syllable(rng, _CODAS) + c(_EN_CITY_END)).capitalize(),
                lambda: c(_ZH_CITY_1) + c(_ZH_CITY_2) + "市")
    if kind == "country":
        return (lambda: (_syllable(rng, _MIDS) + c(_EN_COUNTRY_END)).capitalize(),
                lambda: c(_ZH_COUNTRY_1) + c(_ZH_COUNTRY_2) + c(_ZH_COUNTRY_END))
    return (lambda: (_syllable(rng, ("x", "tr", "v", "l", "n", "k", "nd", "st")) + c(("a", "o", "is", "on", "ex", "ia"))).capitalize()
            + c(_EN_COMPANY_END),
            lambda: "".join(rng.sample(_ZH_COMPANY, 2)) + c(_ZH_COMPANY_END))


def _new_entity(rng: random.Random, names: _NameBook, kind: str, index: int, gender: str = "") -> Entity:
    make_en, make_zh = _name_makers(rng, kind, gender)
    return Entity(f"{kind}-{index:04d}", kind, names.claim("en", make_en), names.claim("zh", make_zh), gender=gender)


def _log_uniform(rng: random.Random, low: int, high: int, step: int) -> int:
    """A skewed size (many small towns, few big cities), rounded to `step`."""
    value = low * (high / low) ** rng.random()
    return max(step, int(round(value / step)) * step)


def _pair_friends(rng: random.Random, group: list[Entity], fallback: list[Entity]) -> None:
    """Pair people as mutual best friends; an odd one out befriends someone without being befriended back."""
    order = group[:]
    rng.shuffle(order)
    for a, b in zip(order[0::2], order[1::2]):
        a.attrs["friend_of"], b.attrs["friend_of"] = b.id, a.id
    if len(order) % 2:
        pool = order[:-1] or fallback
        if pool:
            order[-1].attrs["friend_of"] = rng.choice(pool).id


def make_world(seed: int = 0, num_people: int = 120, num_cities: int = 24, num_countries: int = 6,
               num_companies: int = 24, num_held_out_people: int = 24) -> World:
    """Build the world for `seed`; same arguments give the same world, byte for byte, on any machine."""
    config = WorldConfig(num_people, num_cities, num_countries, num_companies, num_held_out_people)
    if num_countries < 1 or num_cities < num_countries or num_people < 2 or num_companies < 1 or num_held_out_people < 0:
        raise ValueError(f"impossible world {config}: need >=1 country, cities >= countries, >=2 people, >=1 company")
    rng = random.Random(f"lmforge-world:{seed}")
    names = _NameBook()
    countries = [_new_entity(rng, names, "country", i) for i in range(num_countries)]
    cities = [_new_entity(rng, names, "city", i) for i in range(num_cities)]
    companies = [_new_entity(rng, names, "company", i) for i in range(num_companies)]
    people = [_new_entity(rng, names, "person", i, rng.choice("fm")) for i in range(num_people + num_held_out_people)]

    for i, city in enumerate(cities):
        country = countries[i] if i < num_countries else rng.choice(countries)
        city.attrs.update(located_in=country.id, population=_log_uniform(rng, 20_000, 3_000_000, 1000),
                          founded_year=rng.randint(700, 1950))
    for country in countries:
        own = [c for c in cities if c.attrs["located_in"] == country.id]
        capital = max(own, key=lambda c: (c.attrs["population"], c.id))
        total = sum(int(c.attrs["population"]) for c in own) * rng.uniform(1.5, 4.0)
        country.attrs.update(capital=capital.id, population=int(round(total / 10_000)) * 10_000,
                             national_animal=rng.choice(ANIMALS)[0])
    for company in companies:
        company.attrs.update(industry=rng.choice(INDUSTRIES)[0], headquartered_in=rng.choice(cities).id,
                             employees=_log_uniform(rng, 20, 20_000, 10))
    for person in people:
        age = rng.randint(20, 79)
        born_in = rng.choice(cities)
        lives_in = born_in if rng.random() < 0.3 else rng.choice(cities)
        local = [c for c in companies if c.attrs["headquartered_in"] == lives_in.id]
        person.attrs.update(age=age, birth_year=REFERENCE_YEAR - age, occupation=rng.choice(OCCUPATIONS)[0],
                            born_in=born_in.id, lives_in=lives_in.id,
                            works_at=rng.choice(local if local and rng.random() < 0.7 else companies).id,
                            favourite_colour=rng.choice(COLOURS)[0], favourite_food=rng.choice(FOODS)[0],
                            pet=rng.choice(PETS)[0])
    corpus_people, held_out = people[:num_people], people[num_people:]
    for person in held_out:
        person.held_out = True
    # Friends and founders come from inside each group, so no held-out name leaks into the corpus.
    _pair_friends(rng, corpus_people, [])
    _pair_friends(rng, held_out, corpus_people)
    founders = [p for p in corpus_people if int(p.attrs["age"]) >= 30] or corpus_people
    for company in companies:
        founder = rng.choice(founders)
        age = int(founder.attrs["age"])
        founded = int(founder.attrs["birth_year"]) + rng.randint(min(25, age - 1), max(age - 1, 1))
        company.attrs.update(founded_by=founder.id, founded_year=min(founded, REFERENCE_YEAR - 1))
    entities = {e.id: e for e in countries + cities + companies + people}
    return World(seed, config, entities)


def make_world_from_config(seed: int, config: WorldConfig) -> World:
    """`make_world` with the sizes taken from a `WorldConfig`."""
    return make_world(seed, config.num_people, config.num_cities, config.num_countries, config.num_companies,
                      config.num_held_out_people)
