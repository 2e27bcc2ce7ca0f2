"""The embedded default dataset: seeded grade-school arithmetic word problems, shipped as code.

A problem is one of ``len(STORIES)`` story templates told as a chain of 1-4 operations on a
count: an optional start in groups (``a`` boxes of ``b`` -> multiply), some additions and
removals, and an optional end that shares the count out (divide) or prices it (multiply).
Numbers are drawn so that every intermediate result is a positive integer.

The reference solution is deliberately terse and unlike an instruct model's own prose: one
calculator line per operation and a final ``#### N`` (the GSM8K convention), e.g.
``6*4=24\\n24-5=19\\n#### 19``. The question asks for the answer in ``\\boxed{}``, "with the
number only": of the phrasings tried, the one under which the embedded model most often ended
with a checkable correct answer.

Splits: ``test`` draws 1, 2 or 3 operations (weights 0.6, 0.3, 0.1) on small numbers (level
``easy``: the embedded model solves only a few percent even so); ``train`` uses the same
templates and numbers with 1 or 2 operations (weights 0.75, 0.25; level ``train``), an easier
mix so that the rewrite can keep more of the model's own answers; ``test_hard`` uses 3-4
operations and larger numbers. With seed 0 the main job's 40 training rows have 27 one-step and
13 two-step problems; the default 1000 have 744 and 256. Each split has its own random stream, so
the first k rows of a split do not depend on the other sizes; rows are disjoint across splits
by question text.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import datasets

from onpolicy_sft.schema import DEMONSTRATION_COLUMNS, columns_features

BOXED_INSTRUCTION = "Answer with the number only, in \\boxed{}."


@dataclass(frozen=True)
class Story:
    """Phrases of one story template; ``{n}`` is a number, ``{name}``/``{they}`` the actor."""

    item: str
    container: str
    start: str  # "{name} has {n} {item}."
    add: tuple[str, ...]  # ways to say "+n"
    sub: tuple[str, ...]  # ways to say "-n"
    share: str  # "... equally into {n} <groups>." (end: divide)
    share_question: str
    price: str  # "Each {item_one} ... {n} ..." (end: multiply)
    price_question: str


def _s(item, container, start, add, sub, share, share_q, price, price_q) -> Story:
    return Story(item, container, start, tuple(add), tuple(sub), share, share_q, price, price_q)


STORIES: tuple[Story, ...] = (
    _s("apples", "baskets", "{name} has {n} apples.", ["{they} picks {n} more apples."], ["{they} eats {n} apples."],
       "{they} puts the apples equally into {n} bags.", "How many apples are in each bag?",
       "{they} sells each apple for {n} cents.", "How many cents does {name} get for all the apples?"),
    _s("stickers", "sheets", "{name} has {n} stickers.", ["{they} gets {n} more stickers from a friend."],
       ["{they} gives {n} stickers to her brother."],
       "{they} shares the stickers equally among {n} friends.", "How many stickers does each friend get?",
       "Each sticker is worth {n} points.", "How many points are all the stickers worth?"),
    _s("marbles", "bags", "{name} has {n} marbles.", ["{they} wins {n} marbles in a game."], ["{they} loses {n} marbles."],
       "{they} splits the marbles equally into {n} jars.", "How many marbles are in each jar?",
       "Each marble costs {n} cents.", "How many cents are the marbles worth in total?"),
    _s("cookies", "trays", "{name} bakes {n} cookies.", ["{they} bakes {n} more cookies."], ["The family eats {n} cookies."],
       "{they} packs the cookies equally into {n} boxes.", "How many cookies are in each box?",
       "{they} sells each cookie for {n} dollars.", "How many dollars does {name} make?"),
    _s("books", "shelves", "A library has {n} books.", ["It receives {n} new books."], ["Readers borrow {n} books."],
       "The books are placed equally on {n} carts.", "How many books are on each cart?",
       "Each book weighs {n} ounces.", "How many ounces do the books weigh in total?"),
    _s("pencils", "packs", "{name} has {n} pencils.", ["{they} buys {n} more pencils."], ["{they} lends {n} pencils to classmates."],
       "{they} divides the pencils equally among {n} desks.", "How many pencils go on each desk?",
       "Each pencil costs {n} cents.", "How many cents are all the pencils worth?"),
    _s("eggs", "cartons", "A farm collects {n} eggs.", ["The hens lay {n} more eggs."], ["{n} eggs break."],
       "The eggs are packed equally into {n} crates.", "How many eggs are in each crate?",
       "Each egg sells for {n} cents.", "How many cents does the farm get for the eggs?"),
    _s("flowers", "bunches", "{name} grows {n} flowers.", ["{they} plants {n} more flowers."], ["{they} cuts {n} flowers."],
       "{they} arranges the flowers equally in {n} vases.", "How many flowers are in each vase?",
       "Each flower sells for {n} dollars.", "How many dollars are the flowers worth?"),
    _s("coins", "purses", "{name} saves {n} coins.", ["{they} finds {n} more coins."], ["{they} spends {n} coins."],
       "{they} stacks the coins equally into {n} piles.", "How many coins are in each pile?",
       "Each coin is worth {n} cents.", "How many cents are the coins worth?"),
    _s("cards", "decks", "{name} collects {n} trading cards.", ["{they} trades for {n} more cards."], ["{they} gives away {n} cards."],
       "{they} sorts the cards equally into {n} albums.", "How many cards are in each album?",
       "Each card is worth {n} points.", "How many points are the cards worth?"),
    _s("balloons", "bundles", "{name} has {n} balloons for a party.", ["{they} blows up {n} more balloons."], ["{n} balloons pop."],
       "{they} ties the balloons equally to {n} chairs.", "How many balloons are on each chair?",
       "Each balloon costs {n} cents.", "How many cents do the balloons cost?"),
    _s("fish", "tanks", "A pet shop has {n} fish.", ["It gets {n} more fish."], ["It sells {n} fish."],
       "The fish are moved equally into {n} bowls.", "How many fish are in each bowl?",
       "Each fish eats {n} pellets a day.", "How many pellets do the fish eat each day?"),
    _s("seats", "rows", "A theater has {n} empty seats.", ["Workers add {n} more seats."], ["{n} seats are taken."],
       "The empty seats are split equally among {n} sections.", "How many empty seats are in each section?",
       "Each seat needs {n} screws.", "How many screws do the seats need?"),
    _s("crayons", "boxes", "{name} has {n} crayons.", ["{they} gets {n} more crayons."], ["{they} breaks {n} crayons."],
       "{they} shares the crayons equally with {n} kids.", "How many crayons does each kid get?",
       "Each crayon costs {n} cents.", "How many cents are the crayons worth?"),
    _s("shells", "buckets", "{name} finds {n} shells at the beach.", ["{they} finds {n} more shells."],
       ["{they} throws {n} shells back into the sea."],
       "{they} puts the shells equally into {n} jars.", "How many shells are in each jar?",
       "Each shell is worth {n} points in a game.", "How many points are the shells worth?"),
    _s("cupcakes", "plates", "A bakery makes {n} cupcakes.", ["It makes {n} more cupcakes."], ["It sells {n} cupcakes."],
       "The cupcakes are put equally on {n} trays.", "How many cupcakes are on each tray?",
       "Each cupcake has {n} sprinkles.", "How many sprinkles are on the cupcakes?"),
    _s("toys", "crates", "A toy store has {n} toys.", ["A truck brings {n} more toys."], ["Customers buy {n} toys."],
       "The toys are displayed equally on {n} shelves.", "How many toys are on each shelf?",
       "Each toy costs {n} dollars.", "How many dollars are the toys worth?"),
    _s("stamps", "pages", "{name} owns {n} stamps.", ["{they} buys {n} more stamps."], ["{they} uses {n} stamps on letters."],
       "{they} glues the stamps equally onto {n} cards.", "How many stamps are on each card?",
       "Each stamp is worth {n} cents.", "How many cents are the stamps worth?"),
    _s("oranges", "crates", "A shop has {n} oranges.", ["It buys {n} more oranges."], ["{n} oranges go bad and are thrown away."],
       "The oranges are split equally into {n} bags.", "How many oranges are in each bag?",
       "Each orange costs {n} cents.", "How many cents are the oranges worth?"),
    _s("beads", "strings", "{name} has {n} beads.", ["{they} buys {n} more beads."], ["{they} drops {n} beads."],
       "{they} uses all the beads equally for {n} bracelets.", "How many beads are on each bracelet?",
       "Each bead costs {n} cents.", "How many cents are the beads worth?"),
    _s("students", "buses", "A school has {n} students on a trip.", ["{n} more students join the trip."],
       ["{n} students go home early."],
       "The students form {n} equal teams.", "How many students are in each team?",
       "Each student needs {n} tickets.", "How many tickets do the students need?"),
    _s("chairs", "stacks", "A hall has {n} chairs.", ["Workers bring {n} more chairs."], ["{n} chairs are carried out."],
       "The chairs are set equally at {n} tables.", "How many chairs are at each table?",
       "Each chair has {n} legs.", "How many legs do the chairs have?"),
    _s("carrots", "rows", "{name} grows {n} carrots.", ["{they} harvests {n} more carrots."], ["Rabbits eat {n} carrots."],
       "{they} ties the carrots equally into {n} bunches.", "How many carrots are in each bunch?",
       "Each carrot sells for {n} cents.", "How many cents are the carrots worth?"),
    _s("photos", "albums", "{name} takes {n} photos.", ["{they} takes {n} more photos."], ["{they} deletes {n} photos."],
       "{they} puts the photos equally into {n} folders.", "How many photos are in each folder?",
       "Each photo uses {n} megabytes.", "How many megabytes do the photos use?"),
)

NAMES = ("Mia", "Ava", "Lily", "Emma", "Zoe", "Nora", "Ella", "Ruby", "Sara", "Lena", "Ivy", "Rosa")


@dataclass(frozen=True)
class Level:
    """Difficulty: how many operations (with weights) and how large the numbers get."""

    n_ops: tuple[int, ...]
    weights: tuple[float, ...]
    start: tuple[int, int]  # plain starting count
    group: tuple[int, int]  # both factors of a starting "a boxes of b"
    step: tuple[int, int]  # an addition or removal
    divisor: tuple[int, int]
    price: tuple[int, int]


LEVELS = {
    # train: the easy numbers with fewer operations, so that the model's own answers are right
    # often enough for the rewrite to keep them (experiments/benchmarks/results/arith_calibration.md)
    "train": Level((1, 2), (0.75, 0.25), (2, 12), (2, 5), (2, 9), (2, 4), (2, 4)),
    "easy": Level((1, 2, 3), (0.6, 0.3, 0.1), (2, 12), (2, 5), (2, 9), (2, 4), (2, 4)),
    "hard": Level((3, 4), (0.5, 0.5), (20, 300), (6, 25), (10, 150), (3, 12), (3, 25)),
}


@dataclass(frozen=True)
class Problem:
    template: int
    question: str
    lines: tuple[str, ...]  # calculator lines "a op b=c"
    answer: int

    @property
    def n_ops(self) -> int:
        return len(self.lines)

    @property
    def prompt(self) -> str:
        return f"{self.question} {BOXED_INSTRUCTION}"

    @property
    def response(self) -> str:
        return "\n".join(self.lines) + f"\n#### {self.answer}"


def _problem(rng: random.Random, template: int, n_ops: int, level: Level) -> Problem | None:
    """One problem with exactly ``n_ops`` operations, or None when the draw breaks a constraint."""
    story = STORIES[template]
    name = rng.choice(NAMES)

    def fill(phrase: str, n: int) -> str:  # the opening names the actor; later sentences say "She"
        return phrase.format(n=n, name=name, they="She")

    sentences, lines = [], []
    # the shape: [group start] (+|-)* [share|price], exactly n_ops operations
    use_group = rng.random() < 0.25
    end = rng.choices(["none", "share", "price"], [0.5, 0.25, 0.25])[0] if n_ops - use_group >= 1 else "none"
    n_middle = n_ops - use_group - (end != "none")
    if use_group:
        a, b = rng.randint(*level.group), rng.randint(*level.group)
        value = a * b
        sentences.append(f"{_who(story, name)} {a} {story.container} with {b} {story.item} in each.")
        lines.append(f"{a}*{b}={value}")
    else:
        value = rng.randint(*level.start)
        sentences.append(story.start.format(n=value, name=name))
    for _ in range(n_middle):
        if rng.random() < 0.5 or value <= level.step[0] + 1:
            x = rng.randint(*level.step)
            sentences.append(fill(rng.choice(story.add), x))
            lines.append(f"{value}+{x}={value + x}")
            value += x
        else:
            x = rng.randint(level.step[0], min(level.step[1], value - 1))  # keeps at least one
            sentences.append(fill(rng.choice(story.sub), x))
            lines.append(f"{value}-{x}={value - x}")
            value -= x
    question_end = f"How many {story.item} are there {'now' if n_middle else 'in total'}?"
    if end == "share":
        divisors = [d for d in range(level.divisor[0], level.divisor[1] + 1) if value % d == 0 and d < value]
        if not divisors:
            return None
        d = rng.choice(divisors)
        sentences.append(fill(story.share, d))
        question_end = story.share_question
        lines.append(f"{value}/{d}={value // d}")
        value //= d
    elif end == "price":
        p = rng.randint(*level.price)
        sentences.append(fill(story.price, p))
        question_end = story.price_question.format(name=name)
        lines.append(f"{value}*{p}={value * p}")
        value *= p
    if not lines:
        return None
    return Problem(template, " ".join(sentences + [question_end]), tuple(lines), value)


def _who(story: Story, name: str) -> str:
    """Subject and verb of a grouped start: "Mia has", or the story's own opening ("A shop has")."""
    if story.start.startswith("{name}"):
        return f"{name} has"
    return story.start.split("{n}")[0].strip()


def generate(seed: int, n: int, level: str = "easy", *, stream: str = "", exclude: set[str] | None = None) -> list[Problem]:
    """``n`` distinct problems from the random stream (seed, level, stream); questions in ``exclude`` are skipped."""
    spec = LEVELS[level]
    rng = random.Random(f"arith/{seed}/{level}/{stream}")
    seen = set(exclude or ())
    out: list[Problem] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 1000 * (n + 10):
            raise RuntimeError(f"could not draw {n} distinct {level} problems")
        template = rng.randrange(len(STORIES))
        n_ops = rng.choices(spec.n_ops, spec.weights)[0]
        problem = _problem(rng, template, n_ops, spec)
        if problem is None or problem.question in seen:
            continue
        seen.add(problem.question)
        out.append(problem)
    return out


def problem_id(problem: Problem) -> str:
    """Content hash: the same problem keeps its id whatever split sizes produced it."""
    return "arith-" + hashlib.sha256(problem.question.encode()).hexdigest()[:16]


def to_row(problem: Problem) -> dict:
    return {"id": problem_id(problem), "prompt": problem.prompt, "response": problem.response,
            "answer": str(problem.answer), "system": "", "exemplars": []}


def _worked(question: str, *lines: str) -> dict:
    answer = lines[-1].split("= ")[-1]
    return {"prompt": f"{question} {BOXED_INSTRUCTION}", "response": "\n".join(lines) + f"\nThe answer is \\boxed{{{answer}}}."}


# Worked examples shown to the model as earlier chat turns (``data.exemplars``), written the way
# an instruct model answers when it follows an example (each step as "a op b = c", then the boxed
# answer), not in the demonstrations' terse "6*4=24 / #### 24", which must stay someone else's
# writing. Boys' names and items that no story uses, so no example can be any split's question.
EXEMPLAR_POOL: tuple[dict, ...] = (
    _worked("Tom has 7 toy cars. He gets 5 more toy cars for his birthday. How many toy cars are there now?",
            "7 + 5 = 12"),
    _worked("Ben has 3 boxes with 4 kites in each. He sells each kite for 2 dollars. How many dollars does Ben get?",
            "3 × 4 = 12", "12 × 2 = 24"),
    _worked("A bakery has 4 trays with 6 muffins on each tray. How many muffins are there in total?", "4 × 6 = 24"),
    _worked("Max has 9 buttons. He finds 7 more buttons. He gives 4 buttons to a friend. How many buttons are "
            "there now?", "9 + 7 = 16", "16 - 4 = 12"),
    _worked("Sam has 15 ribbons. He gives 6 ribbons to his sister. How many ribbons are there now?", "15 - 6 = 9"),
    _worked("Leo bakes 10 pies. He bakes 6 more pies. He packs the pies equally into 4 boxes. How many pies are in "
            "each box?", "10 + 6 = 16", "16 ÷ 4 = 4"),
    _worked("Jack has 18 socks. He puts the socks equally into 3 drawers. How many socks are in each drawer?",
            "18 ÷ 3 = 6"),
    _worked("Omar has 14 bottles. He drops 5 bottles. He sells each bottle for 3 cents. How many cents does Omar "
            "get?", "14 - 5 = 9", "9 × 3 = 27"),
)
# The main job's examples: one one-step and one two-step question, so that the model sees an
# answer with as many steps as the questions it meets (after one-step examples alone it boxes
# the first step of a two-step question).
DEFAULT_EXEMPLARS: tuple[dict, ...] = EXEMPLAR_POOL[:2]


def arithmetic_splits(seed: int = 0, n_train: int = 1000, n_test: int = 200, n_test_hard: int = 200):
    """``DatasetDict`` with ``train``, ``test`` (same templates, fresh numbers) and ``test_hard``.

    The evaluation splits are drawn first and excluded from the later ones, so they never
    change with ``n_train``.
    """
    test = generate(seed, n_test, "easy", stream="test")
    hard = generate(seed, n_test_hard, "hard", stream="test_hard", exclude={p.question for p in test})
    train = generate(seed, n_train, "train", stream="train", exclude={p.question for p in test + hard})
    features = columns_features(DEMONSTRATION_COLUMNS)
    return datasets.DatasetDict({
        split: datasets.Dataset.from_list([to_row(p) for p in problems], features=features)
        for split, problems in (("train", train), ("test", test), ("test_hard", hard))
    })


def general_prompts() -> list[str]:
    """General instructions with no math, for measuring forgetting of ordinary behaviour."""
    return list(GENERAL_PROMPTS)


GENERAL_PROMPTS = (
    "Write a short poem about the sea.",
    "Explain what photosynthesis is in simple words.",
    "Give three tips for sleeping better.",
    "What is the capital of France?",
    "Describe a cat to someone who has never seen one.",
    "Write a friendly email inviting a colleague to lunch.",
    "Summarize the story of Little Red Riding Hood.",
    "What are the primary colors?",
    "Suggest a name for a new coffee shop.",
    "Explain why the sky looks blue.",
    "Write a haiku about autumn leaves.",
    "List some healthy breakfast ideas.",
    "How do I make a cup of tea?",
    "What is the difference between weather and climate?",
    "Tell me a short story about a brave mouse.",
    "Give advice to someone starting their first job.",
    "What does a librarian do?",
    "Describe the taste of a lemon.",
    "Write a thank-you note to a teacher.",
    "Explain how a rainbow forms.",
    "What should I pack for a beach trip?",
    "Name some animals that live in the ocean.",
    "Write a limerick about a sleepy dog.",
    "How can I be more organized at work?",
    "What is a verb? Give an example.",
    "Describe your ideal weekend.",
    "Explain what a computer virus is.",
    "Give me a recipe for a simple salad.",
    "Why do leaves change color in autumn?",
    "Write a product description for a wooden chair.",
    "What are some ways to reduce stress?",
    "Translate 'good morning' into Spanish.",
    "Explain the rules of tic-tac-toe.",
    "Write a short motivational message.",
    "What is the role of bees in nature?",
    "Describe a busy city street.",
    "How do plants get water?",
    "Suggest a book for a teenager who likes adventure.",
    "Write a two-sentence horror story.",
    "What is the purpose of a passport?",
    "Explain what recycling is and why it matters.",
    "Give three synonyms for the word happy.",
    "Write a short dialogue between a customer and a waiter.",
    "What are the seasons of the year?",
    "Describe how to tie a shoelace.",
    "What is the largest planet in our solar system?",
    "Write an apology message for missing a meeting.",
    "Explain what a map legend is.",
    "Give some tips for learning a new language.",
    "What makes a good friend?",
    "Describe the sound of rain.",
    "Write a slogan for a bicycle shop.",
    "Explain the difference between a frog and a toad.",
    "What is the water cycle?",
    "Suggest a fun indoor activity for a rainy day.",
    "Write a short bedtime story about the moon.",
)
