"""Command help that reads as text. The parsers show module docstrings, which are written in reST (``code``,
:func:`name`); a terminal and the docs' CLI page would print that markup literally."""
import argparse
import re

LITERAL = re.compile(r'``([^`]+)``')
ROLE = re.compile(r':\w+:`~?([^`]+)`')


def plain(text):
    """reST inline markup dropped: ``x`` and :role:`x` read as x."""
    return ROLE.sub(r'\1', LITERAL.sub(r'\1', text)) if text else text


class PlainHelp(argparse.RawDescriptionHelpFormatter):
    """The description keeps its line breaks (as RawDescriptionHelpFormatter) and loses its reST markup."""

    def _format_text(self, text):
        return super()._format_text(plain(text))

    def _expand_help(self, action):
        return plain(super()._expand_help(action))
