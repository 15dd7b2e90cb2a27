"""Object names as the audit compares them: the instruction's nouns, a teacher's object names and the
simulator's object names reduced to one canonical word each, so "the blue cloths" names the "towel".

The rules are deliberately small and written out, so a number in a report can be checked by hand:

- words are the lowercase runs of letters (digits and punctuation dropped: "spoon 3" is "spoon");
- stopwords (articles, prepositions, pronouns, conjunctions), manipulation verbs (put, pick, place, ...)
  and place words (left, top, middle, ...) are never nouns;
- a modifier (a colour, a material, a size: "green", "wooden", "small") is an adjective when another
  candidate word follows it ("green block" names a block) and a noun when it ends the phrase ("put the
  green on the yellow");
- plurals are made singular by suffix rules ("-ies" -> "-y"; "-sses", "-shes", "-ches", "-xes", "-zes" drop
  "-es"; a final "-s" is dropped unless the word ends in "-ss", "-us" or "-is") plus a few irregulars;
- synonyms map to one word: towel ~ cloth ~ rag ~ napkin, cube ~ block, plate ~ dish, basket ~ bin,
  mug ~ cup, eggplant ~ aubergine.

A teacher's object matches a simulator object when the simulator name's head noun (its last noun) is
among the teacher name's nouns; shared modifiers ("green" in "green block" and "green cube") break ties
between objects of one kind.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_WORD = re.compile(r"[a-z]+")


def _word_set(text: str) -> frozenset[str]:
    return frozenset(text.split())


STOPWORDS = _word_set(
    "a an the this that these those it its it's them they their there here of on onto in into inside to from "
    "at by with without for over under above below beneath behind beside besides near next up down off out "
    "and or but then so as while until if is are be been being was were has have had do does some any each "
    "every all both one two three other another which what where who whom you your we our me my i"
)
VERBS = _word_set(
    "put place move pick take push pull open close stack lift grasp grab turn flip wipe sweep fold unfold "
    "pour insert remove drop slide knock rotate set get bring hold reach release transfer sort clean stir "
    "press hang cover uncover lay leave store carry throw topple fetch dump empty fill arrange align separate "
    "straighten return make use go try"
)
PLACES = _word_set(
    "left right top bottom front back middle center centre side edge corner end far near upper lower rear"
)
MODIFIERS = _word_set(
    "red green blue yellow orange purple pink black white gray grey brown silver gold golden beige cyan "
    "magenta violet dark light small big large little tiny tall short long round square wooden metal "
    "metallic plastic glass paper ceramic toy"
)
SYNONYMS = {
    "cloth": "towel",
    "rag": "towel",
    "napkin": "towel",
    "block": "cube",
    "dish": "plate",
    "bin": "basket",
    "cup": "mug",
    "aubergine": "eggplant",
}
# Always in the picture and never listed among a simulator scene's objects: naming them is not a hallucination.
ALWAYS_PRESENT = _word_set(
    "robot arm gripper hand finger claw table tabletop surface counter countertop wall floor background"
)
_IRREGULAR = {
    "knives": "knife",
    "leaves": "leaf",
    "loaves": "loaf",
    "halves": "half",
    "shelves": "shelf",
    "mice": "mouse",
    "children": "child",
    "teeth": "tooth",
    "feet": "foot",
    "people": "person",
    "tomatoes": "tomato",
    "potatoes": "potato",
    "mangoes": "mango",
    "glasses": "glass",
    "dishes": "dish",
}
_KEEP_S = ("ss", "us", "is")


def words(text: str) -> list[str]:
    """The lowercase letter runs of `text` (digits and punctuation dropped)."""
    return _WORD.findall(text.lower())


def singular(word: str) -> str:
    """`word` without a plural ending, by the module's suffix rules (never shorter than 3 letters)."""
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if len(word) <= 3:
        return word
    if word.endswith("ies"):
        return word[:-3] + "y"
    if word.endswith(("sses", "shes", "ches", "xes", "zes")):
        return word[:-2]
    if word.endswith("s") and not word.endswith(_KEEP_S):
        return word[:-1]
    return word


def canonical(word: str) -> str:
    """The one word a lowercase word stands for: singular, then its synonym group's name."""
    one = singular(word)
    return SYNONYMS.get(one, one)


def _candidate(word: str) -> bool:
    return word not in STOPWORDS and word not in VERBS and word not in PLACES


def nouns(text: str) -> list[str]:
    """The object nouns of a phrase or instruction, canonical, in order, each once."""
    ws = words(text)
    out: list[str] = []
    for i, w in enumerate(ws):
        if not _candidate(w):
            continue
        if w in MODIFIERS and i + 1 < len(ws) and _candidate(ws[i + 1]):
            continue  # an adjective: the noun follows
        c = canonical(w)
        if c not in out:
            out.append(c)
    return out


def vocabulary(text: str) -> set[str]:
    """Every word of `text` in canonical form: what a noun is looked up in."""
    return {canonical(w) for w in words(text)}


def name_words(name: str) -> set[str]:
    """An object name's canonical words, stopwords dropped (modifiers kept: they break ties)."""
    return {canonical(w) for w in words(name) if w not in STOPWORDS}


def head_noun(name: str) -> str | None:
    """The noun a name is about: its last noun ("green cube" -> "cube"); None when it has none."""
    found = nouns(name)
    return found[-1] if found else None


def match_score(teacher_name: str, truth_name: str) -> int:
    """How well a teacher's object name names a simulator object: 0 when the truth name's head noun is
    not among the teacher name's words, else 1 + the other words they share (a shared colour)."""
    head = head_noun(truth_name)
    mine = name_words(teacher_name)
    if head is None or head not in mine:
        return 0
    return 1 + len((mine & name_words(truth_name)) - {head})


def assign(teacher_names: Sequence[str], truth_names: Sequence[str]) -> dict[int, int]:
    """One-to-one matches truth index -> teacher index, best name score first (ties: truth order, then
    the teacher's order), so two "cube"s are told apart by their colours when the teacher gives them."""
    pairs = sorted(
        (
            (-score, i, j)
            for i, truth in enumerate(truth_names)
            for j, mine in enumerate(teacher_names)
            if (score := match_score(mine, truth)) > 0
        ),
    )
    out: dict[int, int] = {}
    used: set[int] = set()
    for _, i, j in pairs:
        if i not in out and j not in used:
            out[i] = j
            used.add(j)
    return out


def in_scene(teacher_name: str, scene_names: Sequence[str]) -> bool:
    """Whether a teacher's object is something the scene has: one of its objects (by `match_score`), or
    what every picture holds, by the name's head noun (the robot's arm, the table: `ALWAYS_PRESENT`)."""
    return head_noun(teacher_name) in ALWAYS_PRESENT or any(match_score(teacher_name, s) > 0 for s in scene_names)
