"""Errors meant for people: the CLI prints the message on one line and exits with code 2."""


class DifflabError(Exception):
    """A problem with the user's input (a name, a file, a folder); the message says what to do."""
