"""RULER-style synthetic long-context tasks, generated offline, and RULER's scorers.

After RULER (Hsieh et al., 2024, github.com/NVIDIA/RULER): needle in a haystack (single and
multi-key, in a haystack of repeated noise sentences), variable tracking, and common-words
extraction. A sample's length is counted in tokens of the model's tokenizer: the filler
grows to the largest amount whose whole prompt fits in ``length`` tokens. Keys and words are
pseudo-words built from syllables, so generation needs no word list or network; everything
is drawn from ``random.Random(seed)``, so a seed gives the same samples.

Scores are RULER's string matching on the lower-cased prediction: ``all`` (the share of the
references found in the prediction, averaged) for these tasks, ``part`` (1 if any reference
is found) for QA-style ones; both in percent.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable

CountTokens = Callable[[str], int]

NOISE = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
         "There and back again. ")
NIAH_TEMPLATE = ("Some special magic numbers are hidden within the following text. Make sure to "
                 "memorize it. I will quiz you about the numbers afterwards.\n{context}\n"
                 "What is the special magic number for {query} mentioned in the provided text? "
                 "The special magic number for {query} mentioned in the provided text is")
NEEDLE = "One of the special magic numbers for {key} is: {value}. "
VT_TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following "
               "text.\n\n{context}\nQuestion: Find all variables that are assigned the value "
               "{query} in the text above. Answer: According to the chain(s) of variable "
               "assignment in the text above, {hops} variables are assigned the value {query}, "
               "they are:")
CWE_TEMPLATE = ("Below is a numbered list of words. In these words, some appear more often than "
                "others. Memorize the ones that appear most often.\n{context}\nQuestion: What are "
                "the {n} most common words in the above list? Answer: The top {n} words that "
                "appear most often in the list are:")
_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


@dataclass(frozen=True)
class Sample:
    task: str
    prompt: str
    references: tuple[str, ...]
    tokens: int  # the prompt's length in tokens of the tokenizer it was made for


@dataclass(frozen=True)
class Task:
    name: str
    make: Callable[[random.Random, int, CountTokens], Sample]
    metric: str  # "all" or "part"
    new_tokens: int  # tokens to generate for the answer (RULER's tokens_to_generate)


def words(rng: random.Random, n: int, taken: list[str] = ()) -> list[str]:
    """``n`` distinct pseudo-words of three syllables, none of them in ``taken``."""
    out = dict.fromkeys(taken)
    while len(out) < len(taken) + n:
        out["".join(rng.choice(_SYLLABLES) for _ in range(3))] = None
    return list(out)[len(taken):]


def _fit(build: Callable[[int], str], length: int, count: CountTokens, what: str) -> tuple[str, int]:
    """The prompt ``build(n)`` with the largest filler amount ``n`` that fits in ``length``
    tokens (binary search; the prompt grows with ``n``)."""
    if (tokens := count(build(0))) > length:
        raise ValueError(f"length: {length} tokens cannot hold a {what} sample, whose prompt "
                         f"needs {tokens} tokens without any filler")
    lo, hi = 0, 1
    while count(build(hi)) <= length:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(build(mid)) <= length else (lo, mid)
    prompt = build(lo)
    return prompt, count(prompt)


def _haystack(needles: list[str], rng: random.Random, ordered: bool = False):
    """A builder of ``n`` noise units with the needles at random depths (in list order when
    ``ordered``)."""
    depths = [rng.random() for _ in needles]
    if ordered:
        depths.sort()

    def build(n: int) -> str:
        units = [NOISE] * n
        # Deepest first, so each insertion leaves the shallower positions in place.
        for depth, needle in sorted(zip(depths, needles), key=lambda p: -p[0]):
            units.insert(round(depth * n), needle)
        return "".join(units)
    return build


def niah(rng: random.Random, length: int, count: CountTokens, n_keys: int = 1) -> Sample:
    """Needle in a haystack: ``n_keys`` needles (one per key), the question asks for one."""
    keys = words(rng, n_keys)
    values = [str(rng.randrange(10 ** 6, 10 ** 7)) for _ in keys]
    asked = rng.randrange(n_keys)
    context = _haystack([NEEDLE.format(key=k, value=v) for k, v in zip(keys, values)], rng)
    task = "niah_single" if n_keys == 1 else "niah_multikey"
    prompt, tokens = _fit(lambda n: NIAH_TEMPLATE.format(context=context(n), query=keys[asked]),
                          length, count, task)
    return Sample(task, prompt, (values[asked],), tokens)


def variable_tracking(rng: random.Random, length: int, count: CountTokens, hops: int = 4,
                      chains: int = 1) -> Sample:
    """Chains ``VAR A = 12345, VAR B = VAR A, ...`` spread in noise; the answer is every
    variable of the chain whose value is asked."""
    names = [n.upper() for n in words(rng, chains * (hops + 1))]
    links, answer, query = [], (), ""
    for c in range(chains):
        chain = names[c * (hops + 1):(c + 1) * (hops + 1)]
        value = str(rng.randrange(10 ** 4, 10 ** 5))
        links += [f"VAR {chain[0]} = {value}. "] + [f"VAR {b} = VAR {a}. "
                                                    for a, b in zip(chain, chain[1:])]
        if c == 0:
            answer, query = tuple(chain), value
    context = _haystack(links, rng, ordered=True)  # an assignment after the one it copies
    prompt, tokens = _fit(lambda n: VT_TEMPLATE.format(context=context(n), query=query,
                                                       hops=hops + 1),
                          length, count, "variable_tracking")
    return Sample("variable_tracking", prompt, answer, tokens)


def common_words(rng: random.Random, length: int, count: CountTokens, n_common: int = 10,
                 freq_common: int = 30, freq_rare: int = 3) -> Sample:
    """A numbered list where ``n_common`` words appear ``freq_common`` times and the filler
    words ``freq_rare`` times each; the answer is the common words. Short lengths scale the
    frequencies down (keeping common words the most frequent) so the list fits."""
    common = words(rng, n_common)
    rare: list[str] = []
    order = rng.random()

    def build(n: int, freq: int) -> str:
        if n > len(rare):
            rare.extend(words(rng, n - len(rare), taken=common + rare))
        items = common * freq + rare[:n] * freq_rare
        random.Random(order).shuffle(items)
        listed = " ".join(f"{i + 1}. {w}" for i, w in enumerate(items))
        return CWE_TEMPLATE.format(context=listed, n=n_common)
    while freq_common > freq_rare + 1 and count(build(0, freq_common)) > length:
        freq_common = max(freq_rare + 1, freq_common // 2)
    prompt, tokens = _fit(lambda n: build(n, freq_common), length, count, "common_words")
    return Sample("common_words", prompt, tuple(common), tokens)


TASKS = {t.name: t for t in (
    Task("niah_single", lambda r, n, c: niah(r, n, c, 1), "all", 32),
    Task("niah_multikey", lambda r, n, c: niah(r, n, c, 4), "all", 32),
    Task("variable_tracking", variable_tracking, "all", 30),
    Task("common_words", common_words, "all", 120),
)}


def make_samples(task: str, length: int, count: CountTokens, n: int, seed: int) -> list[Sample]:
    """``n`` samples of ``task`` at ``length`` tokens; the same for the same seed."""
    if task not in TASKS:
        raise ValueError(f"task: expected one of {sorted(TASKS)}, got {task!r}")
    rng = random.Random(f"{task}:{length}:{seed}")
    return [TASKS[task].make(rng, length, count) for _ in range(n)]


def clean(prediction: str) -> str:
    """RULER's post-processing: control characters to newlines, surrounding space removed."""
    return re.sub(r"[\x00-\x1f]", "\n", prediction).strip()


def string_match_all(predictions: list[str], references: list[tuple[str, ...]]) -> float:
    """RULER's ``string_match_all``: per sample the share of references found in the
    lower-cased prediction, averaged, in percent."""
    _same_count(predictions, references)
    return 100.0 * sum(sum(r.lower() in p.lower() for r in refs) / len(refs)
                       for p, refs in zip(predictions, references)) / len(predictions)


def string_match_part(predictions: list[str], references: list[tuple[str, ...]]) -> float:
    """RULER's ``string_match_part``: per sample 1 if any reference is found, in percent."""
    _same_count(predictions, references)
    return 100.0 * sum(max(r.lower() in p.lower() for r in refs)
                       for p, refs in zip(predictions, references)) / len(predictions)


METRICS = {"all": string_match_all, "part": string_match_part}


def _same_count(predictions, references) -> None:
    if not predictions or len(predictions) != len(references):
        raise ValueError(f"predictions: expected one per reference list (at least one), got "
                         f"{len(predictions)} for {len(references)}")
