from pgpcl.cli import entry

entry()
