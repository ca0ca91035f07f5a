"""Prompts grounded in what the sensors see: words → descriptor facts → pixels (issue 19).

A concept that no class names ("maize: bare until May, green from June, harvested in October")
cannot come from a head fitted on the other classes' texts: its pixels were never paired with
such words. It can come from the pixel's own series. The descriptors (`models.descriptors`) turn
each pixel's year into quantised facts ("greenup March", "harvest mid July", "radar dark"); here a
prompt is turned into the same facts, and a pixel scores by how many of them it holds. This is
attribute-based zero-shot (Lampert et al., CVPR 2009), with the attributes measured from the cube
rather than predicted, so no class label and no training is involved.

- The prompt is cut into clauses (commas, colons, "and", "with", "but").
- Each clause is matched, with the sentence encoder, against every wording of every fact the
  descriptors can state (their own templates, with each month, season and level, and the same
  templates without an argument: "harvested", "bare soil"). A clause whose best cosine is at
  least `GROUND_THRESHOLD` grounds that fact, weighted by the cosine; other clauses ground nothing.
  A month or season the clause does not name is dropped ("harvested every year": any month);
  "before / until / by / after <month>" bounds a dated fact ("harvested before August").
- Land-cover words ("buildings", "pasture", "maize", "a lake") ground the facts typical of them
  (`models.lexicon`). The words a prompt lists are alternatives (a pixel is one land cover):
  the pixel fits the list as well as it fits its best word, and the list weighs as one fully
  matched fact. Under a negation ("neither cropland nor grassland", "non-cropland") the list
  is a NOR: a pixel scores where it fits none of the words.
- A clause that says "not", "no", "never", "without" ("not mown", "no snow in winter") counts
  against the fact it matched, unless that fact's wording says it already ("never bare").
- A pixel's score is the weighted share of grounded facts it holds. A month one away counts half
  (a season shifted by a few weeks is the same season); an argument-free fact counts whatever its
  month.
- The share of the prompt's clauses that grounded says how much of it the cube can check; the
  concept map blends the score with the alignment head's probability by that share.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from pivotmap.models import descriptors as D
from pivotmap.models import lexicon

# Calibrated on the demo nomenclature's descriptions with all-MiniLM-L6-v2 (0.5, 0.6 and 0.7
# tried; 0.6 kept): a clause that restates a fact scores 0.86-1.00 ("harvested in July" →
# "harvested in mid July" 0.99), one about something the descriptors do not measure ("high SWIR",
# "sealed surfaces") below 0.5.
GROUND_THRESHOLD = 0.6
MONTH_TOLERANCE = 1  # months: a fact one month off counts half

_ARGUMENTS: dict[str, tuple[str, ...]] = {
    "peak_level": ("dense", "moderate"),
    **D.DATED,
    "bare": tuple(D.SEASONS), "green_in": tuple(D.SEASONS), "flooded": tuple(D.SEASONS),
    "radar": ("bright", "dark", "moderate"), "radar_change": ("stable", "seasonal"),
}  # fmt: skip
ANY = "*"  # the argument of a fact stated without one ("harvested"): any month or season
_NO_ARGUMENT = re.compile(r"\s*\b(in|from)\s*\{0\}")
_CLAUSE_SPLIT = re.compile(r"[,;:.()]|\band\b|\bwith\b|\bbut\b|\bwhile\b")


@lru_cache(maxsize=1)
def vocabulary() -> tuple[tuple[str, ...], tuple[tuple[str, ...], ...]]:
    """Every wording of every fact the descriptors can state, and the fact each one states."""
    phrases: dict[str, tuple[str, ...]] = {}
    for kind, templates in D.TEMPLATES.items():
        arguments = _ARGUMENTS.get(kind)
        for template in templates:
            if arguments is None:
                phrases.setdefault(template, (kind,))
                continue
            for argument in arguments:
                for word in D._RADAR_WORDS.get(argument, (argument,)):
                    phrases.setdefault(template.format(word), (kind, argument))
            if kind not in ("peak_level", "radar", "radar_change"):  # levels need their word
                phrases.setdefault(_NO_ARGUMENT.sub("", template), (kind, ANY))
    return tuple(phrases), tuple(phrases.values())


def clauses(prompt: str) -> list[str]:
    """The prompt's clauses (at least 3 characters each); the whole prompt if it has no break."""
    parts = [c.strip() for c in _CLAUSE_SPLIT.split(prompt)]
    return [c for c in parts if len(c) >= 3] or [prompt.strip()]


@dataclass(frozen=True)
class Part:
    clause: str
    phrase: str  # the fact wording it matched best
    fact: tuple[str, ...]
    cosine: float
    weight: float | None = None  # its weight in the score: the cosine unless set
    negated: bool = False  # counts where the pixel does NOT hold the fact
    via: str | None = None  # the land-cover word (`models.lexicon`) it came from

    @property
    def strength(self) -> float:
        """Its weight in the prompt's score: the cosine of its match, unless set."""
        return self.cosine if self.weight is None else self.weight

    def to_dict(self) -> dict:
        out = {
            "clause": self.clause, "reads_as": self.phrase, "fact": list(self.fact),
            "cosine": round(self.cosine, 4),
        }  # fmt: skip
        if self.via is not None:
            out |= {"via": self.via, "negated": self.negated, "weight": round(self.strength, 4)}
        elif self.negated:
            out["negated"] = True
        return out


@dataclass(frozen=True)
class Grounding:
    """How much of a prompt the cube's descriptors can check, and as which facts."""

    prompt: str
    clauses: int
    parts: tuple[Part, ...] = field(default_factory=tuple)
    named: tuple[str, ...] = ()  # clauses that name land cover the lexicon knows

    @property
    def share(self) -> float:
        """Share of the prompt's clauses that grounded a fact (0: the cube checks none of it),
        directly or through a land-cover word (one read in an earlier clause too)."""
        grounded = len({p.clause for p in self.parts} | set(self.named))
        return grounded / self.clauses if self.clauses else 0.0

    def to_dict(self) -> dict:
        return {"share": round(self.share, 4), "facts": [p.to_dict() for p in self.parts]}


def ground(
    prompt: str, embed: Callable[[Sequence[str]], np.ndarray], threshold: float = GROUND_THRESHOLD
) -> Grounding:
    """The facts a prompt states, each clause matched to its nearest fact wording (`embed`: unit
    text embeddings, e.g. `TextAlignment.embed`, which caches them)."""
    phrases, facts = vocabulary()
    cut = clauses(prompt)
    sims = embed(cut) @ embed(list(phrases)).T
    parts: list[Part] = []
    named: set[tuple[str, bool]] = set()  # land-cover entries already read, and their sign
    carried = False  # a "neither" in an earlier clause, its "nor" not reached yet
    read = []
    for clause, row in zip(cut, sims, strict=True):
        if lexicon.mentions(clause, carried):
            read.append(clause)
        parts += _lexicon_parts(clause, carried, named, phrases, facts)
        carried_in, carried = carried, lexicon.negation_carries(clause, carried)
        best = int(row.argmax())
        if row[best] >= threshold:
            phrase, fact = phrases[best], facts[best]
            bound = _bound(clause)
            if bound and fact[0] in _DATED:  # "harvested before August": any month before it
                fact = (fact[0], bound)
                phrase = f"{phrases[facts.index((fact[0], ANY))]} {_BOUND_WORDS[bound[0]]} "
                phrase += D.MONTHS[int(bound[1:]) - 1]
            elif _unsaid(fact, clause):  # "harvested every year" names no month: any month
                fact = (fact[0], ANY)
                phrase = phrases[facts.index(fact)]  # its first wording without one
            # A sentence encoder reads "not mown" much as "mown": the negation is ours to see.
            # A wording that is itself negative ("never bare", "no crop cover") cancels it.
            negated = (carried_in or _negative(clause)) != _negative(phrase)
            parts.append(Part(clause, phrase, fact, float(row[best]), negated=negated))
    return Grounding(prompt, len(cut), tuple(parts), tuple(read))


def _lexicon_parts(
    clause: str,
    carried: bool,
    named: set[tuple[str, bool]],
    phrases: tuple[str, ...],
    facts: tuple[tuple[str, ...], ...],
) -> list[Part]:
    """The facts of the land-cover words a clause names (`models.lexicon`), each entry once
    per prompt and sign, its facts sharing a weight of 1 (`combine` reads the words as
    alternatives)."""
    out = []
    for mention in lexicon.mentions(clause, carried):
        key = (mention.entry.name, mention.negated)
        if key in named:
            continue
        named.add(key)
        weight = 1.0 / len(mention.entry.facts)
        for wording in mention.entry.facts:
            fact = facts[phrases.index(wording)]
            out.append(Part(clause, wording, fact, 1.0, weight, mention.negated, mention.word))
    return out


_NEGATIVE = re.compile(rf"\b({'|'.join(('never', *lexicon.NEGATION_WORDS))})\b", re.I)


def _negative(text: str) -> bool:
    """Whether a clause or fact wording says "not" ("not mown", "never bare", "no snow")."""
    return bool(_NEGATIVE.search(text))


_DATED = ("greenup", "peak", "senescence", "harvest")  # facts dated by a month
_BOUND = re.compile(
    r"\b(before|until|till|by|after)\s+(?:(?:early|mid|late|the end of|end of)\s+)?("
    + "|".join(D.MONTHS) + r")\b", re.IGNORECASE,
)  # fmt: skip
_BOUND_WORDS = {"<": "before", ">": "after"}


def _bound(clause: str) -> str | None:
    """'<M' for "before / until / by <month>" (M: 1-12, the month itself included except for
    "before"), '>M' for "after <month>"; None when the clause has no such bound."""
    found = _BOUND.search(clause)
    if not found:
        return None
    word, month = found.group(1).lower(), D.MONTHS.index(found.group(2).capitalize()) + 1
    if word == "after":
        return f">{month}"
    return f"<{month if word == 'before' else month + 1}"


def _unsaid(fact: tuple[str, ...], clause: str) -> bool:
    """Whether the fact's month or season is one the clause does not name (a sentence encoder
    matches "harvested every year" to a wording with some month; the month is then not meant)."""
    if len(fact) < 2 or fact[1] == ANY:
        return False
    when = fact[1].split()[-1]
    if when not in D.MONTHS and when not in D.SEASONS:
        return False  # a level ("dark", "dense"): said in other words, not a date
    return when.lower() not in clause.lower()


def _month(argument: str) -> int | None:
    word = argument.split()[-1]
    return D.MONTHS.index(word) if word in D.MONTHS else None


def holds(fact: tuple[str, ...], pixel: Sequence[tuple[str, ...]]) -> float:
    """How far a pixel's facts hold `fact`: 1, ½ for a month one off, 0."""
    best = 0.0
    for own in pixel:
        if own[0] != fact[0]:
            continue
        if len(fact) == 1 or fact[1] == ANY or own[1:] == fact[1:]:
            return 1.0
        if fact[1][0] in _BOUND_WORDS:  # before / after a month, within the calendar year
            have = _month(own[1])
            limit = int(fact[1][1:]) - 1  # 0-based month index
            if have is not None and (have < limit if fact[1][0] == "<" else have > limit):
                return 1.0
            continue
        want, have = _month(fact[1]), _month(own[1])
        if want is not None and have is not None:
            apart = min(abs(want - have), 12 - abs(want - have))
            best = max(best, 1.0 - apart / (MONTH_TOLERANCE + 1))
    return best


def pixel_facts(d: D.Descriptors) -> dict[tuple[str, ...], np.ndarray]:
    """Every pixel's facts as columns (`descriptors.fact_columns`), to score several prompts
    without redoing them."""
    return D.fact_columns(d)


def _held(fact: tuple[str, ...], columns: dict[tuple[str, ...], np.ndarray], n: int) -> np.ndarray:
    """[N] `holds(fact, pixel)` of every pixel: the best credit of the facts it holds, each
    credit `holds` of that one fact, looked up by a dated fact's month code."""
    out = np.zeros(n, dtype=np.float32)
    for key, column in columns.items():
        if key[0] != fact[0]:
            continue
        if len(key) == 1 and key[0] in D.DATED:
            credits = [holds(fact, [(key[0], a)]) for a in D.DATED[key[0]]]
            out = np.maximum(out, np.array([*credits, 0.0], dtype=np.float32)[column])  # -1: 0
        elif credit := holds(fact, [key]):
            out = np.maximum(out, np.where(column, credit, 0.0).astype(np.float32))
    return out


def fact_score(
    d: D.Descriptors,
    grounding: Grounding,
    facts: dict[tuple[str, ...], np.ndarray] | None = None,
) -> np.ndarray:
    """[N] in [0, 1]: the cosine-weighted share of the grounded facts each pixel holds, its
    land-cover words read as alternatives (`combine`); 0 where the prompt grounds nothing.
    `facts`: `pixel_facts(d)`, when already computed."""
    if not grounding.parts:
        return np.zeros(len(d), dtype=np.float32)
    facts = pixel_facts(d) if facts is None else facts
    held = np.stack([_held(p.fact, facts, len(d)) for p in grounding.parts], axis=1)
    return combine(held, grounding.parts)


def combine(held: np.ndarray, parts: Sequence[Part]) -> np.ndarray:
    """[N] score from [N, P] `holds` of each part: the weighted mean of the facts a prompt
    states and of its land-cover words read as alternatives. A pixel is one land cover, so the
    words a prompt lists ("trees, hedges, gardens and water") are an OR: the pixel fits them as
    well as it fits the best of them (each word: the weighted share of its facts it holds), and
    the list weighs as one fully matched fact. Under a negation it is a NOR ("neither cropland,
    grassland nor built-up" = not (cropland or grassland or built-up)): one minus that."""
    terms: list[np.ndarray] = []
    weights: list[float] = []
    words: dict[tuple[bool, str], list[int]] = {}  # (negated, word) → its parts
    for i, part in enumerate(parts):
        if part.via is None:
            terms.append(1.0 - held[:, i] if part.negated else held[:, i])
            weights.append(part.strength)
        else:
            words.setdefault((part.negated, part.via), []).append(i)
    for negated in (False, True):
        fits = []
        for (sign, _), ids in words.items():
            if sign == negated:
                w = np.array([parts[i].strength for i in ids], dtype=np.float32)
                fits.append(held[:, ids] @ w / w.sum())
        if fits:
            best = np.max(fits, axis=0)
            terms.append(1.0 - best if negated else best)
            weights.append(1.0)
    w = np.array(weights, dtype=np.float32)
    return (np.stack(terms, axis=1) @ w / w.sum()).astype(np.float32)


def blend(head: np.ndarray, score: np.ndarray, grounding: Grounding) -> np.ndarray:
    """The concept probability: the head's, and the fact score for the grounded share."""
    share = grounding.share
    return ((1.0 - share) * head + share * score).astype(np.float32)


# --- zero-shot figures ----------------------------------------------------------------------


def auc(score: np.ndarray, positive: np.ndarray) -> float | None:
    """Mann-Whitney AUC of `score` for `positive` (ties count half); None without both kinds."""
    from scipy.stats import rankdata

    n1, n0 = int(positive.sum()), int((~positive).sum())
    if not n1 or not n0:
        return None
    return float((rankdata(score)[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def sensor_text(g: Grounding) -> str:
    """What a grounded prompt says the sensors see, in the descriptors' own wordings (its facts
    that are not negated, each once): the text a head fitted on descriptor sentences can match
    ('' where nothing grounded)."""
    phrases = dict.fromkeys(p.phrase for p in g.parts if not p.negated)
    return ", ".join(phrases)


def calibrate(scores: np.ndarray) -> np.ndarray:
    """[N, K] scores → each pixel's percentile within its column (ties share their mean rank),
    so that descriptions of different lengths and wordings compare on one scale: a class is
    ranked by how unusually well the pixel fits *its* description in this scene, not by which
    description happens to score high everywhere. Monotone per column: AUCs are unchanged."""
    from scipy.stats import rankdata

    if not len(scores):
        return scores.astype(np.float32)
    return (rankdata(scores, axis=0) / len(scores)).astype(np.float32)


def rank_of(scores: np.ndarray, c: int) -> np.ndarray:
    """[N] rank (1 = first) of column c among the K columns of each row of scores [N, K]:
    the columns above it, and ties counted half."""
    mine = scores[:, [c]]
    return 1 + (scores > mine).sum(1) + 0.5 * ((scores == mine).sum(1) - 1)


def ranking(scores: np.ndarray, y: np.ndarray) -> dict:
    """Per class index c with pixels: top-1 and mean rank (ties count half) of c's description
    among all K for c's pixels, and the AUC of c's score over all pixels; then `summarise`d."""
    rows: dict[int, dict] = {}
    for c in range(scores.shape[1]):
        own = y == c
        if own.any():
            rank = rank_of(scores[own], c)
            rows[c] = {
                "top1": float((rank == 1).mean()), "mean_rank": float(rank.mean()),
                "auc": auc(scores[:, c], own), "pixels": int(own.sum()),
            }  # fmt: skip
    return summarise(rows)


FIGURES = ("top1", "top1_class_mean", "mean_rank", "mean_rank_class_mean", "auc_class_mean")
"""The figures `summarise` gives over classes (beside its `per_class` rows)."""


def summarise(rows: dict[int, dict]) -> dict:
    """Figures over classes from per-class rows (top1, mean_rank, auc or None, pixels): the
    pixel-weighted top-1 and mean rank, and their class means with the AUC's (each held-out
    class counts once, however many pixels it has: zero-shot learning's per-class averaged
    accuracy, Xian et al., CVPR 2017, so that a class covering most of a scene does not stand
    for the rest); rows rounded."""
    weights = np.array([r["pixels"] for r in rows.values()], dtype=float)
    weights /= max(weights.sum(), 1)
    top1 = np.array([r["top1"] for r in rows.values()])
    ranks = np.array([r["mean_rank"] for r in rows.values()])
    aucs = [r["auc"] for r in rows.values() if r["auc"] is not None]
    return {
        "top1": round(float(weights @ top1), 4) if rows else None,
        "mean_rank": round(float(weights @ ranks), 3) if rows else None,
        "top1_class_mean": round(float(np.mean(top1)), 4) if rows else None,
        "auc_class_mean": round(float(np.mean(aucs)), 4) if aucs else None,
        "mean_rank_class_mean": round(float(np.mean(ranks)), 3) if rows else None,
        "per_class": {
            int(c): {
                "top1": round(r["top1"], 4),
                "mean_rank": round(r["mean_rank"], 3),
                "auc": None if r["auc"] is None else round(r["auc"], 4),
                "pixels": r["pixels"],
            }  # fmt: skip
            for c, r in rows.items()
        },
    }


def class_scores(
    d: D.Descriptors, descriptions: Sequence[str], embed: Callable[[Sequence[str]], np.ndarray]
) -> tuple[np.ndarray, list[Grounding]]:
    """[N, K] fact scores of each class description for pixels d, and the groundings."""
    groundings = [ground(text, embed) for text in descriptions]
    facts = pixel_facts(d)
    return np.stack([fact_score(d, g, facts) for g in groundings], axis=1), groundings


def zero_shot_figures(scores: np.ndarray, y: np.ndarray, seed: int = 0) -> dict:
    """Zero-shot figures of fact scores [N, K] on labelled pixels y (class indices): no class
    label and no training went into them, so every class is unseen. Classes are ranked on the
    scores `calibrate`d within the scene. The null scores the same descriptions against
    shuffled pixels (each pixel gets another's facts)."""
    scores = calibrate(scores)
    null = scores[np.random.default_rng(seed).permutation(len(scores))]
    return {"heldout": ranking(scores, y), "null": ranking(null, y)}


def vocabulary_texts(descriptions: Sequence[str]) -> list[str]:
    """Every text `ground` embeds for these descriptions (to embed them ahead, in one batch)."""
    return [*vocabulary()[0], *(c for text in descriptions for c in clauses(text))]
