from tome_export.cli import entry

entry()
