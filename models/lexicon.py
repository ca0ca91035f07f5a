"""Land-cover words and what the sensors see of them (issue 19).

A nomenclature says what a class *is* ("Buildings, roads, farmyards and other sealed surfaces",
"trees, hedges, gardens and water"), not what Sentinel-1 and -2 record of it, so its words ground
no descriptor fact directly (`models.grounding`). This lexicon is the bridge a remote-sensing
analyst carries in their head: for each common land-cover word, the facts of a pixel's year that
are typical of it, written in the descriptors' own wordings (`descriptors.TEMPLATES`), so each
one resolves to exactly one fact. It is the class-attribute matrix of attribute-based zero-shot
(Lampert et al. 2009), written from general knowledge of how land cover looks in optical and
C-band radar time series, not fitted to any labels:

- sealed surfaces are bare in every season, and double bounce off walls makes them bright and
  steady in radar whatever the season. "Never green" (NDVI below 0.3 all year) would be the
  literal reading, but at 10 m a sealed pixel's yearly NDVI peak is rarely that low (edges,
  verges, a leftover cloud: on the Flanders patch no built-up reference pixel holds it), while
  "bare" in a season (below 0.3 for most of its clear dates) holds for it in every season, in
  either hemisphere, and for no crop or grass all year;
- houses with gardens (a village, a suburb) mix roofs, lawns and trees within a 10 m pixel: a
  moderate canopy at its peak, and the walls' bright, steady radar;
- grassland stays green through the year and is cut or grazed several times;
- arable land is bare for part of the year, dense at its peak, harvested, and its radar follows
  the crop's growth;
- woodland is a dense canopy that sheds its leaves (deciduous) and scatters radar steadily from
  its volume;
- open water is water all year and dark in radar (specular reflection).

Entries carry no dates: a crop's months depend on the region's calendar, which a description
should state itself ("harvested in July"). Words are matched whole, singular or plural, and
case-insensitively. The words of one prompt are alternatives (`grounding.combine`): a pixel is
one land cover, so it fits "trees, hedges and water" as well as it fits the best of them; under
a negation ("neither cropland, grassland nor built-up", "not forest", "non-irrigated") a pixel
fits where it fits none of them. What the lexicon has no word for grounds
nothing, and the concept map then leans on the alignment head as before.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class Entry:
    name: str
    words: tuple[str, ...]  # whole words or phrases that name it
    facts: tuple[str, ...]  # wordings from `descriptors.TEMPLATES`, one fact each


STEADY_BRIGHT = ("bright in radar", "stable in radar through the year")  # walls, trunks
SEALED = ("bare in winter", "bare in spring", "bare in summer", "bare in autumn", *STEADY_BRIGHT)
GARDENS = ("moderate green vegetation at its peak", *STEADY_BRIGHT)
GRASS = ("green all year", "mown several times", "green in spring", "green in autumn")
ARABLE = (
    "bare soil", "dense green vegetation at its peak", "harvested",
    "seasonal in radar through the year",
)  # fmt: skip
WOODLAND = ("dense green vegetation at its peak", "leaves fall", *STEADY_BRIGHT)
WATER = ("open water all year", "dark in radar")

ENTRIES = (
    Entry(
        "sealed surfaces",
        (
            "built-up",
            "building",
            "house",
            "road",
            "street",
            "sealed surface",
            "impervious",
            "concrete",
            "asphalt",
            "pavement",
            "urban",
            "town",
            "city",
            "farmyard",
            "car park",
            "parking",
            "industrial",
            "settlement",
        ),
        SEALED,
    ),
    Entry("houses with gardens", ("garden", "village", "suburb", "residential"), GARDENS),
    Entry(
        "grassland",
        ("grassland", "grass", "pasture", "meadow", "lawn", "grazed", "grazing", "hay"),
        GRASS,
    ),
    Entry(
        "arable land",
        (
            "cropland",
            "crop",
            "arable",
            "field",
            "farmland",
            "cereal",
            "wheat",
            "barley",
            "maize",
            "corn",
            "potato",
            "vegetable",
            "beet",
            "rapeseed",
            "ploughed",
            "plowed",
            "sown",
            "tillage",
        ),
        ARABLE,
    ),
    Entry(
        "woodland",
        (
            "forest",
            "woodland",
            "wood",
            "tree",
            "hedge",
            "hedgerow",
            "broadleaf",
            "deciduous",
            "copse",
            "orchard",
            "shrub",
            "scrub",
        ),
        WOODLAND,
    ),
    Entry(
        "open water",
        ("water", "lake", "pond", "river", "canal", "ditch", "reservoir", "sea", "stream"),
        WATER,
    ),
    Entry("wetland", ("wetland", "marsh", "bog", "swamp", "fen"), ("flooded in winter",)),
    Entry(
        "bare ground",
        ("bare rock", "rock", "sand", "dune", "beach", "quarry", "gravel", "bare ground"),
        ("never green", "looks the same in every season"),
    ),
    Entry("snow and ice", ("snow", "glacier", "ice"), ("snow-covered in winter",)),
)

# Words that put what follows them under a negation (`grounding` adds "never" for facts).
NEGATION_WORDS = (
    "neither",
    "nor",
    "not",
    "no",
    "non",
    "without",
    "except",
    "other than",
    "excluding",
)
_NEGATION = re.compile(rf"\b({'|'.join(NEGATION_WORDS)})\b", re.I)


@dataclass(frozen=True)
class Mention:
    word: str  # as written in the text
    entry: Entry
    negated: bool


@lru_cache(maxsize=1)
def _pattern() -> re.Pattern:
    words = sorted({w for e in ENTRIES for w in e.words}, key=len, reverse=True)  # longest first
    alternatives = "|".join(re.escape(w).replace(r"\ ", r"\s+") + "(?:e?s)?" for w in words)
    return re.compile(rf"(?<!\w)({alternatives})(?![\w-])", re.I)


def _entry(word: str) -> Entry:
    key = re.sub(r"\s+", " ", word.lower())
    for entry in ENTRIES:
        for w in entry.words:
            if key == w or key in (w + "s", w + "es"):
                return entry
    raise KeyError(word)


def mentions(clause: str, negated: bool = False) -> list[Mention]:
    """The land-cover words of one clause, each with its entry once (first mention), and
    whether it stands under a negation (`negated`: the clause continues one that began it)."""
    out: dict[str, Mention] = {}
    for found in _pattern().finditer(clause):
        before = clause[: found.start()]
        entry = _entry(found.group(1))
        if entry.name not in out:
            out[entry.name] = Mention(
                found.group(1), entry, negated or bool(_NEGATION.search(before))
            )
    return list(out.values())


_NEITHER, _NOR = re.compile(r"\bneither\b", re.I), re.compile(r"\bnor\b", re.I)


def negation_carries(clause: str, carried: bool = False) -> bool:
    """Whether a negation reaches past this clause into the next ones: a "neither" here with
    no "nor" after it, or one `carried` from an earlier clause that this one does not end."""
    if found := _NEITHER.search(clause):
        return not _NOR.search(clause, found.end())
    return carried and not _NOR.search(clause)
