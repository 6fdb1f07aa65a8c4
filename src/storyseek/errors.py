"""The one exception type a user should ever see: the CLI prints its message as a single line."""


class StoryseekError(Exception):
    """A problem with the user's input or environment, explained in one line."""
