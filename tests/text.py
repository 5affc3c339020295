"""Reading the report as text: its header lines are wrapped at run/report.WIDTH, where the
numbers and paths in them fall (the swap directory's name varies run to run), so a
phrase is looked for in the text with its whitespace runs made one space."""


def flat(text) -> str:
    """`text` (or `str()` of a report) with every run of whitespace one space."""
    return " ".join(str(text).split())
