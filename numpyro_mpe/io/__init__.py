"""ArviZ export, plots, the HTML report, the command line and the bundled data."""
