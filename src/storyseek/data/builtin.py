"""The embedded offline corpus: a deterministic generator of simple children's stories.

Each story has the columns of `ajibawa-2023/Children-Stories-Collection` (`prompt`, `text`, `moral`,
`character`), so the whole pipeline, the tests and the demo run with no network.

How a story is made. A *plan* is a dict of small integers, one per choice: the hero (a name that
fixes the pronouns he/she), the hero's kind of animal and trait, a home, a hobby, a day, a place,
a friend (another name and kind), a toy, a grown-up helper, a scary place, a skill, and a *theme*
(sharing, kindness, courage, honesty, patience, friendship, trying again, asking for help). Each
theme holds a few interchangeable variants of five paragraphs (setup, trouble, turn, resolution,
ending) written so that any variant of one paragraph follows any variant of the one before, plus
the prompts and morals that match it. `_render` fills the slots of one opening paragraph and the
theme's five paragraphs with the plan's words, so the moral and the prompt always match the plot.

Why it is built this way: a tiny model trained for a few minutes must be able to learn it, so the
vocabulary is small (words a 3-4 year old knows), the narration is always in the past tense, the
story arc always has the same shape and ends with "From that day on, ...". Variety comes from the
slots: `count_distinct_stories()` computes how many different texts the tables can produce
(far more than the 100,000 the pipeline needs). Only the hero is ever called he/she; everyone else
is called by name, so pronouns can never point at the wrong character. Singular "they" is left out
on purpose: next to the plural "they" used for the two friends it would be ambiguous for a tiny model.
"""

from __future__ import annotations

import itertools
import math
import random
import string
from collections.abc import Iterator

from ..errors import StoryseekError

# ---------------------------------------------------------------------------------------------
# Word tables. Every entry of a table must read differently in the text (tests check this).

PRONOUNS = {
    "he": {"he": "he", "He": "He", "him": "him", "his": "his", "His": "His", "himself": "himself"},
    "she": {"he": "she", "He": "She", "him": "her", "his": "her", "His": "Her", "himself": "herself"},
}
HEROES = (  # (name, pronoun); friends are drawn from the same names
    ("Pip", "he"), ("Lily", "she"), ("Max", "he"), ("Mia", "she"), ("Tom", "he"), ("Lucy", "she"),
    ("Ben", "he"), ("Rosie", "she"), ("Finn", "he"), ("Daisy", "she"), ("Leo", "he"), ("Ruby", "she"),
    ("Milo", "he"), ("Ella", "she"), ("Toby", "he"), ("Zoe", "she"), ("Jack", "he"), ("Molly", "she"),
    ("Ollie", "he"), ("Poppy", "she"), ("Sam", "he"), ("Bella", "she"), ("Teddy", "he"), ("Sophie", "she"),
    ("Timmy", "he"), ("Anna", "she"), ("Charlie", "he"), ("Kitty", "she"), ("Oscar", "he"), ("Hazel", "she"),
    ("Buddy", "he"), ("Penny", "she"), ("Rex", "he"), ("Nina", "she"), ("Hugo", "he"), ("Tilly", "she"),
)
KINDS = (
    "mouse", "bunny", "fox", "bear", "duck", "kitten", "puppy", "frog", "owl", "squirrel", "pig",
    "turtle", "hedgehog", "lamb", "elephant", "chick", "goat", "raccoon", "penguin", "monkey",
    "otter", "hippo", "panda", "beaver", "giraffe", "zebra",
)
TRAITS = (
    "curious", "cheerful", "playful", "gentle", "busy", "happy", "friendly", "sleepy", "clever",
    "silly", "quiet", "fluffy", "eager", "sweet", "funny", "tiny",
)
HOMES = (
    "in a cozy hole under a big oak tree", "in a little house by the river",
    "in a warm nest at the top of a tall tree", "in a small red house at the edge of the woods",
    "near a quiet pond full of lily pads", "in a snug burrow under a hill",
    "on a sunny farm with a big red barn", "in a tiny cottage with a blue door",
)
HOBBIES = (  # verb phrases that fit "loved to ..." and "Would you like to ... with me?"
    "pick flowers", "sing songs", "draw pictures", "play hide and seek", "look at the clouds",
    "dance in the sun", "build little houses out of sticks", "play catch", "chase butterflies",
    "hop and skip",
)
DAYS = (
    "One sunny morning", "One bright day", "One warm spring day", "One cool autumn morning",
    "One fine summer day", "One windy day",
)
SPOTS = ("the meadow", "the park", "the garden", "the woods", "the field", "the yard", "the valley", "the orchard")
ITEMS = (
    "red ball", "toy car", "spinning top", "rubber duck", "toy boat", "little drum", "teddy bear",
    "yo-yo", "toy train", "orange ball",
)
HELPERS = ("Grandpa Owl", "Grandma Goose", "Mister Turtle", "Old Bear", "Miss Hen", "Uncle Beaver")
SCARY = (
    "the dark woods", "the old bridge", "the deep cave", "the big dark barn", "the tall grass",
    "the noisy waterfall", "the old empty house", "the deep pond",
)
SKILLS = (  # (what to learn, how a try went wrong, how it finally went right)
    ("climb the big apple tree", "slipped and slid back down", "climbed all the way to the top"),
    ("ride a bike", "wobbled and fell over", "rode all the way down the path"),
    ("fly a kite", "watched the kite crash to the ground", "made the kite fly high in the sky"),
    ("jump over the little stream", "landed with a splash in the water", "jumped all the way to the other side"),
    ("skip with a rope", "tripped over the rope", "skipped ten times in a row"),
    ("build a tall tower of blocks", "watched the tower fall down", "built the tallest tower ever"),
    ("whistle a song", "only made a little puff of air", "whistled a happy little song"),
    ("swim across the pond", "swallowed some water and had to stop", "swam all the way across the pond"),
)
OPENINGS = (
    "Once upon a time, there was {a_self} named {name}. {He} lived {home}. {He} loved to {hobby} every day.",
    "There once was {a_self} named {name} who lived {home}. Every day, {name} liked to {hobby}. "
    "It made {him} very happy.",
    "{name} was {a_self}. {He} lived {home} with {his} mom and dad. More than anything, {he} loved to {hobby}.",
)
PROMPT_FRAMES = (
    "Write a story about {a_self} named {name} who {what}.",
    "Write a short story for children about {name} the {kind}, who {what}.",
    "Write a children's story about {a_self} who {what}.",
)
PARTS = ("setup", "trouble", "turn", "resolution", "ending")

# ---------------------------------------------------------------------------------------------
# Themes. Any variant of a part may follow any variant of the part before it.

THEMES = (
    {
        "theme": "sharing",
        "prompt": ("learns to share {his} {item}", "learns that playing together is more fun than playing alone"),
        "setup": (
            "{day}, {name} got {a_item} from {his} grandma. {He} loved it very much and took it to {spot} "
            "to play. Soon {friend} the {friend_kind} came over. \"What a nice {item}!\" said {friend}. "
            "\"Can I play with it too?\"",
            "{day}, {name} found {a_item} under a bush in {spot}. {He} was so happy that {he} jumped up "
            "and down. Just then, {friend} the {friend_kind} walked by. \"Oh, {a_item}!\" said {friend}. "
            "\"May I play with you?\"",
        ),
        "trouble": (
            "{name} held the {item} close. \"No, it is mine,\" {he} said. {friend} looked sad and sat down "
            "alone under a tree.",
            "{name} did not want to share. \"Go away. I want to play by myself,\" {he} said. {friend} "
            "looked down at the grass and walked away slowly.",
        ),
        "turn": (
            "{name} played with the {item} all alone, but it was not fun. There was no one to laugh with. "
            "{He} thought about {friend} and felt sad too.",
            "Soon {name} felt bored. Playing alone was not fun at all. {He} thought about {friend}'s sad "
            "face. \"I was not nice,\" {he} said to {himself}.",
        ),
        "resolution": (
            "{name} ran to {friend} with the {item}. \"I am sorry,\" {he} said. \"Let's play together!\" "
            "{friend} smiled a big smile. They took turns with the {item} and laughed and laughed.",
            "{name} went to find {friend}. \"Do you want to play with my {item}?\" {he} asked. \"Yes, "
            "please!\" said {friend}. The two friends played together, and the game was much more fun with two.",
        ),
        "ending": (
            "From that day on, {name} always shared {his} toys. {He} learned that sharing made everyone happy.",
            "From that day on, {name} and {friend} shared everything, and {name} was never lonely again.",
        ),
        "moral": ("Sharing makes playing more fun for everyone.", "When we share, everyone is happy.",
                  "Good friends share what they have."),
    },
    {
        "theme": "kindness",
        "prompt": ("helps a friend in need", "learns how good it feels to be kind"),
        "setup": (
            "{day}, {name} went to {spot} to {hobby}. On the way, {he} saw {friend} the {friend_kind} "
            "sitting on a rock. {friend} was crying. \"What is wrong?\" asked {name}.",
            "{day}, {name} was playing in {spot} when {he} heard a small cry. It was {friend} the "
            "{friend_kind}. {friend} looked cold and sad. \"Are you okay?\" asked {name}.",
        ),
        "trouble": (
            "\"I lost my way home, and I am scared,\" said {friend}. {name} wanted to go and play, but {he} "
            "did not want to leave {friend} alone.",
            "\"I hurt my foot, and I cannot walk home,\" said {friend}. {name} wanted to go and play, but "
            "{he} could see that {friend} needed a friend.",
        ),
        "turn": (
            "{name} thought for a moment. Then {he} smiled. \"Don't worry, I will help you,\" {he} said. "
            "{He} gave {friend} {his} warm scarf and held {friend}'s hand.",
            "{name} sat down next to {friend}. \"You are not alone. I will stay with you,\" {he} said. "
            "{friend} stopped crying and gave a little smile.",
        ),
        "resolution": (
            "Together, they walked slowly all the way to {friend}'s home. {friend}'s mom was so happy. "
            "\"Thank you for being so kind, {name},\" said {friend}'s mom.",
            "{name} helped {friend} get home, one little step at a time. When they got there, {friend} "
            "hugged {name}. \"You are the kindest friend in the whole world,\" said {friend}.",
        ),
        "ending": (
            "From that day on, {name} always helped others when they were sad. Being kind made {his} heart "
            "feel warm and happy.",
            "From that day on, {name} and {friend} were best friends. {name} learned that a little kindness "
            "could make a big difference.",
        ),
        "moral": ("A little kindness goes a long way.", "Helping others makes our hearts happy.",
                  "Always be kind to those who need help."),
    },
    {
        "theme": "courage",
        "prompt": ("finds the courage to go to {scary}", "learns to be brave for a friend"),
        "setup": (
            "{day}, {name} and {friend} the {friend_kind} were playing with {friend}'s {item} in {spot}. "
            "{friend} threw it too far, and it landed right next to {scary}.",
            "{day}, {friend} the {friend_kind} came to {name}, crying. \"I left my {item} near {scary}, "
            "and I am too scared to go back,\" said {friend}.",
        ),
        "trouble": (
            "{name} looked at {scary}. It looked big and dark, and {name} felt very scared. {His} legs "
            "began to shake. \"I cannot go there,\" {he} said in a small voice.",
            "{name} wanted to help, but {he} was afraid of {scary}. {He} had never gone there before. "
            "\"What if something scary is there?\" {he} said.",
        ),
        "turn": (
            "Then {name} saw how sad {friend} was. {He} took a deep breath. \"I am scared, but I will be "
            "brave for my friend,\" {he} said. {He} took one small step, and then another.",
            "{name} remembered what {his} mom always said: \"Being brave means doing the right thing, even "
            "when you are scared.\" {He} held {his} head up high and walked toward {scary}.",
        ),
        "resolution": (
            "It was not as scary as {he} thought! {name} found the {item} and ran all the way back. "
            "\"You did it!\" cheered {friend}. \"You are so brave!\"",
            "When {he} got close, {name} saw that there was nothing to fear. {He} picked up the {item} and "
            "brought it back to {friend}. {friend} jumped for joy and gave {name} a big hug.",
        ),
        "ending": (
            "From that day on, {name} was not so afraid anymore. {He} knew {he} could be brave, even when "
            "{he} felt scared.",
            "From that day on, whenever {name} felt scared, {he} remembered {scary} and smiled. {He} knew "
            "{he} was braver than {he} thought.",
        ),
        "moral": ("You can be brave even when you feel afraid.", "Being brave means doing what is right, "
                  "even when you are scared.", "A brave heart helps a friend in need."),
    },
    {
        "theme": "honesty",
        "prompt": ("breaks a friend's {item} and learns to tell the truth", "learns that the truth is better than a lie"),
        "setup": (
            "{day}, {friend} the {friend_kind} let {name} borrow {a_item}. \"Please be careful with it,\" "
            "said {friend}. {name} played with the {item} for a long time in {spot}.",
            "{day}, {name} went to visit {friend} the {friend_kind}. {friend} had {a_item}, and {name} "
            "wanted to play with it. \"You can play with it while I get us a snack,\" said {friend}.",
        ),
        "trouble": (
            "Then {name} threw the {item} too high, and it fell and broke. Oh no! {name} quickly hid the "
            "broken {item}. When {friend} asked where it was, {name} said, \"I don't know.\"",
            "But {name} was not careful, and the {item} broke. {name} was scared. When {friend} asked what "
            "happened, {name} said, \"It was not me. It was the wind!\"",
        ),
        "turn": (
            "{friend} looked sad. That night, {name} could not sleep. {His} tummy felt funny, and {he} kept "
            "thinking about the lie.",
            "{name} went home, but {he} did not feel happy. {He} told {his} mom what happened. \"The truth "
            "is always better than a lie,\" said {his} mom. \"Go and tell your friend.\"",
        ),
        "resolution": (
            "The next morning, {name} went to see {friend}. \"I broke your {item}, and I am very sorry,\" "
            "{he} said. \"I should have told you the truth.\" {friend} gave {name} a hug. \"Thank you for "
            "telling me,\" said {friend}. \"We can fix it together.\"",
            "{name} knew what to do. {He} went back to {friend}. \"I am sorry. I broke your {item}, and I "
            "told a lie,\" {he} said. {friend} was quiet for a moment. Then {friend} smiled. \"It is okay. "
            "I am glad you told me the truth.\" Together, they fixed the {item} with some glue.",
        ),
        "ending": (
            "From that day on, {name} always told the truth, even when it was hard. {He} felt much better inside.",
            "From that day on, {name} never told a lie again. {He} and {friend} stayed the best of friends.",
        ),
        "moral": ("Telling the truth is always the right thing to do.", "The truth is better than a lie, "
                  "even when it is hard to tell.", "A true friend tells the truth."),
    },
    {
        "theme": "patience",
        "prompt": ("learns to be patient while waiting for a seed to grow", "learns that good things take time"),
        "setup": (
            "{day}, {helper} gave {name} a little seed. \"Plant it, and it will grow into a beautiful "
            "flower,\" said {helper}. {name} dug a small hole in {spot} and put the seed inside.",
            "{day}, {name} and {friend} the {friend_kind} planted a tiny seed in {spot}. \"When will it "
            "grow?\" asked {name}. \"Soon, if we wait,\" said {friend}.",
        ),
        "trouble": (
            "The next morning, {name} ran to look. There was nothing but dirt! \"Grow, seed, grow!\" {he} "
            "shouted. {He} wanted to dig up the seed to see what was wrong.",
            "Every day, {name} looked at the ground, but nothing happened. {He} stamped {his} feet. \"It is "
            "taking too long!\" {he} said. \"I do not want to wait anymore.\"",
        ),
        "turn": (
            "{helper} came by and saw {name}. \"Good things take time,\" said {helper}. \"Give it water and "
            "sun, and wait.\" So {name} gave the seed a little water every day and waited.",
            "Then {name} remembered what {his} mom had said: \"Good things come to those who wait.\" So "
            "{name} took a deep breath. Every day, {he} gave the seed some water and sang it a little song.",
        ),
        "resolution": (
            "Days went by. Then one morning, {name} saw a tiny green leaf! Soon the leaf grew into a tall "
            "stem, and the stem grew a big, bright flower. \"It was worth the wait!\" said {name}.",
            "One morning, {name} could not believe {his} eyes. A beautiful flower was standing where the "
            "seed had been. {name} clapped {his} hands and danced around it.",
        ),
        "ending": (
            "From that day on, {name} knew how to wait. When {he} wanted something, {he} remembered the "
            "little seed and was patient.",
            "From that day on, {name} took care of the flower every day. {He} learned that good things "
            "were worth waiting for.",
        ),
        "moral": ("Good things come to those who wait.", "Be patient, and good things will grow.",
                  "Patience helps good things grow."),
    },
    {
        "theme": "friendship",
        "prompt": ("makes friends with a lonely {friend_kind}", "learns that everyone needs a friend"),
        "setup": (
            "{day}, a new {friend_kind} named {friend} came to live in {spot}. {friend} did not know "
            "anyone and sat all alone under a tree.",
            "{day}, {name} saw {friend} the {friend_kind} sitting alone in {spot}. {friend} was new and did "
            "not have any friends yet. The other animals were playing, but nobody asked {friend} to play.",
        ),
        "trouble": (
            "{name} wanted to say hello, but {he} felt shy. \"What if {friend} does not like me?\" {he} "
            "thought. {He} almost walked away.",
            "Some of the animals whispered, \"That {friend_kind} looks funny.\" {name} did not know what to "
            "do. {He} wanted to play with {his} old friends too.",
        ),
        "turn": (
            "Then {name} remembered how it felt to be alone. {He} walked over to {friend} and said, \"Hi! I "
            "am {name}. Do you want to play with me?\"",
            "But {name} knew that everyone needed a friend. {He} took a deep breath, walked over, and said, "
            "\"Hello, {friend}! Would you like to {hobby} with me?\"",
        ),
        "resolution": (
            "{friend}'s face lit up. \"Yes, please!\" said {friend}. They played all day and laughed and "
            "laughed. {friend} was funny and kind, and {name} was so glad {he} said hello.",
            "{friend} smiled from ear to ear. Soon the two of them were laughing and playing together. Then "
            "more friends came to join them, and everyone had fun.",
        ),
        "ending": (
            "From that day on, {name} and {friend} were best friends. They played together every day and "
            "shared many happy times.",
            "From that day on, {name} always said hello to anyone who looked lonely. {He} knew that one "
            "kind word could make a new friend.",
        ),
        "moral": ("A friend is someone who makes you feel welcome.", "Everyone needs a friend, so be the "
                  "first to say hello.", "Friendship starts with a kind hello."),
    },
    {
        "theme": "trying again",
        "prompt": ("learns to {skill} by trying again and again", "does not give up when something is hard"),
        "setup": (
            "{day}, {name} wanted to learn to {skill}. {friend} the {friend_kind} could do it, and it "
            "looked like so much fun. \"I want to try too!\" said {name}.",
            "{name} had a big dream. {He} wanted to {skill}. {day}, {he} went outside with {his} friend "
            "{friend} the {friend_kind} to give it a try.",
        ),
        "trouble": (
            "{name} tried to {skill}, but {he} {fail}. {He} tried again, and {he} {fail} again. \"I will "
            "never be able to do it!\" {he} cried.",
            "On the first try, {name} {fail}. On the second try, {he} {fail} again. {name} sat down and "
            "frowned. \"This is too hard. I give up,\" {he} said.",
        ),
        "turn": (
            "{friend} sat down next to {name}. \"I could not do it at first either,\" said {friend}. "
            "\"Everybody learns a little at a time. Try one more time!\"",
            "{helper} was watching. \"Nobody gets it right the first time,\" said {helper}. \"Go slowly, "
            "and keep trying.\" {name} nodded and stood up again.",
        ),
        "resolution": (
            "{name} tried again and again. {He} went slowly and did not give up. And then, at last, {he} "
            "{win}! \"I did it! I did it!\" {he} shouted.",
            "So {name} practiced every day. Some days were hard, but {he} kept going. Then one day, {name} "
            "{win}! {friend} cheered and clapped.",
        ),
        "ending": (
            "From that day on, {name} never gave up. Whenever something was hard, {he} just tried one more time.",
            "From that day on, {name} loved to {skill}. {He} was proud of {himself} for trying again.",
        ),
        "moral": ("If at first you don't succeed, try, try again.", "Never give up, and you will get better.",
                  "Practice helps us learn new things."),
    },
    {
        "theme": "asking for help",
        "prompt": ("learns that it is okay to ask for help", "tries to do everything alone and learns to ask for help"),
        "setup": (
            "{day}, {name} was playing with {his} {item} in {spot}. {He} threw it up high, and it got stuck "
            "in the branches of a tall tree. {name} jumped and jumped, but {he} could not reach it.",
            "{day}, a big gust of wind blew {name}'s {item} onto the roof of an old shed in {spot}. {name} "
            "tried to climb up, but the wall was too tall.",
        ),
        "trouble": (
            "{name} did not want to ask anyone for help. When {friend} the {friend_kind} came by, {name} "
            "said, \"Go away. I can do it all by myself!\" {He} tried and tried until {he} was very tired.",
            "{friend} the {friend_kind} walked by. \"Do you need some help?\" asked {friend}. \"No, I can do "
            "it myself,\" said {name}. But no matter what {he} did, {he} could not get the {item}.",
        ),
        "turn": (
            "At last, {name} sat down with a sigh. {He} looked at {friend}. \"I am sorry. Can you please "
            "help me?\" {he} asked. \"Of course!\" said {friend}.",
            "{name} felt like crying. Then {he} remembered that even big animals needed help sometimes. {He} "
            "went to {friend} and said, \"Will you help me, please?\" {friend} smiled. \"I would love to "
            "help,\" said {friend}.",
        ),
        "resolution": (
            "{friend} ran to get {helper}. {helper} brought a long ladder, and together they got the "
            "{item} down in no time. {name} hugged the {item} and said, \"Thank you so much!\"",
            "{friend} found a long stick, and together they pushed and poked until the {item} fell down. "
            "{name} caught it with a happy shout. \"We did it together!\" said {name}.",
        ),
        "ending": (
            "From that day on, {name} was not afraid to ask for help. {He} knew that friends were happy to "
            "help each other.",
            "From that day on, whenever a job was too big, {name} asked a friend. And when {friend} needed "
            "help, {name} was always there too.",
        ),
        "moral": ("It is okay to ask for help when you need it.", "Friends are happy to help when we ask.",
                  "Asking for help is a smart thing to do."),
    },
)

# Which plan choice each template slot shows (used to count distinct stories honestly).
SLOT_KEYS = {
    **{field: ("hero",) for field in ("name", "he", "He", "him", "his", "His", "himself")},
    "kind": ("kind",), "a_self": ("trait", "kind"), "home": ("home",), "hobby": ("hobby",),
    "day": ("day",), "spot": ("spot",), "friend": ("friend",), "friend_kind": ("friend_kind",),
    "item": ("item",), "a_item": ("item",), "helper": ("helper",), "scary": ("scary",),
    "skill": ("skill",), "fail": ("skill",), "win": ("skill",),
}
CHOICES = {  # plan key -> how many values it can take
    "hero": len(HEROES), "kind": len(KINDS), "trait": len(TRAITS), "home": len(HOMES),
    "hobby": len(HOBBIES), "day": len(DAYS), "spot": len(SPOTS), "friend": len(HEROES) - 1,
    "friend_kind": len(KINDS), "item": len(ITEMS), "helper": len(HELPERS), "scary": len(SCARY),
    "skill": len(SKILLS),
}


def _a(phrase: str) -> str:
    """'a'/'an' + phrase (the tables avoid words like 'hour' and 'unicorn' that break the vowel rule)."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _choose(rng: random.Random) -> dict:
    """Draw one plan: always the same number of draws, so a seed's first k stories never change.

    int(random() * n) instead of randrange(n): 4x faster, and its bias (n / 2**53) is invisible.
    """
    draw = rng.random
    plan = {key: int(draw() * n) for key, n in CHOICES.items()}
    plan["friend"] += plan["friend"] >= plan["hero"]  # any name but the hero's
    plan["theme"] = int(draw() * len(THEMES))
    theme = THEMES[plan["theme"]]
    for part in (*PARTS, "prompt", "moral"):
        plan[part] = int(draw() * len(theme[part]))
    plan["opening"] = int(draw() * len(OPENINGS))
    plan["frame"] = int(draw() * len(PROMPT_FRAMES))
    return plan


def _render(plan: dict) -> dict:
    """Fill the templates of a plan: the prompt, the story text, the moral and the character."""
    name, pronoun = HEROES[plan["hero"]]
    kind, item = KINDS[plan["kind"]], ITEMS[plan["item"]]
    skill, fail, win = SKILLS[plan["skill"]]
    slots = {
        **PRONOUNS[pronoun], "name": name, "kind": kind,
        "a_self": _a(f"{TRAITS[plan['trait']]} little {kind}"), "home": HOMES[plan["home"]],
        "hobby": HOBBIES[plan["hobby"]], "day": DAYS[plan["day"]], "spot": SPOTS[plan["spot"]],
        "friend": HEROES[plan["friend"]][0], "friend_kind": KINDS[plan["friend_kind"]],
        "item": item, "a_item": _a(item), "helper": HELPERS[plan["helper"]],
        "scary": SCARY[plan["scary"]], "skill": skill, "fail": fail, "win": win,
    }
    theme = THEMES[plan["theme"]]
    paragraphs = [OPENINGS[plan["opening"]]] + [theme[part][plan[part]] for part in PARTS]
    slots["what"] = theme["prompt"][plan["prompt"]].format_map(slots)
    return {
        "prompt": PROMPT_FRAMES[plan["frame"]].format_map(slots),
        "text": "\n\n".join(p.format_map(slots) for p in paragraphs),
        "moral": theme["moral"][plan["moral"]],
        "character": f"{name} the {kind}",
    }


def iter_stories(n: int, seed: int = 0) -> Iterator[dict]:
    """Yield `n` stories as dicts with `prompt`, `text`, `moral` and `character`.

    Deterministic: the same (n, seed) always gives the same stories, and the first k stories of
    iter_stories(n, seed) are iter_stories(k, seed).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise StoryseekError(f"builtin corpus: number of stories must be a non-negative integer, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise StoryseekError(f"builtin corpus: seed must be an integer, got {seed!r}")
    rng = random.Random(seed)
    return (_render(_choose(rng)) for _ in range(n))


def _slots(template: str) -> set[str]:
    return {field for _, field, _, _ in string.Formatter().parse(template) if field}


def count_distinct_stories() -> int:
    """How many different story texts the tables can produce.

    For every theme and every combination of paragraph variants, multiply the number of values of
    each plan choice that the chosen paragraphs actually show; choices a story does not show (its
    prompt frame, its moral, a helper it never meets) add nothing.
    """
    total = 0
    for theme, opening in itertools.product(THEMES, OPENINGS):
        for paragraphs in itertools.product(*(theme[part] for part in PARTS)):
            fields = set().union(*map(_slots, (opening, *paragraphs)))
            keys = {key for field in fields for key in SLOT_KEYS[field]}
            total += math.prod(CHOICES[key] for key in keys)
    return total
