"""Short emotional text messages written in each synthetic user's style."""

from __future__ import annotations

import numpy as np

from models.labels import EMOTIONS
from simulations.identity import UserIdentity

_ADJECTIVES = {
    "neutral": ("fine", "okay", "alright", "calm", "normal", "meh"),
    "happy": (
        "happy", "glad", "thrilled", "delighted", "cheerful", "excited", "grateful", "stoked",
    ),  # fmt: skip
    "sad": ("sad", "down", "miserable", "heartbroken", "lonely", "gloomy", "hopeless", "low"),
    "angry": ("angry", "furious", "mad", "annoyed", "livid", "irritated", "fed up", "enraged"),
    "fearful": (
        "scared", "afraid", "terrified", "nervous", "anxious", "worried", "panicked", "uneasy",
    ),  # fmt: skip
    "disgusted": ("disgusted", "grossed out", "sickened", "repulsed", "nauseous", "revolted"),
    "surprised": ("surprised", "shocked", "amazed", "stunned", "speechless", "astonished"),
}
_ADJ_TEMPLATES = (
    "i feel {a}", "i'm so {a}", "feeling {a} today", "kind of {a} right now",
    "really {a} about it", "i am {a}", "pretty {a} tbh", "still {a}",
)  # fmt: skip
_PHRASES = {
    "neutral": ("i'm fine i guess", "nothing much going on", "same as usual", "no big deal"),
    "happy": (
        "this made my day", "best news i've had all week", "we won the game", "can't stop smiling",
        "everything worked out perfectly", "i got the job", "what a lovely evening",
        "love spending time with them", "finally on vacation", "the party was amazing",
    ),
    "sad": (
        "i miss her so much", "nobody showed up", "i lost my dog today", "cried all night",
        "everything feels empty", "we broke up", "i wish things were different",
        "i feel like giving up", "the house is so quiet now",
    ),
    "angry": (
        "they lied to me again", "stop wasting my time", "this is completely unacceptable",
        "i'm sick of being ignored", "how dare they", "he cut me off in traffic",
        "they cancelled without telling me", "so done with this nonsense",
        "nobody ever listens to me",
    ),
    "fearful": (
        "i heard a noise downstairs", "what if something goes wrong", "my hands are shaking",
        "i don't want to go alone", "the test results come tomorrow", "someone is following me",
        "i can't breathe properly", "please let everyone be safe",
    ),
    "disgusted": (
        "that smell is horrible", "there was hair in my soup", "the bathroom was filthy",
        "that is so gross", "i almost threw up", "how can people eat that",
        "the fridge smells rotten", "what they did was vile",
    ),
    "surprised": (
        "i did not see that coming", "wait what just happened", "no way that's real",
        "they threw me a surprise party", "out of nowhere he proposed", "i never expected that",
        "who would have guessed", "the package arrived already",
    ),
}
# Negated cues read as the opposite emotion, which defeats bag-of-words shortcuts.
_NEGATIONS = {
    "neutral": ("not much to say", "nothing special"),
    "happy": ("not worried anymore", "no complaints at all", "couldn't be better"),
    "sad": ("not happy at all", "i'm not okay", "not feeling great", "nothing is going right"),
    "angry": ("not okay with this", "i won't accept this", "not putting up with this"),
    "fearful": ("i don't feel safe", "not sure i'll be okay"),
    "disgusted": ("not touching that", "can't stand the sight of it"),
    "surprised": ("never thought this would happen", "not what i expected at all"),
}
# Cues that several emotions share; each only narrows the candidates down.
_SHARED = (
    ("i can't believe it", ("surprised", "angry", "happy")),
    ("oh no", ("fearful", "sad", "surprised")),
    ("ugh", ("disgusted", "angry")),
    ("wow", ("surprised", "happy")),
    ("my heart is racing", ("fearful", "surprised", "happy")),
    ("i need a minute", ("angry", "sad", "fearful")),
    ("seriously", ("angry", "surprised", "disgusted")),
    ("what a day", ("happy", "sad", "angry", "neutral")),
    ("i didn't expect that", ("surprised", "fearful", "disgusted")),
    ("this is too much", ("angry", "fearful", "sad", "happy")),
    ("i can't stop thinking about it", ("fearful", "sad", "happy")),
    ("can't even look at it", ("disgusted", "fearful", "sad")),
)
# Sentences without any emotional cue; every class can produce them.
_NO_CUE = (
    "just got home from work", "had pasta for dinner", "the meeting is at three",
    "going to the store later", "watching a show tonight", "need to do laundry",
    "the bus was on time", "reading a book", "it is raining outside", "working from home today",
    "picked up groceries", "called my mom", "cleaning the kitchen", "going to bed soon",
)  # fmt: skip
_PLACES = (
    "at work", "after the call", "with my sister", "at school", "on the way home",
    "at the store", "with my friends",
)  # fmt: skip
_TIMES = ("this morning", "last night", "after dinner", "today", "again")
# A message that already says when gets a place, not a second time.
_TIME_WORDS = frozenset(("today", "tonight", "tomorrow", "later", "soon", "now", "again",
                         "three", "morning", "night", "week", "already", "finally"))  # fmt: skip
# Text-specific confusions (different from the face's and the voice's).
_TEXT_NEIGHBOURS = {
    "neutral": ("sad", "happy"),
    "happy": ("surprised",),
    "sad": ("fearful", "neutral"),
    "angry": ("disgusted", "sad"),
    "fearful": ("sad", "surprised"),
    "disgusted": ("angry",),
    "surprised": ("happy", "fearful"),
}
_EXPANSIONS = {
    "i'm": "i am", "can't": "cannot", "don't": "do not", "won't": "will not",
    "didn't": "did not", "couldn't": "could not", "that's": "that is", "i've": "i have",
    "i'll": "i will",
}  # fmt: skip
_HIGH_AROUSAL = {"happy", "angry", "surprised", "fearful"}
MAX_TEXT_WORDS = 15


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _typo(word: str, rng: np.random.Generator) -> str:
    i = int(rng.integers(1, len(word) - 1))
    kind = rng.integers(3)
    if kind == 0:  # swap two neighbours
        return word[: i - 1] + word[i] + word[i - 1] + word[i + 1 :]
    if kind == 1:  # drop a letter
        return word[:i] + word[i + 1 :]
    return word[:i] + word[i] + word[i:]  # double a letter


def render_text(
    ident: UserIdentity, label: int, intensity: float, rng: np.random.Generator
) -> str:
    """Write a short message (3-15 words) that hints at ``label`` in the user's style.

    A weakly felt emotion more often yields a message with no cue at all; a share of messages
    use a neighbouring emotion's wording, shared wording, or negation.

    Parameters
    ----------
    ident : UserIdentity
        Whose writing style is used.
    label : int
        True emotion (index into ``EMOTIONS``).
    intensity : float
        Strength of expression in ``[0, 1]``.
    rng : np.random.Generator
        Source of the message's randomness.

    Returns
    -------
    str
        ASCII text.
    """
    emotion = EMOTIONS[label]
    if rng.random() < 0.12 + 0.3 * (1 - intensity):
        core, cue = _pick(rng, _NO_CUE), "neutral"
    else:
        cue = emotion
        if rng.random() < 0.12:
            cue = _pick(rng, _TEXT_NEIGHBOURS[emotion])
        kind = rng.random()
        shared = tuple(text for text, owners in _SHARED if cue in owners)
        if kind < 0.2 and shared:
            core = _pick(rng, shared)
        elif kind < 0.3:
            core = _pick(rng, _NEGATIONS[cue])
        elif kind < 0.65:
            core = _pick(rng, _ADJ_TEMPLATES).format(a=_pick(rng, _ADJECTIVES[cue]))
        else:
            core = _pick(rng, _PHRASES[cue])

    words = core.split()
    contexts = _PLACES if _TIME_WORDS.intersection(words) else _PLACES + _TIMES
    if rng.random() < ident.verbosity:
        words += _pick(rng, contexts).split()
    if rng.random() < ident.filler_rate:
        filler = _pick(rng, ident.fillers).split()
        words = filler + words if rng.random() < 0.5 else words + filler
    while len(words) < 3:
        words += _pick(rng, _PLACES).split()
    words = words[:MAX_TEXT_WORDS]
    if ident.formal:
        words = [w2 for w in words for w2 in _EXPANSIONS.get(w, w).split()][:MAX_TEXT_WORDS]
    words = [_typo(w, rng) if len(w) >= 4 and rng.random() < ident.typo_rate else w for w in words]
    text = " ".join(words)
    if not ident.lowercase:
        text = " ".join("I" + w[1:] if w == "i" or w.startswith("i'") else w for w in text.split())
        text = text[0].upper() + text[1:]
    bang = ident.exclaim * (1.4 if cue in _HIGH_AROUSAL else 0.6)
    u = rng.random()
    if u < bang:
        text += "!" * int(rng.integers(1, 4))
    elif u < bang + ident.ellipsis:
        text += "..."
    elif ident.formal or not ident.lowercase:
        text += "."
    return text
