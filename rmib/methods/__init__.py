"""One folder per published method; `rmib.tasks.METHODS` is the table of them all."""
