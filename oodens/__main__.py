from oodens.cli import entry

entry()
