"""The seed's own tasks as benchmark workloads (built-in text, no downloads).

Why: synthetic prompts measure the engine; these measure what the deployment is
for — short structured extraction (JSON sentiment), translation with CJK input
(zh→en, where tokenization differs a lot from English), and long-context
summarization (prefill-heavy). Texts are assembled deterministically from small
built-in pieces so every run with the same seed sends the same list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

_PRODUCTS = (
    "wireless earbuds", "coffee grinder", "hiking backpack", "mechanical keyboard",
    "air fryer", "office chair", "e-reader", "electric toothbrush", "rain jacket",
    "standing desk", "phone case", "blender",
)
_OPINIONS = {
    "positive": (
        "It works exactly as described and I use it every day.",
        "The build quality is excellent and it arrived a day early.",
        "Honestly the best purchase I've made this year.",
        "Setup took two minutes and it has been flawless since.",
    ),
    "negative": (
        "It stopped working after a week and support never answered.",
        "The material feels cheap and one part broke on arrival.",
        "Way too loud, and the battery barely lasts an afternoon.",
        "I returned it; the description was misleading.",
    ),
    "neutral": (
        "It does the job, nothing more and nothing less.",
        "Average quality for the price; the color is a bit different from the photos.",
        "Some features are nice, others feel unfinished.",
        "Delivery was on time. Too early to say how it holds up.",
    ),
}

_ZH = (
    "今天的天气很好，我们一起去公园散步吧。",
    "这家餐厅的菜很好吃，但是价格有点贵。",
    "请在明天下午三点之前把报告发给我。",
    "他每天早上六点起床，然后去跑步。",
    "这本书讲述了一个关于友谊和勇气的故事。",
    "我们的服务器在晚上十点会进行维护，预计持续两个小时。",
    "如果你有任何问题，请随时联系我们的客服团队。",
    "这个城市的交通非常方便，地铁可以到达大部分地方。",
    "学习一门新的语言需要耐心和坚持。",
    "会议改到下周二上午十点，地点不变。",
    "他们计划明年夏天去日本旅行。",
    "这款手机的电池续航时间比上一代长了百分之二十。",
    "孩子们在图书馆里安静地看书。",
    "由于大雨，今天的航班全部延误了。",
    "我们需要在月底之前完成这个项目的测试。",
    "这座古老的寺庙已经有一千多年的历史了。",
)

_DOC_PARAGRAPHS = (
    "The river town of Eastbrook was founded in 1823 as a ferry crossing, and for most "
    "of its history its economy depended on timber floated down from the northern hills.",
    "In 1911 a flood destroyed the lower mills. The town council, led by mayor Helen "
    "Marsh, borrowed heavily to build a stone levee that still stands today.",
    "The arrival of the railway in 1934 shifted trade away from the river. Warehouses "
    "along the water closed one by one, and the population fell by a third within a decade.",
    "After the Second World War, returning veterans opened small machine shops in the "
    "empty warehouses, and Eastbrook slowly became known for precision parts.",
    "By 1970 the largest of these shops, Corran Tooling, employed nine hundred people and "
    "supplied components to aircraft manufacturers on both coasts.",
    "Corran was sold to a national conglomerate in 1988. Production moved south within "
    "five years, and the town lost its biggest employer almost overnight.",
    "The 1990s were difficult: the high school merged with its neighbor, the cinema "
    "closed, and many young families left for the city two hours away.",
    "A turning point came in 2004, when the community college opened a program in "
    "river ecology and began restoring the wetlands that the old mills had drained.",
    "The restored wetlands attracted birdwatchers and kayakers. Small inns and cafés "
    "opened in the renovated warehouses along the waterfront.",
    "Today Eastbrook has about eleven thousand residents. Tourism, the college and a "
    "handful of engineering firms are the main employers, and the levee is a walking path.",
    "Local historians note that every revival of the town reused what the previous era "
    "left behind: the ferry landing, the levee, the warehouses and finally the river itself.",
    "The town's current debate concerns a proposed bridge that would cut the drive to the "
    "city by forty minutes but cross the most fragile part of the restored wetlands.",
)


@dataclass
class SeedRequest:
    messages: list[dict[str, Any]]
    max_tokens: int
    expected: dict[str, Any]  # ground truth where known (sentiment label, source text)


def _sentiment(rng: np.random.Generator) -> SeedRequest:
    label = str(rng.choice(list(_OPINIONS)))
    product = str(rng.choice(_PRODUCTS))
    review = f"I bought the {product}. " + " ".join(rng.choice(_OPINIONS[label], size=2, replace=False))
    return SeedRequest(
        messages=[
            {"role": "system", "content": "You extract structured data. Reply with JSON only."},
            {"role": "user", "content": (
                'Return {"product": string, "sentiment": "positive"|"negative"|"neutral", '
                f'"reason": string}} for this review:\n{review}'
            )},
        ],
        max_tokens=64,
        expected={"sentiment": label, "product": product},
    )


def _translate(rng: np.random.Generator) -> SeedRequest:
    k = int(rng.integers(1, 4))
    source = "".join(rng.choice(_ZH, size=k, replace=False))
    return SeedRequest(
        messages=[
            {"role": "system", "content": "You are a professional Chinese-to-English translator."},
            {"role": "user", "content": f"Translate into English:\n{source}"},
        ],
        max_tokens=128,
        expected={"source": source},
    )


def _summarize(rng: np.random.Generator, doc_words: int) -> SeedRequest:
    parts: list[str] = []
    words = 0
    while words < doc_words:
        order = rng.permutation(len(_DOC_PARAGRAPHS))
        for i in order:
            parts.append(_DOC_PARAGRAPHS[i])
            words += len(_DOC_PARAGRAPHS[i].split())
            if words >= doc_words:
                break
    document = "\n\n".join(parts)
    return SeedRequest(
        messages=[{"role": "user", "content": (
            "Summarize the following document in five bullet points.\n\n" + document
        )}],
        max_tokens=200,
        expected={"document_words": words},
    )


def build(task: str, n: int, rng: np.random.Generator, doc_words: int = 1500) -> list[SeedRequest]:
    """``n`` requests of seed task ``task`` (sentiment | translate | summarize)."""
    if task == "sentiment":
        return [_sentiment(rng) for _ in range(n)]
    if task == "translate":
        return [_translate(rng) for _ in range(n)]
    if task == "summarize":
        return [_summarize(rng, doc_words) for _ in range(n)]
    raise ValueError(f"unknown seed task {task!r}")
