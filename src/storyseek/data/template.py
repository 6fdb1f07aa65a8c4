"""Record -> training document: the one place that knows the document template.

A story record becomes one document (the parts in brackets appear only when the record has them)::

    <|prompt|>Write a story about a brave mouse.[<|character|>Pip]<|story|>Once upon a time...[<|moral|>Be brave.]<|endoftext|>

Special tokens, not newlines or words, delimit the parts, so the tokenizer keeps every boundary
exact and generation can be prompted with exactly the prefix training saw (`story_prompt`) and stop
at `<|endoftext|>`. The moral comes after the story because it is drawn from it.
Text mode (`--format text`, e.g. FineWeb-edu) is just ``text<|endoftext|>``.

Normalisation keeps case (unless asked to lowercase), keeps paragraph breaks and verse lines
(single newlines), and collapses every other run of whitespace to one space. Literal special-token
strings inside the data (TinyStories contains `<|endoftext|>`) are removed, so a document's only
special tokens are the template's own.
"""

from __future__ import annotations

import re

PROMPT = "<|prompt|>"
CHARACTER = "<|character|>"
STORY = "<|story|>"
MORAL = "<|moral|>"
# GPT-2's own end-of-text string: with the GPT-2 tokenizer it is id 50256, the id Hugging Face
# tools already treat as eos for GPT-2 vocabularies.
END = "<|endoftext|>"
SPECIAL_TOKENS = (END, PROMPT, CHARACTER, STORY, MORAL)
SPECIAL_PATTERN = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")  # re.split keeps them

def _strip_specials(s: str) -> str:
    if "<|" in s:
        for tok in SPECIAL_TOKENS:
            s = s.replace(tok, "")
    return s


def normalize_text(s: str, lowercase: bool = False) -> str:
    """Body text: keep single newlines and one blank line between paragraphs, one space elsewhere."""
    lines: list[str] = []
    blank = False
    for line in _strip_specials(s).replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        # Most lines are already clean; the checks are C-speed scans, splitting allocates per word.
        # isprintable() is False for every whitespace character except the plain space.
        if "  " in line or not line.isprintable() or line[:1] == " " or line[-1:] == " ":
            line = " ".join(line.split())
        if not line:
            blank = True
            continue
        if blank and lines:
            lines.append("")
        lines.append(line)
        blank = False
    s = "\n".join(lines)
    return s.lower() if lowercase else s


def normalize_line(s: str, lowercase: bool = False) -> str:
    """A one-line field (prompt, character, moral): all whitespace runs become one space."""
    s = " ".join(_strip_specials(s).split())
    return s.lower() if lowercase else s


def story_prompt(prompt: str, character: str | None = None, lowercase: bool = False) -> str:
    """The document prefix generation feeds the model; it continues with the story."""
    head = PROMPT + normalize_line(prompt, lowercase)
    if character and (character := normalize_line(character, lowercase)):
        head += CHARACTER + character
    return head + STORY


def story_document(
    prompt: str, text: str, moral: str | None = None, character: str | None = None, lowercase: bool = False
) -> str:
    """A full training document; `text` must already be normalised (see `normalize_text`)."""
    doc = story_prompt(prompt, character, lowercase) + text
    if moral and (moral := normalize_line(moral, lowercase)):
        doc += MORAL + moral
    return doc + END


def text_document(text: str) -> str:
    """A text-mode document; `text` must already be normalised."""
    return text + END


def parse_document(doc: str) -> dict[str, str]:
    """Split a (possibly generated) document back into its parts: prompt, character, story, moral.

    Parts that are absent are left out; text after the end token is ignored.
    """
    doc = doc.split(END, 1)[0]
    if not doc.startswith(PROMPT):
        return {"story": doc.strip()}
    parts: dict[str, str] = {}
    pieces = SPECIAL_PATTERN.split(doc)
    names = {PROMPT: "prompt", CHARACTER: "character", STORY: "story", MORAL: "moral"}
    for tag, value in zip(pieces[1::2], pieces[2::2]):
        parts.setdefault(names[tag], value.strip())
    return parts
