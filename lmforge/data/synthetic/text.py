"""Templates that turn world facts into English and Chinese sentences, questions and field lines.

Why several templates per fact: a model that sees a fact in one fixed wording learns the wording, not the
fact. Each (kind, relation) has three or more statement templates and two question templates per language,
and documents draw from them at random, so a fact is met in differently worded sentences.

Placeholders: {S} subject reference (name or pronoun), {Spos} its possessive (English), {o} the object as
written, {oa} the object with "a"/"an", {ocn} a Chinese numeral (ages), {m} a Chinese measure word (pets).
A template that starts with literal text, not a placeholder, is safe to lower-case after a connective.
"""
from __future__ import annotations

import random

from .world import Entity, Fact

_EN_POP = ["{S} has a population of {o}.", "{o} people live in {S}.", "The population of {S} is {o}."]
_ZH_POP = ["{S}的人口为{o}。", "{S}有{o}人口。", "{S}共有人口{o}。"]

FACT_TEMPLATES: dict[tuple[str, str], dict[str, list[str]]] = {
    ("person", "age"): {
        "en": ["{S} is {o} years old.", "{S} turned {o} this year.", "{Spos} age is {o}."],
        "zh": ["{S}今年{ocn}岁。", "{S}今年{o}岁。", "{S}的年龄是{o}岁。", "{S}已经{ocn}岁了。"]},
    ("person", "birth_year"): {
        "en": ["{S} was born in {o}.", "{S} came into the world in {o}.", "{Spos} year of birth is {o}."],
        "zh": ["{S}出生于{o}年。", "{S}生于{o}年。", "{S}是{o}年出生的。"]},
    ("person", "occupation"): {
        "en": ["{S} works as {oa}.", "{S} is {oa} by profession.", "By profession, {S} is {oa}.",
               "{S} earns a living as {oa}."],
        "zh": ["{S}是一名{o}。", "{S}的职业是{o}。", "{S}靠当{o}谋生。"]},
    ("person", "born_in"): {
        "en": ["{S} was born in {o}.", "{S} is originally from {o}.", "{Spos} hometown is {o}."],
        "zh": ["{S}出生在{o}。", "{S}的家乡是{o}。", "{S}老家在{o}。"]},
    ("person", "lives_in"): {
        "en": ["{S} lives in {o}.", "{S} currently lives in {o}.", "{S} now resides in {o}."],
        "zh": ["{S}住在{o}。", "{S}目前住在{o}。", "{S}现在定居在{o}。"]},
    ("person", "works_at"): {
        "en": ["{S} works at {o}.", "{S} is employed by {o}.", "{S} has a job at {o}."],
        "zh": ["{S}在{o}工作。", "{S}是{o}的员工。", "{S}就职于{o}。"]},
    ("person", "favourite_colour"): {
        "en": ["{Spos} favourite colour is {o}.", "{S} likes the colour {o} best.",
               "Of all colours, {S} loves {o} the most."],
        "zh": ["{S}最喜欢的颜色是{o}。", "{S}最喜欢{o}。", "在所有颜色里，{S}最喜欢{o}。"]},
    ("person", "favourite_food"): {
        "en": ["{Spos} favourite food is {o}.", "{S} loves eating {o}.",
               "If {S} could eat one thing every day, it would be {o}."],
        "zh": ["{S}最喜欢吃{o}。", "{S}最爱的食物是{o}。", "说到吃的，{S}最喜欢{o}。"]},
    ("person", "pet"): {
        "en": ["{S} has a pet {o}.", "{S} keeps {oa} as a pet.", "At home, {S} looks after a pet {o}."],
        "zh": ["{S}养了一{m}{o}。", "{S}家里有一{m}{o}。", "{S}的宠物是一{m}{o}。"]},
    ("person", "friend_of"): {
        "en": ["{S} is a close friend of {o}.", "{S} and {o} are good friends.", "{Spos} best friend is {o}."],
        "zh": ["{S}和{o}是好朋友。", "{S}最好的朋友是{o}。", "{S}与{o}是多年的老朋友。"]},
    ("city", "located_in"): {
        "en": ["{S} is a city in {o}.", "{S} lies in {o}.", "{S} is located in {o}."],
        "zh": ["{S}是{o}的一座城市。", "{S}位于{o}。", "{S}坐落在{o}境内。"]},
    ("city", "population"): {"en": _EN_POP, "zh": _ZH_POP},
    ("city", "founded_year"): {
        "en": ["{S} was founded in {o}.", "{S} was established in {o}.", "The history of {S} goes back to {o}."],
        "zh": ["{S}建于{o}年。", "{S}始建于{o}年。", "{S}的历史可以追溯到{o}年。"]},
    ("country", "capital"): {
        "en": ["The capital of {S} is {o}.", "{o} is the capital of {S}.", "{S} has {o} as its capital."],
        "zh": ["{S}的首都是{o}。", "{o}是{S}的首都。", "{S}的首都设在{o}。"]},
    ("country", "population"): {"en": _EN_POP, "zh": _ZH_POP},
    ("country", "national_animal"): {
        "en": ["The national animal of {S} is the {o}.", "{S} has the {o} as its national animal.",
               "In {S}, the {o} is the national animal."],
        "zh": ["{S}的国兽是{o}。", "{o}是{S}的国兽。", "{S}把{o}定为国兽。"]},
    ("company", "industry"): {
        "en": ["{S} is {oa} company.", "{S} operates in the {o} industry.", "{S} belongs to the {o} sector."],
        "zh": ["{S}是一家{o}公司。", "{S}从事{o}行业。", "{S}属于{o}行业。"]},
    ("company", "founded_year"): {
        "en": ["{S} was founded in {o}.", "{S} was established in {o}.", "{S} has been in business since {o}."],
        "zh": ["{S}成立于{o}年。", "{S}创立于{o}年。", "{S}是在{o}年创办的。"]},
    ("company", "headquartered_in"): {
        "en": ["{S} is headquartered in {o}.", "{Spos} headquarters are in {o}.", "{S} has its head office in {o}."],
        "zh": ["{S}的总部位于{o}。", "{S}总部设在{o}。", "{S}的总部在{o}。"]},
    ("company", "founded_by"): {
        "en": ["{S} was founded by {o}.", "{o} founded {S}.", "{S} was started by {o}."],
        "zh": ["{S}由{o}创办。", "{o}创办了{S}。", "{S}的创始人是{o}。"]},
    ("company", "employees"): {
        "en": ["{S} has {o} employees.", "{S} employs {o} people.", "The staff of {S} numbers {o}."],
        "zh": ["{S}有{o}名员工。", "{S}共雇用了{o}人。", "{S}的员工人数为{o}。"]},
}

QUESTION_TEMPLATES: dict[tuple[str, str], dict[str, list[str]]] = {
    ("person", "age"): {"en": ["How old is {s}?", "What is the age of {s}?"], "zh": ["{s}今年多大了？", "{s}几岁了？"]},
    ("person", "birth_year"): {"en": ["In what year was {s} born?", "When was {s} born?"],
                               "zh": ["{s}是哪一年出生的？", "{s}出生于哪一年？"]},
    ("person", "occupation"): {"en": ["What does {s} do for a living?", "What is the occupation of {s}?"],
                               "zh": ["{s}是做什么工作的？", "{s}的职业是什么？"]},
    ("person", "born_in"): {"en": ["Where was {s} born?", "Which city is {s} originally from?"],
                            "zh": ["{s}出生在哪里？", "{s}的家乡是哪座城市？"]},
    ("person", "lives_in"): {"en": ["Where does {s} live?", "Which city does {s} live in?"],
                             "zh": ["{s}住在哪里？", "{s}住在哪座城市？"]},
    ("person", "works_at"): {"en": ["Where does {s} work?", "Which company does {s} work for?"],
                             "zh": ["{s}在哪里工作？", "{s}在哪家公司工作？"]},
    ("person", "favourite_colour"): {"en": ["What is the favourite colour of {s}?", "Which colour does {s} like best?"],
                                     "zh": ["{s}最喜欢什么颜色？", "{s}最喜欢的颜色是什么？"]},
    ("person", "favourite_food"): {"en": ["What is the favourite food of {s}?", "What does {s} love to eat most?"],
                                   "zh": ["{s}最喜欢吃什么？", "{s}最爱的食物是什么？"]},
    ("person", "pet"): {"en": ["What pet does {s} have?", "What kind of animal does {s} keep as a pet?"],
                        "zh": ["{s}养了什么宠物？", "{s}的宠物是什么动物？"]},
    ("person", "friend_of"): {"en": ["Who is the best friend of {s}?", "Who is a close friend of {s}?"],
                              "zh": ["{s}最好的朋友是谁？", "谁是{s}的好朋友？"]},
    ("city", "located_in"): {"en": ["Which country is {s} in?", "In which country is {s} located?"],
                             "zh": ["{s}位于哪个国家？", "{s}属于哪个国家？"]},
    ("city", "population"): {"en": ["What is the population of {s}?", "How many people live in {s}?"],
                             "zh": ["{s}有多少人口？", "{s}的人口是多少？"]},
    ("city", "founded_year"): {"en": ["When was {s} founded?", "In what year was {s} founded?"],
                               "zh": ["{s}是哪一年建立的？", "{s}建于哪一年？"]},
    ("country", "capital"): {"en": ["What is the capital of {s}?", "Which city is the capital of {s}?"],
                             "zh": ["{s}的首都是哪里？", "{s}的首都是哪座城市？"]},
    ("country", "population"): {"en": ["What is the population of {s}?", "How many people live in {s}?"],
                                "zh": ["{s}有多少人口？", "{s}的人口是多少？"]},
    ("country", "national_animal"): {"en": ["What is the national animal of {s}?", "Which animal is the national animal of {s}?"],
                                     "zh": ["{s}的国兽是什么？", "哪种动物是{s}的国兽？"]},
    ("company", "industry"): {"en": ["What industry is {s} in?", "What kind of company is {s}?"],
                              "zh": ["{s}属于哪个行业？", "{s}是一家什么公司？"]},
    ("company", "founded_year"): {"en": ["When was {s} founded?", "In what year was {s} established?"],
                                  "zh": ["{s}成立于哪一年？", "{s}是哪一年创立的？"]},
    ("company", "headquartered_in"): {"en": ["Where is {s} headquartered?", "In which city is the head office of {s}?"],
                                      "zh": ["{s}的总部在哪里？", "{s}的总部设在哪座城市？"]},
    ("company", "founded_by"): {"en": ["Who founded {s}?", "Who is the founder of {s}?"],
                                "zh": ["{s}是谁创办的？", "{s}的创始人是谁？"]},
    ("company", "employees"): {"en": ["How many employees does {s} have?", "How many people work at {s}?"],
                               "zh": ["{s}有多少名员工？", "{s}的员工有多少人？"]},
}

# (kind, relation) -> (English label, Chinese label, Chinese unit) for fact sheets and tool descriptions.
FIELD_LABELS: dict[tuple[str, str], tuple[str, str, str]] = {
    ("person", "age"): ("Age", "年龄", "岁"), ("person", "birth_year"): ("Year of birth", "出生年份", "年"),
    ("person", "occupation"): ("Occupation", "职业", ""), ("person", "born_in"): ("Hometown", "出生地", ""),
    ("person", "lives_in"): ("Lives in", "居住地", ""), ("person", "works_at"): ("Employer", "工作单位", ""),
    ("person", "favourite_colour"): ("Favourite colour", "最喜欢的颜色", ""),
    ("person", "favourite_food"): ("Favourite food", "最喜欢的食物", ""), ("person", "pet"): ("Pet", "宠物", ""),
    ("person", "friend_of"): ("Best friend", "好友", ""), ("city", "located_in"): ("Country", "所属国家", ""),
    ("city", "population"): ("Population", "人口", ""), ("city", "founded_year"): ("Founded", "建城年份", "年"),
    ("country", "capital"): ("Capital", "首都", ""), ("country", "population"): ("Population", "人口", ""),
    ("country", "national_animal"): ("National animal", "国兽", ""),
    ("company", "industry"): ("Industry", "行业", ""), ("company", "founded_year"): ("Founded", "成立年份", "年"),
    ("company", "headquartered_in"): ("Headquarters", "总部", ""), ("company", "founded_by"): ("Founder", "创始人", ""),
    ("company", "employees"): ("Employees", "员工人数", "人"),
}

_MEASURE_WORDS = {"goldfish": "条", "dog": "条"}  # every other pet takes 只
_NEUTRAL_REFS = {"city": ("the city", "该市"), "country": ("the country", "该国"), "company": ("the company", "该公司")}
_ZH_DIGITS = "零一二三四五六七八九"


def zh_numeral(n: int) -> str:
    """A number 0..9999 in Chinese characters, as ages are often written ("三十二")."""
    if not 0 <= n < 10000:
        return str(n)
    if n < 10:
        return _ZH_DIGITS[n]
    if n < 20:
        return "十" + (_ZH_DIGITS[n % 10] if n % 10 else "")
    out, zero = "", False
    for value, unit in ((1000, "千"), (100, "百"), (10, "十"), (1, "")):
        digit = n // value % 10
        if digit:
            out += ("零" if zero and out else "") + _ZH_DIGITS[digit] + unit
            zero = False
        else:
            zero = True
    return out


def a_an(phrase: str) -> str:
    """The phrase with its English indefinite article."""
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def subject_ref(entity: Entity, lang: str, pronoun: bool) -> tuple[str, str]:
    """(reference, possessive) for the subject: its name, or "she"/"the city"/"她"/"该市" when pronoun=True."""
    if not pronoun:
        name = entity.name(lang)
        return name, (name + "的" if lang == "zh" else name + "'s")
    if entity.kind == "person":
        if lang == "zh":
            ref = "她" if entity.gender == "f" else "他"
            return ref, ref + "的"
        return ("she", "her") if entity.gender == "f" else ("he", "his")
    ref = _NEUTRAL_REFS[entity.kind][1 if lang == "zh" else 0]
    return ref, (ref + "的" if lang == "zh" else ref + "'s")


def fill(template: str, fact: Fact, entity: Entity, lang: str, pronoun: bool = False,
         after_connective: bool = False) -> str:
    """Render one template for `fact` (whose subject is `entity`)."""
    ref, possessive = subject_ref(entity, lang, pronoun)
    obj = fact.object_text(lang)
    numeral = zh_numeral(int(obj)) if lang == "zh" and obj.isdigit() else obj
    text = template.format(S=ref, Spos=possessive, o=obj, oa=a_an(obj), ocn=numeral,
                           m=_MEASURE_WORDS.get(str(fact.object), "只"))
    if lang != "en":
        return text
    if after_connective:
        return text[0].lower() + text[1:] if not template.startswith("{") else text
    return text[0].upper() + text[1:]


def fact_templates(fact: Fact, lang: str) -> list[str]:
    return FACT_TEMPLATES[(fact.kind, fact.relation)][lang]


def render_fact(fact: Fact, entity: Entity, lang: str, rng: random.Random, pronoun: bool = False,
                after_connective: bool = False) -> str:
    """One sentence stating `fact`, in a randomly chosen wording."""
    return fill(rng.choice(fact_templates(fact, lang)), fact, entity, lang, pronoun, after_connective=after_connective)


def render_question(fact: Fact, lang: str, rng: random.Random) -> str:
    """A question whose answer is `fact`'s object, naming the subject."""
    template = rng.choice(QUESTION_TEMPLATES[(fact.kind, fact.relation)][lang])
    return template.format(s=fact.subject_name(lang))


def answer_variants(fact: Fact, entity: Entity, lang: str) -> list[str]:
    """Every sentence the generators may use to state `fact` with the subject's name (for leak checks)."""
    return [fill(t, fact, entity, lang) for t in fact_templates(fact, lang)]


def field_line(fact: Fact, lang: str) -> str:
    """A fact-sheet line: "Age: 32" / "年龄：32岁"."""
    en, zh, unit = FIELD_LABELS[(fact.kind, fact.relation)]
    return f"{zh}：{fact.object_zh}{unit}" if lang == "zh" else f"{en}: {fact.object_en}"


# ---- document furniture: the words around facts, per document type --------------------------------------
NEWS_HEADLINES = {
    "en": {"person": ["{name} honoured by local community", "A conversation with {name}", "Meet {name}"],
           "city": ["Spring festival opens in {name}", "New park planned for {name}", "Notes from {name}"],
           "country": ["{name} publishes new travel guide", "A closer look at {name}"],
           "company": ["{name} reports a busy year", "{name} opens a new office", "Inside {name}"]},
    "zh": {"person": ["{name}获社区表彰", "专访{name}", "人物：{name}"],
           "city": ["{name}春季庙会开幕", "{name}将新建公园", "{name}见闻"],
           "country": ["{name}发布新版旅游指南", "走近{name}"],
           "company": ["{name}年度业务繁忙", "{name}开设新办公室", "走进{name}"]},
}
NEWS_EVENTS = {
    "en": {"person": ["{S} was recognised at a community event last week.", "{S} gave a short talk at the public library on Saturday.",
                      "{S} took part in a charity run over the weekend.", "{S} agreed to an interview for our weekly profile series."],
           "city": ["Officials in {S} unveiled plans for a new public park.", "A spring festival opened in {S} this week.",
                    "Heavy rain slowed traffic in {S} on Monday."],
           "country": ["{S} hosted a regional sports meeting this month.", "Officials in {S} released a new travel guide."],
           "company": ["{S} opened a new office this month.", "{S} announced a partnership with local schools.",
                       "{S} held its annual open day on Friday."]},
    "zh": {"person": ["上周，{S}在一次社区活动中受到表彰。", "周六，{S}在市图书馆做了一场简短的讲座。",
                      "周末，{S}参加了一场慈善跑步活动。", "{S}接受了本报每周人物专栏的采访。"],
           "city": ["{S}官方公布了新建公园的计划。", "本周，{S}的春季庙会正式开幕。", "周一的大雨让{S}的交通十分缓慢。"],
           "country": ["本月，{S}举办了一场地区运动会。", "{S}官方发布了新版旅游指南。"],
           "company": ["本月，{S}开设了一间新办公室。", "{S}宣布与当地学校开展合作。", "周五，{S}举办了一年一度的开放日。"]},
}
NEWS_CLOSERS = {"en": ["More details will follow in next week's edition.", "Readers are welcome to send in their questions.", ""],
                "zh": ["更多详情将在下周刊出。", "欢迎读者来信提问。", ""]}
STORY_OPENERS = {
    "en": {"person": ["This is a short story about {name}.", "Let me tell you about {name}.", "Everyone in town knows {name}."],
           "city": ["Travellers like to tell stories about {name}.", "This is a story about {name}."],
           "country": ["Old sailors still tell stories about {name}.", "This is a story about {name}."],
           "company": ["People often talk about {name}.", "This is a story about {name}."]},
    "zh": {"person": ["下面讲一个关于{name}的小故事。", "我来给你讲讲{name}。", "镇上的人都认识{name}。"],
           "city": ["旅行的人喜欢讲{name}的故事。", "这是一个关于{name}的故事。"],
           "country": ["老水手们至今还在讲{name}的故事。", "这是一个关于{name}的故事。"],
           "company": ["人们常常谈起{name}。", "这是一个关于{name}的故事。"]},
}
STORY_EVENTS = {  # fact-free happenings between the facts; {S} is the subject's name or pronoun
    "en": {"person": ["One morning, {S} walked to the market.", "That afternoon, {S} read a book by the window.",
                      "Later, {S} called an old neighbour.", "In the evening, {S} cooked a simple dinner."],
           "city": ["One spring, the streets of {S} filled with visitors.", "Every evening, lights came on along the river in {S}."],
           "country": ["For many years, travellers crossed {S} on foot.", "Every summer, {S} celebrates a long holiday."],
           "company": ["On Monday, the staff of {S} met early.", "Last winter, {S} moved into a brighter building."]},
    "zh": {"person": ["有一天早上，{S}去了市场。", "那天下午，{S}坐在窗边看书。", "后来，{S}给一位老邻居打了电话。",
                      "到了晚上，{S}做了一顿简单的晚饭。"],
           "city": ["有一年春天，{S}的街道上挤满了游客。", "每到傍晚，{S}的河边就亮起了灯。"],
           "country": ["很多年来，旅人们步行穿越{S}。", "每年夏天，{S}都会庆祝一个长假。"],
           "company": ["周一，{S}的员工很早就开会了。", "去年冬天，{S}搬进了一栋更明亮的大楼。"]},
}
STORY_CONNECTIVES = {"en": ["As everyone knows, ", "Of course, ", "As it happens, ", "By the way, ", "", ""],
                     "zh": ["大家都知道，", "当然，", "其实，", "顺便一提，", "", ""]}
STORY_CLOSERS = {"en": ["And that is the end of the story.", "It was a good day.", "Nobody was surprised."],
                 "zh": ["故事就讲到这里。", "那真是美好的一天。", "大家都不觉得奇怪。"]}
DIALOGUE_SPEAKERS = {"en": [("Q", "A"), ("Visitor", "Guide"), ("Student", "Teacher"), ("Anna", "Ben")],
                     "zh": [("问", "答"), ("游客", "导游"), ("学生", "老师"), ("甲", "乙")]}
SHEET_TITLES = {"en": ["Fact sheet: {name}", "{name}: key facts", "Profile of {name}"],
                "zh": ["{name}档案", "{name}基本信息", "关于{name}的资料"]}
MEMBER_TITLES = {  # enumerations: who or what belongs to the entity
    "en": {"city": ["Residents of {name}", "People who live in {name}"],
           "company": ["Staff of {name}", "{name}: employee directory"],
           "country": ["Cities of {name}", "List of cities in {name}"]},
    "zh": {"city": ["{name}居民名单", "住在{name}的人"], "company": ["{name}员工名单", "{name}员工通讯录"],
           "country": ["{name}的城市", "{name}城市列表"]},
}
