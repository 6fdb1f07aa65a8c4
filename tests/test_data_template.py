"""The document template: normalisation, story/text documents, prompts, parsing back."""

from storyseek.data.template import (
    CHARACTER,
    END,
    MORAL,
    PROMPT,
    STORY,
    normalize_line,
    normalize_text,
    parse_document,
    story_document,
    story_prompt,
    text_document,
)


def test_normalize_text_keeps_paragraphs_and_verse_lines():
    raw = "  Once upon\ta  time.  \r\n  The end\u00a0 came. \n\n\n\nNew   para\nverse line\n\n"
    assert normalize_text(raw) == "Once upon a time.\nThe end came.\n\nNew para\nverse line"


def test_normalize_keeps_case_unless_lowercase():
    assert normalize_text("Lily RAN") == "Lily RAN"
    assert normalize_text("Lily RAN", lowercase=True) == "lily ran"
    assert normalize_line(" A \n Title ", lowercase=True) == "a title"


def test_literal_special_strings_are_removed_from_data():
    assert normalize_text("The end.<|endoftext|> Next") == "The end. Next"
    assert normalize_line("<|story|>Hi") == "Hi"


def test_story_document_layout_and_prompt_prefix():
    doc = story_document("Write a story.", "Once there was a fox.", moral=" Be kind. ", character="Fox")
    assert doc == f"{PROMPT}Write a story.{CHARACTER}Fox{STORY}Once there was a fox.{MORAL}Be kind.{END}"
    assert doc.startswith(story_prompt("Write a story.", "Fox"))
    bare = story_document("Write a story.", "Text here.")
    assert bare == f"{PROMPT}Write a story.{STORY}Text here.{END}"
    assert bare.startswith(story_prompt("Write  a story.\n"))
    assert text_document("plain") == f"plain{END}"


def test_parse_document_inverts_the_template():
    doc = story_document("P", "S1\n\nS2", moral="M", character="C")
    assert parse_document(doc + "junk after end") == {"prompt": "P", "character": "C", "story": "S1\n\nS2", "moral": "M"}
    assert parse_document(story_prompt("P") + "a generated story") == {"prompt": "P", "story": "a generated story"}
