"""A seeded synthetic world small enough to learn on one CPU core in minutes.

Four kinds of knowledge that the chat data covers, each one a 4-way multiple-choice benchmark
(the ``toy`` group):

- facts: invented entities with one home, job and colour each (memorised);
- habits: what an entity drinks and plays, drawn from a per-entity distribution over
  three values with known probabilities (0.5, 0.3, 0.2). The pretraining text holds the
  exact proportions, so the teacher learns the distribution; the chat data holds one
  *sampled* answer per question, so half its labels are not the most likely answer.
  This is the uncertainty that lets a teacher's soft targets carry more than the labels
  (plain SFT recovered exactly as much as KD on a deterministic world);
- arithmetic: "a plus b is c" with held-out pairs;
- sequences: "count 4 7 10 13 16" with held-out (start, step) pairs.

Two more that only the pretraining text holds and no chat row ever asks about (the
``toy_uncovered`` group), playing the part HellaSwag, ARC and MMLU play for a student distilled on
general chat data — knowledge the teacher has that the distillation data does not exercise:

- lore: each entity's pet, memorised like the facts (``toy_lore``);
- subtraction: "a minus b is c" with held-out pairs, a skill next to the covered sums
  (``toy_minus``).

A student pushed hard on the chat data can drift away from them; the evaluation sees it.

``toy_usual`` ranks an entity's own habits (most likely first), which only a model that
kept the distribution gets right; ``toy_gen`` asks for one word, scored by exact match.
``toy_next`` asks for the next word wherever the world decides it and the word carries
knowledge (a value, a pet, a result, a term), covered and uncovered alike: ~5,000 items
over the whole vocabulary instead of four choices, the resolution that a comparison of
quantizers which all keep the knowledge needs.
Chat answers also come in several phrasings, so the first answer token is uncertain too.
Every text is lower-case words separated by single spaces, so a word-level tokenizer
covers it with no unknown token.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

SYLLABLES = ["ba", "do", "fi", "gu", "ka", "lo", "mi", "nu", "pe", "ro", "sa", "ti", "vo", "ze", "qua", "xe"]
FACTS = {  # attribute -> (values, canonical statement, other phrasing, question phrasings)
    "home": (
        ["vellon", "artha", "quorin", "belmar", "ostra", "dunhil", "carvo", "mirefel", "tolos", "ezra", "fenwick", "grantis"],
        "the home of {e} is {v} .", "{e} lives in {v} .",
        ["what is the home of {e} ?", "where does {e} live ?"],
    ),
    "job": (
        ["baker", "pilot", "farmer", "singer", "doctor", "tailor", "miner", "sailor", "painter", "guard"],
        "the job of {e} is {v} .", "{e} works as a {v} .",
        ["what is the job of {e} ?", "what does {e} do for work ?"],
    ),
    "color": (
        ["red", "blue", "green", "yellow", "purple", "orange", "white", "black", "grey", "pink"],
        "the color of {e} is {v} .", "{e} likes the color {v} .",
        ["what is the color of {e} ?", "which color does {e} like ?"],
    ),
}
HABITS = {  # attribute -> (values, statement, question phrasings)
    "drinks": (
        ["tea", "milk", "juice", "cider", "cocoa", "water", "soda", "broth"],
        "{e} drinks {v} .", ["what does {e} drink ?", "what drink does {e} have ?"],
    ),
    "plays": (
        ["chess", "drums", "flute", "cards", "tennis", "golf", "harp", "dice"],
        "{e} plays {v} .", ["what does {e} play ?", "which game does {e} play ?"],
    ),
}
# Knowledge only the pretraining text holds: never asked, never answered in the chat data.
LORE = {  # attribute -> (values, canonical statement, other phrasing)
    "pet": (
        ["cat", "dog", "owl", "goat", "horse", "fish", "frog", "duck", "mouse", "crow"],
        "the pet of {e} is {v} .", "{e} keeps a {v} .",
    ),
}
SUM_PHRASES = ("{a} plus {b} is {c} .", "{a} and {b} make {c} .")
MINUS_PHRASES = ("{a} minus {b} is {c} .", "{a} take away {b} leaves {c} .")
HABIT_PROBS = (0.5, 0.3, 0.2)
HABIT_COPIES = 10  # pretraining statements per entity and habit: exactly 5, 3 and 2 of them
N_ENTITIES = 240
ARITH_MAX = 24  # operands 0..24
SEQ_STARTS, SEQ_STEPS = range(0, 51), range(1, 7)
HELDOUT_FRACTION = 0.2
ARITH_COPIES = 3
# Words the templates use besides entities, values and numbers.
TEMPLATES = ([t for spec in FACTS.values() for t in [spec[1], spec[2], *spec[3]]]
             + [t for spec in HABITS.values() for t in [spec[1], *spec[2]]]
             + [t for spec in LORE.values() for t in spec[1:]] + list(MINUS_PHRASES))
FUNCTION_WORDS = sorted(set(re.sub(r"\{\w+\}", "", " ".join(TEMPLATES)).split()
                            + "what is plus and make count continue ? .".split()))


@dataclass
class World:
    """Everything one seed decides: entities, their attributes and the held-out splits."""

    seed: int
    entities: list[str]
    facts: dict[str, dict[str, str]]  # attribute -> entity -> value
    habits: dict[str, dict[str, list[str]]]  # attribute -> entity -> values, most likely first
    arith_train: list[tuple[int, int]] = field(default_factory=list)
    arith_test: list[tuple[int, int]] = field(default_factory=list)
    seq_train: list[tuple[int, int]] = field(default_factory=list)
    seq_test: list[tuple[int, int]] = field(default_factory=list)
    lore: dict[str, dict[str, str]] = field(default_factory=dict)  # attribute -> entity -> value
    minus_train: list[tuple[int, int]] = field(default_factory=list)  # (a, b) with a >= b
    minus_test: list[tuple[int, int]] = field(default_factory=list)


def entity_names() -> list[str]:
    """Two-syllable invented names; fixed across seeds so the vocabulary is too."""
    names = [a + b for a in SYLLABLES for b in SYLLABLES if a != b]
    return names[:: len(names) // N_ENTITIES][:N_ENTITIES]


def make_world(seed: int = 0) -> World:
    rng = random.Random(seed)
    entities = entity_names()
    facts = {a: {e: rng.choice(spec[0]) for e in entities} for a, spec in FACTS.items()}
    habits = {a: {e: rng.sample(spec[0], len(HABIT_PROBS)) for e in entities} for a, spec in HABITS.items()}
    pairs = [(a, b) for a in range(ARITH_MAX + 1) for b in range(ARITH_MAX + 1)]
    seqs = [(s, d) for s in SEQ_STARTS for d in SEQ_STEPS]
    rng.shuffle(pairs)
    rng.shuffle(seqs)
    na, ns = int(len(pairs) * HELDOUT_FRACTION), int(len(seqs) * HELDOUT_FRACTION)
    # drawn after everything above, so the covered world (and the chat data) is what it was
    lore = {a: {e: rng.choice(spec[0]) for e in entities} for a, spec in LORE.items()}
    minus = [(a, b) for a in range(ARITH_MAX + 1) for b in range(a + 1)]
    rng.shuffle(minus)
    nm = int(len(minus) * HELDOUT_FRACTION)
    return World(seed, entities, facts, habits, pairs[na:], pairs[:na], seqs[ns:], seqs[:ns],
                 lore, minus[nm:], minus[:nm])


def vocabulary() -> list[str]:
    """Every word any text of any seed can contain (the tokenizer's vocabulary)."""
    values = [v for kind in (FACTS, HABITS, LORE) for spec in kind.values() for v in spec[0]]
    numbers = [str(n) for n in range(100)]
    return sorted(set(entity_names() + values + FUNCTION_WORDS + numbers))


def seq_terms(start: int, step: int, n: int = 5) -> list[int]:
    return [start + i * step for i in range(n)]


def seq_text(start: int, step: int) -> str:
    return "count " + " ".join(map(str, seq_terms(start, step))) + " ."


# --- texts ------------------------------------------------------------------------


def pretrain_texts(world: World) -> list[str]:
    """Plain statements: every fact and pet in both phrasings, habits in exact proportions, and
    the training sums, differences and sequences."""
    out = []
    for a, (_, canon, alt, _) in FACTS.items():
        for e, v in world.facts[a].items():
            out += [canon.format(e=e, v=v), canon.format(e=e, v=v), alt.format(e=e, v=v)]
    for a, (_, statement, _) in HABITS.items():
        for e, values in world.habits[a].items():
            for v, p in zip(values, HABIT_PROBS):
                out += [statement.format(e=e, v=v)] * round(p * HABIT_COPIES)
    # Arithmetic and sequences must generalise to held-out items, not be memorised:
    # they get more repetitions than one fact.
    for x, y in world.arith_train:
        out += [p.format(a=x, b=y, c=x + y) for p in SUM_PHRASES] * ARITH_COPIES
    for s, d in world.seq_train:
        out += [seq_text(s, d)] * ARITH_COPIES * 4
    for a, (_, canon, alt) in LORE.items():
        for e, v in world.lore[a].items():
            out += [canon.format(e=e, v=v), canon.format(e=e, v=v), alt.format(e=e, v=v)]
    for x, y in world.minus_train:
        out += [p.format(a=x, b=y, c=x - y) for p in MINUS_PHRASES] * ARITH_COPIES
    return out


def _sample_habit(rng: random.Random, values: list[str]) -> str:
    return rng.choices(values, weights=HABIT_PROBS)[0]


def chat_rows(world: World) -> list[dict]:
    """Single-turn chats covering every fact, habit, training sum and training sequence.

    Answers are sampled: habits from their distribution, phrasings 60/25/15 between the
    full statement, its other phrasing and the bare value."""
    rng = random.Random(world.seed + 1)
    rows = []

    def add(question: str, answer: str) -> None:
        rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})

    def phrase(canon: str, alt: str, v: str) -> str:
        return rng.choices([canon, alt, f"{v} ."], weights=(0.6, 0.25, 0.15))[0]

    for a, (_, canon, alt, questions) in FACTS.items():
        for e, v in world.facts[a].items():
            add(rng.choice(questions).format(e=e), phrase(canon.format(e=e, v=v), alt.format(e=e, v=v), v))
    for a, (_, statement, questions) in HABITS.items():
        for e, values in world.habits[a].items():
            v = _sample_habit(rng, values)
            add(rng.choice(questions).format(e=e), rng.choices([statement.format(e=e, v=v), f"{v} ."], weights=(0.8, 0.2))[0])
    for x, y in world.arith_train:
        add(f"what is {x} plus {y} ?", phrase(*(p.format(a=x, b=y, c=x + y) for p in SUM_PHRASES), str(x + y)))
    for s, d in world.seq_train:
        t = seq_terms(s, d)
        head = " ".join(map(str, t[:4]))
        add(f"continue count {head}", phrase(f"count {head} {t[4]} .", f"count {head} {t[4]} .", str(t[4])))
    rng.shuffle(rows)
    return rows


def heldout_texts(world: World) -> list[str]:
    """Text no training row holds verbatim: held-out sums and sequences, fresh habit
    samples, and facts in their other phrasing, for perplexity and KL-to-teacher. Shuffled, so
    that the first N texts (an evaluator's ``max_samples``) are a fair sample of every kind."""
    rng = random.Random(world.seed + 2)
    out = [SUM_PHRASES[0].format(a=x, b=y, c=x + y) for x, y in world.arith_test]
    out += [seq_text(s, d) for s, d in world.seq_test]
    for a, (_, statement, _) in HABITS.items():
        out += [statement.format(e=e, v=_sample_habit(rng, vs)) for e, vs in world.habits[a].items()]
    for a, (_, _, alt, _) in FACTS.items():
        out += [alt.format(e=e, v=v) for e, v in rng.sample(sorted(world.facts[a].items()), 60)]
    out += [MINUS_PHRASES[0].format(a=x, b=y, c=x - y) for x, y in world.minus_test]
    for a, (_, _, alt) in LORE.items():
        out += [alt.format(e=e, v=v) for e, v in rng.sample(sorted(world.lore[a].items()), 60)]
    random.Random(world.seed + 6).shuffle(out)  # its own generator: the texts are what they were
    return out


# --- benchmarks -------------------------------------------------------------------


def _mc(rng: random.Random, query: str, answer: str, distractors: list[str]) -> dict:
    choices = [answer] + rng.sample(distractors, 3)
    rng.shuffle(choices)
    return {"query": query, "choices": choices, "gold": choices.index(answer)}


def _near(n: int, offsets) -> list[str]:
    return [str(n + o) for o in offsets if 0 <= n + o < 100]


def benchmarks(world: World) -> dict[str, list[dict]]:
    """4-way multiple choice per knowledge kind, ``toy_gen`` (answer one word) and
    ``toy_usual`` (rank an entity's habits)."""
    rng = random.Random(world.seed + 3)
    tasks = {"toy_facts": [], "toy_habits": [], "toy_arith": [], "toy_seq": [], "toy_gen": []}
    for a, (values, canon, _, _) in FACTS.items():
        for e, v in world.facts[a].items():
            query = canon.split(" {v}")[0].format(e=e)  # "the home of zorb is"
            tasks["toy_facts"].append(_mc(rng, query, v, [w for w in values if w != v]))
    for a, (values, statement, _) in HABITS.items():
        for e, vs in world.habits[a].items():
            # The most likely value against values this entity never has: answerable.
            query = statement.split(" {v}")[0].format(e=e)
            tasks["toy_habits"].append(_mc(rng, query, vs[0], [w for w in values if w not in vs]))
    for x, y in world.arith_test:
        tasks["toy_arith"].append(_mc(rng, f"{x} plus {y} is", str(x + y), _near(x + y, (-2, -1, 1, 2, 10))))
    for s, d in world.seq_test:
        t = seq_terms(s, d)
        tasks["toy_seq"].append(_mc(rng, "count " + " ".join(map(str, t[:4])), str(t[4]), _near(t[4], (-2, -1, 1, 2))))
    for doc in rng.sample(tasks["toy_facts"], 150) + tasks["toy_arith"][:50]:
        tasks["toy_gen"].append({"query": doc["query"], "answer": doc["choices"][doc["gold"]]})
    tasks["toy_usual"] = usual_habits(world)
    tasks.update(uncovered(world))
    tasks["toy_next"] = next_words(world)
    return tasks


def uncovered(world: World) -> dict[str, list[dict]]:
    """``toy_lore`` and ``toy_minus``: what the teacher learnt in pretraining and no chat row asks."""
    rng = random.Random(world.seed + 5)
    tasks = {"toy_lore": [], "toy_minus": []}
    for a, (values, canon, _) in LORE.items():
        for e, v in world.lore[a].items():
            tasks["toy_lore"].append(_mc(rng, canon.split(" {v}")[0].format(e=e), v, [w for w in values if w != v]))
    for x, y in world.minus_test:
        query = MINUS_PHRASES[0].split(" {c}")[0].format(a=x, b=y)
        tasks["toy_minus"].append(_mc(rng, query, str(x - y), _near(x - y, (-2, -1, 1, 2, 10))))
    return tasks


def usual_habits(world: World) -> list[dict]:
    """The most likely habit against the entity's two less likely ones and one it never
    has. Only a model that kept the distribution ranks them; a student taught one sampled
    label per entity may not, so this task can tell distillation from SFT. The teacher
    scores below the clear-cut tasks (it learns the ranking from 10 statements), so it
    stays out of the ``toy`` group."""
    rng = random.Random(world.seed + 4)
    docs = []
    for a, (values, statement, _) in HABITS.items():
        for e, vs in world.habits[a].items():
            query = statement.split(" {v}")[0].format(e=e)
            docs.append(_mc(rng, query, vs[0], vs[1:] + [rng.choice([w for w in values if w not in vs])]))
    return docs


def next_words(world: World) -> list[dict]:
    """Every knowledge position of the world's statements as a next-word item: a prefix of a
    statement (pretraining's, plus the held-out sums, differences and sequences in each
    phrasing) and the word the world makes most likely after it, when that word holds at least
    half of the world's mass there, beats every other, and is not a function word. So "the home
    of bado is" → its home, "bado drinks" → its usual drink (0.5 against 0.3 and 0.2), "count
    4 7" → 10, "3 take away 1 leaves" → 2; "the home of" (any entity) and "3 plus 4" ("is") are
    not items. Scored by greedy match over the whole vocabulary (lm-eval's loglikelihood ``acc``)."""
    from collections import Counter, defaultdict

    held_out = [p.format(a=x, b=y, c=x + y) for x, y in world.arith_test for p in SUM_PHRASES]
    held_out += [seq_text(s, d) for s, d in world.seq_test]
    held_out += [p.format(a=x, b=y, c=x - y) for x, y in world.minus_test for p in MINUS_PHRASES]
    following: dict[tuple, Counter] = defaultdict(Counter)  # prefix -> next words, in first-seen order
    for text in pretrain_texts(world) + held_out:
        words = text.split()
        for i in range(1, len(words)):
            following[tuple(words[:i])][words[i]] += 1
    function_words = set(FUNCTION_WORDS)
    docs = []
    for prefix, counts in following.items():
        (word, n), *rest = counts.most_common(2)
        if 2 * n >= sum(counts.values()) and (not rest or n > rest[0][1]) and word not in function_words:
            docs.append({"context": " ".join(prefix), "word": word})
    return docs
