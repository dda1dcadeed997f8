"""One module per command group; `rmib.cli` registers them."""
