"""The CLI's larger command groups, one module per capability (registered on `difflab.cli.main`)."""
