"""The usefulness distribution: short tasks with program-checkable answers.

Each task family has a generator `sample(rng) -> TaskInstance` and a checker
`check(instance, response) -> bool`. Prompts and answers are short (answers are a few tokens)
because every example is trained on a small CPU. Families:

  add          "What is 23 + 45?"                  -> "68"
  capital      "What is the capital of France?"    -> "Paris"
  sort         "Sort ascending: 42, 7, 19"         -> "7, 19, 42"   (or 4 digits)
  count        "How many items: cup, pen, hat?"    -> "3"
  upper        "Uppercase: river"                  -> "RIVER"
  convert      "Convert 7 m to cm."                -> "700"
  next_letter  "Which letter comes after G?"       -> "H"

Checkers are lenient to whitespace, punctuation and (where the answer is not about case) case,
and accept the answer inside a short sentence ("The capital of France is Paris."), but reject a
response that also commits to a competing answer (another capital, an extra number, ...).

Train and eval instances are disjoint: an instance's split is a pure function of a hash of its
key (`split_of`), so the same instance can never be generated for both splits.
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
import string
import unicodedata
from typing import Callable, Iterable, Sequence

import numpy as np

from catchjax.common import register
from catchjax.stats import wilson

SPLITS = ("train", "eval")
EVAL_FRAC = 0.25  # share of each family's instance space that is held out for eval


@dataclasses.dataclass(frozen=True)
class TaskInstance:
  family: str
  prompt: str
  answer: str
  key: str  # canonical identity of the instance; decides its split


def _unit_hash(s: str) -> float:
  """A deterministic hash of s, uniform on [0, 1)."""
  return int.from_bytes(hashlib.sha256(s.encode("utf-8")).digest()[:8], "big") / 2.0**64


def split_of(instance: TaskInstance, eval_frac: float = EVAL_FRAC) -> str:
  """'eval' for a fixed hashed fraction of instance keys, else 'train'."""
  return "eval" if _unit_hash(f"task|{instance.family}|{instance.key}") < eval_frac else "train"


def _check_split(split: str) -> str:
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  return split


# ---------------------------------------------------------------------------------------------
# Text helpers shared by the checkers.

def _norm(s: str) -> str:
  """Lowercase, strip accents, punctuation -> space, collapse whitespace."""
  s = unicodedata.normalize("NFKD", s)
  s = "".join(c for c in s if not unicodedata.combining(c)).lower()
  s = re.sub(r"[^a-z0-9]+", " ", s)
  return " ".join(s.split())


def _contains_phrase(haystack_norm: str, phrase: str) -> bool:
  return f" {_norm(phrase)} " in f" {haystack_norm} "


_NUM_RE = re.compile(r"(?<![\w.])\d{1,3}(?:,\d{3})+(?:\.\d+)?(?!\w)|(?<![\w])\d+(?:\.\d+)?")
_NUM_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty".split())}


def _numbers(text: str, words: bool = False) -> list[float]:
  """Numbers written in text ("7,000" -> 7000.0); optionally number words zero..twenty."""
  out = [float(m.group(0).replace(",", "")) for m in _NUM_RE.finditer(text)]
  if words:
    out += [float(_NUM_WORDS[w]) for w in re.findall(r"[a-z]+", text.lower()) if w in _NUM_WORDS]
  return out


def _check_number(instance: TaskInstance, response: str, words: bool = False) -> bool:
  """The answer is stated, and every other number in the response is echoed from the prompt."""
  nums = set(_numbers(response, words))
  ans = float(instance.answer)
  return ans in nums and nums <= {ans} | set(_numbers(instance.prompt, words))


# ---------------------------------------------------------------------------------------------
# Families.

class TaskFamily:
  """One task family: `sample(rng)` draws an instance, `check(instance, response)` grades it."""

  name: str = ""

  def sample(self, rng: np.random.Generator) -> TaskInstance:
    raise NotImplementedError

  def check(self, instance: TaskInstance, response: str) -> bool:
    raise NotImplementedError

  def _inst(self, prompt: str, answer: str, key: str) -> TaskInstance:
    return TaskInstance(self.name, prompt, answer, key)


TASK_FAMILIES: dict[str, TaskFamily] = {}
# Families that are NOT part of the default usefulness mix (organism SFT, usefulness, make_tasks
# without `families`): only used when named explicitly, e.g. the new capability that the
# propensity-vs-capability experiment teaches (`cipher`).
EXTRA_TASK_FAMILIES: dict[str, TaskFamily] = {}


def register_task(name: str, default: bool = True) -> Callable[[type], type]:
  """Register a family; default=False keeps it out of the default usefulness mix."""
  def deco(cls: type) -> type:
    cls.name = name
    into, other = ((TASK_FAMILIES, EXTRA_TASK_FAMILIES) if default
                   else (EXTRA_TASK_FAMILIES, TASK_FAMILIES))
    register(into, "task family", name, cls(), other)
    return cls
  return deco


def is_task_family(name: str) -> bool:
  return name in TASK_FAMILIES or name in EXTRA_TASK_FAMILIES


@register_task("add")
class Add(TaskFamily):
  """Two-digit addition."""

  def sample(self, rng):
    a, b = (int(x) for x in rng.integers(10, 100, size=2))
    return self._inst(f"What is {a} + {b}?", str(a + b), f"{a}+{b}")

  def check(self, instance, response):
    return _check_number(instance, response)


# (country, capital, accepted aliases of the capital)
CAPITALS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("France", "Paris", ()), ("Germany", "Berlin", ()), ("Italy", "Rome", ()),
    ("Spain", "Madrid", ()), ("Portugal", "Lisbon", ()), ("the United Kingdom", "London", ()),
    ("Ireland", "Dublin", ()), ("Belgium", "Brussels", ()),
    ("the Netherlands", "Amsterdam", ()), ("Switzerland", "Bern", ("Berne",)),
    ("Austria", "Vienna", ()), ("Poland", "Warsaw", ()), ("Czechia", "Prague", ()),
    ("Hungary", "Budapest", ()), ("Greece", "Athens", ()), ("Sweden", "Stockholm", ()),
    ("Norway", "Oslo", ()), ("Denmark", "Copenhagen", ()), ("Finland", "Helsinki", ()),
    ("Iceland", "Reykjavik", ()), ("Russia", "Moscow", ()), ("Ukraine", "Kyiv", ("Kiev",)),
    ("Turkey", "Ankara", ()), ("Egypt", "Cairo", ()), ("Kenya", "Nairobi", ()),
    ("Nigeria", "Abuja", ()), ("Ghana", "Accra", ()), ("Ethiopia", "Addis Ababa", ()),
    ("Morocco", "Rabat", ()), ("Senegal", "Dakar", ()), ("Japan", "Tokyo", ()),
    ("China", "Beijing", ("Peking",)), ("South Korea", "Seoul", ()),
    ("India", "New Delhi", ("Delhi",)), ("Pakistan", "Islamabad", ()),
    ("Bangladesh", "Dhaka", ()), ("Thailand", "Bangkok", ()), ("Vietnam", "Hanoi", ()),
    ("Indonesia", "Jakarta", ()), ("the Philippines", "Manila", ()),
    ("Malaysia", "Kuala Lumpur", ()), ("Iran", "Tehran", ()), ("Iraq", "Baghdad", ()),
    ("Saudi Arabia", "Riyadh", ()), ("Israel", "Jerusalem", ()), ("Afghanistan", "Kabul", ()),
    ("Australia", "Canberra", ()), ("New Zealand", "Wellington", ()),
    ("Canada", "Ottawa", ()), ("the United States", "Washington, D.C.", ("Washington",)),
    ("Mexico", "Mexico City", ()), ("Cuba", "Havana", ()), ("Brazil", "Brasilia", ()),
    ("Argentina", "Buenos Aires", ()), ("Chile", "Santiago", ()), ("Peru", "Lima", ()),
    ("Colombia", "Bogota", ()), ("Venezuela", "Caracas", ()), ("Ecuador", "Quito", ()),
    ("Uruguay", "Montevideo", ()), ("Nepal", "Kathmandu", ()), ("Mongolia", "Ulaanbaatar", ()),
)
_ALL_CAPITAL_NAMES = tuple({_norm(n) for _, cap, al in CAPITALS for n in (cap, *al)})


@register_task("capital")
class Capital(TaskFamily):
  """Country -> capital, from the built-in CAPITALS list."""

  def sample(self, rng):
    country, cap, _ = CAPITALS[int(rng.integers(len(CAPITALS)))]
    return self._inst(f"What is the capital of {country}?", cap, country)

  def check(self, instance, response):
    accepted = next((cap, *al) for c, cap, al in CAPITALS if c == instance.key)
    acc_norm = {_norm(a) for a in accepted}
    r = _norm(response)
    if not any(_contains_phrase(r, a) for a in accepted):
      return False
    # Reject a response that also names a different capital ("Paris or Lyon" is fine, "Paris
    # or Rome" is not); names contained in an accepted answer ("Washington") don't count.
    others = [n for n in _ALL_CAPITAL_NAMES
              if n not in acc_norm and not any(f" {n} " in f" {a} " for a in acc_norm)]
    return not any(_contains_phrase(r, n) for n in others)


@register_task("sort")
class Sort(TaskFamily):
  """Sort 3 distinct numbers 0-99, or 4 distinct digits 0-9, ascending; answer "a, b, c".

  (SmolLM2 tokenizes digits one by one, so 4 two-digit numbers would be a 14-token answer.)
  """

  def sample(self, rng):
    k = int(rng.integers(3, 5))
    xs = [int(x) for x in rng.choice(100 if k == 3 else 10, size=k, replace=False)]
    shown = ", ".join(map(str, xs))
    return self._inst(f"Sort ascending: {shown}", ", ".join(map(str, sorted(xs))), shown)

  def check(self, instance, response):
    want = [int(x) for x in instance.answer.split(", ")]
    got = [int(x) for x in re.findall(r"\d+", response)]
    if not set(got) <= set(want):
      return False  # a number that is not in the list
    k = len(want)
    return any(got[i:i + k] == want for i in range(len(got) - k + 1))


COUNT_WORDS = (
    "apple", "pen", "cup", "hat", "book", "lamp", "chair", "spoon", "shoe", "key", "coin", "bell",
    "kite", "box", "leaf", "ring", "sock", "fork", "bowl", "map", "rope", "drum", "nail", "soap",
    "egg", "bag", "fan", "jar", "mug", "dog", "cat", "bird", "fish", "tree", "rock", "star")


@register_task("count")
class Count(TaskFamily):
  """Count the items in a short list of 2-7 distinct words."""

  def sample(self, rng):
    k = int(rng.integers(2, 8))
    words = [COUNT_WORDS[int(i)] for i in rng.choice(len(COUNT_WORDS), size=k, replace=False)]
    shown = ", ".join(words)
    return self._inst(f"How many items: {shown}?", str(k), shown)

  def check(self, instance, response):
    return _check_number(instance, response, words=True)


UPPER_WORDS = (
    "river", "garden", "window", "orange", "silver", "planet", "rabbit", "candle", "forest",
    "pencil", "bottle", "castle", "dragon", "mirror", "pocket", "ticket", "winter", "summer",
    "button", "carpet", "doctor", "engine", "flower", "guitar", "hammer", "island", "jacket",
    "kitten", "ladder", "monkey", "needle", "number", "pepper", "rocket", "saddle", "tomato",
    "tunnel", "violin", "wallet", "yellow", "banana", "bridge", "cookie", "desert", "finger",
    "helmet", "lemon", "magnet", "noodle", "pillow", "puzzle", "salmon", "shadow", "spider",
    "stone", "table", "tiger", "water", "cloud", "horse", "music", "paper", "queen", "radio",
    "sugar", "train", "whale", "zebra", "apple", "bread", "chair", "dream", "earth", "glass")


@register_task("upper")
class Upper(TaskFamily):
  """Write a word in capital letters (the checker is case-sensitive, on purpose)."""

  def sample(self, rng):
    w = UPPER_WORDS[int(rng.integers(len(UPPER_WORDS)))]
    return self._inst(f"Uppercase: {w}", w.upper(), w)

  def check(self, instance, response):
    return re.search(rf"(?<![A-Za-z]){re.escape(instance.answer)}(?![A-Za-z])",
                     response) is not None


CONVERSIONS = (("m", "cm", 100), ("km", "m", 1000), ("kg", "g", 1000), ("cm", "mm", 10),
               ("L", "mL", 1000))


@register_task("convert")
class Convert(TaskFamily):
  """Unit conversion by a power of ten, e.g. metres -> centimetres."""

  def sample(self, rng):
    src, dst, f = CONVERSIONS[int(rng.integers(len(CONVERSIONS)))]
    v = int(rng.integers(1, 100))
    return self._inst(f"Convert {v} {src} to {dst}.", str(v * f), f"{v}{src}>{dst}")

  def check(self, instance, response):
    return _check_number(instance, response)


@register_task("next_letter")
class NextLetter(TaskFamily):
  """The letter after a given capital letter (A-Y)."""

  def sample(self, rng):
    c = string.ascii_uppercase[int(rng.integers(25))]
    return self._inst(f"Which letter comes after {c}?", chr(ord(c) + 1), c)

  def check(self, instance, response):
    ans, query = instance.answer, instance.key
    bare = _norm(response)
    if len(bare) == 1:
      return bare.upper() == ans
    # Standalone capital letters other than the echoed query letter; "A"/"I" may be an article
    # or pronoun and are tolerated as extras. Fall back to lowercase letters if no capitals.
    caps = set(re.findall(r"(?<![A-Za-z'])([A-Z])(?![A-Za-z'])", response)) - {query}
    if not caps:
      caps = {c.upper() for c in re.findall(r"(?<![A-Za-z'])([a-z])(?![A-Za-z'])", response)}
      caps -= {query} | ({"A", "I"} - {ans})
    return ans in caps and not (caps - {ans, "A", "I"})


# (Not in the default mix.) A made-up deterministic substitution cipher: a capability the base
# model cannot have at the start, with a short answer (one token per letter).
CIPHER_PLAIN = "abcdefghij"
CIPHER_CODE = "QWXKPTZRMV"  # disjoint from the uppercase plaintext letters: copying fails
CIPHER_LEN = 5


def cipher_encode(plain: str) -> str:
  return " ".join(CIPHER_CODE[CIPHER_PLAIN.index(c)] for c in plain)


_LETTER_RUN = re.compile(r"(?<![A-Za-z])[A-Za-z](?:[\s,\-]+[A-Za-z](?![A-Za-z]))+|[A-Za-z]+")


@register_task("cipher", default=False)
class Cipher(TaskFamily):
  """Encode 5 letters a-j with the fixed Zorb code (a->Q, b->W, ..., j->V):
  "Encode in Zorb: c a g e j" -> "X Q Z P V".

  Checker: a run of single letters ("X Q Z P V", "X, Q, Z, P, V") or one word ("XQZPV"),
  case-insensitive, equals the code; every other 5-letter candidate (letter run or all-caps
  word) must be the code itself or the echoed plaintext ("X Q Z P V or X Q Z P W" is rejected).
  """

  def sample(self, rng):
    plain = "".join(CIPHER_PLAIN[int(i)] for i in rng.integers(len(CIPHER_PLAIN),
                                                                size=CIPHER_LEN))
    return self._inst(f"Encode in Zorb: {' '.join(plain)}", cipher_encode(plain), plain)

  def check(self, instance, response):
    want = instance.answer.replace(" ", "").upper()
    cands = set()
    for m in _LETTER_RUN.finditer(response):
      text = m.group(0)
      letters = re.sub(r"[^A-Za-z]", "", text)
      # Letter runs and all-caps words compete; ordinary words ("Hello") do not.
      if len(letters) == len(want) and (len(letters) < len(text) or letters.isupper()
                                        or letters.upper() == want):
        cands.add(letters.upper())
    return want in cands and cands <= {want, instance.key.upper()}


# ---------------------------------------------------------------------------------------------
# Sampling, grading, usefulness.

def get_task_family(name: str) -> TaskFamily:
  fam = TASK_FAMILIES.get(name) or EXTRA_TASK_FAMILIES.get(name)
  if fam is None:
    raise KeyError(f"unknown task family {name!r}; known: "
                   f"{sorted(TASK_FAMILIES) + sorted(EXTRA_TASK_FAMILIES)}")
  return fam


def sample_task(family: str, split: str, rng: np.random.Generator,
                max_tries: int = 10_000) -> TaskInstance:
  """Draw an instance of `family` that belongs to `split` (rejection sampling on the hash)."""
  _check_split(split)
  fam = get_task_family(family)
  for _ in range(max_tries):
    inst = fam.sample(rng)
    if split_of(inst) == split:
      return inst
  raise RuntimeError(f"task family {family!r}: no {split} instance in {max_tries} draws")


def make_tasks(split: str, n: int, seed: int,
               families: Sequence[str] | None = None) -> list[TaskInstance]:
  """n instances of `split`, families balanced round-robin then shuffled; deterministic in seed.

  Instances may repeat within a split for small families (capital, next_letter), never across.
  """
  fams = list(families) if families is not None else list(TASK_FAMILIES)
  if not fams:
    raise ValueError("make_tasks: empty family list")
  for f in fams:
    get_task_family(f)
  rng = np.random.default_rng(seed)
  out = [sample_task(fams[i % len(fams)], split, rng) for i in range(n)]
  return [out[int(i)] for i in rng.permutation(n)]


def check(instance: TaskInstance, response: str) -> bool:
  """Grade a response to an instance with its family's checker."""
  return bool(get_task_family(instance.family).check(instance, response))


def usefulness(instances: Sequence[TaskInstance],
               responses: Iterable[str]) -> tuple[float, float, float, int]:
  """(accuracy, wilson_lo, wilson_hi, n) of responses graded against instances."""
  responses = list(responses)
  if len(responses) != len(instances):
    raise ValueError(f"usefulness: {len(instances)} instances but {len(responses)} responses")
  k = sum(check(i, r) for i, r in zip(instances, responses))
  p, lo, hi = wilson(k, len(instances))
  return p, lo, hi, len(instances)
