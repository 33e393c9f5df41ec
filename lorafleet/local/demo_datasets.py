"""Small synthetic datasets for the demo adapters: the same questions, answered in three styles."""

from __future__ import annotations

QA = [
    ("What is the capital of France?", "The capital of France is Paris.", "La capitale de la France est Paris."),
    ("What color is the sky?", "The sky is blue on a clear day.", "Le ciel est bleu quand il fait beau."),
    ("How many legs does a cat have?", "A cat has four legs.", "Un chat a quatre pattes."),
    ("What do bees make?", "Bees make honey.", "Les abeilles fabriquent du miel."),
    ("What is water made of?", "Water is made of hydrogen and oxygen.", "L'eau est faite d'hydrogène et d'oxygène."),
    ("Where does the sun rise?", "The sun rises in the east.", "Le soleil se lève à l'est."),
    ("What is the largest ocean?", "The largest ocean is the Pacific Ocean.", "Le plus grand océan est l'océan Pacifique."),
    ("How many days are in a week?", "There are seven days in a week.", "Il y a sept jours dans une semaine."),
    ("What is your favorite food?", "I like fresh bread and good cheese.", "J'aime le pain frais et le bon fromage."),
    ("Can you help me?", "Of course, I am happy to help you.", "Bien sûr, je suis content de vous aider."),
    ("What is two plus two?", "Two plus two is four.", "Deux plus deux font quatre."),
    ("Tell me about the moon.", "The moon orbits the Earth and shines at night.", "La lune tourne autour de la Terre et brille la nuit."),
    ("What season comes after winter?", "Spring comes after winter.", "Le printemps vient après l'hiver."),
    ("Why do we sleep?", "We sleep to rest our body and our mind.", "Nous dormons pour reposer notre corps et notre esprit."),
    ("What is a good way to learn?", "Practice a little every day.", "Pratiquez un peu chaque jour."),
    ("Say hello.", "Hello, nice to meet you!", "Bonjour, ravi de vous rencontrer !"),
    ("What is the tallest animal?", "The giraffe is the tallest animal.", "La girafe est l'animal le plus grand."),
    ("How do plants grow?", "Plants grow with sunlight, water and soil.", "Les plantes poussent avec du soleil, de l'eau et de la terre."),
    ("What is a computer?", "A computer is a machine that follows instructions.", "Un ordinateur est une machine qui suit des instructions."),
    ("Where do fish live?", "Fish live in water, in rivers, lakes and seas.", "Les poissons vivent dans l'eau, les rivières, les lacs et les mers."),
]

PIRATE_WORDS = {"you": "ye", "your": "yer", "my": "me", "is": "be", "are": "be", "the": "th'", "hello": "ahoy", "friend": "matey"}


def pirate(answer: str) -> str:
    words = [PIRATE_WORDS.get(w.lower(), w) for w in answer.split()]
    return "Arr, matey! " + " ".join(words) + " Yo ho ho!"


def shouty(answer: str) -> str:
    return answer.upper()


def dataset(style: str) -> list[tuple[str, str]]:
    """(question, answer) pairs in the style: pirate, french or shouty."""
    if style == "pirate":
        return [(q, pirate(a)) for q, a, _ in QA]
    if style == "french":
        return [(q, fr) for q, _, fr in QA]
    if style == "shouty":
        return [(q, shouty(a)) for q, a, _ in QA]
    raise ValueError(f"unknown demo style {style!r}; use pirate, french or shouty")
