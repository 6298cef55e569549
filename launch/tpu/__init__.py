"""Cloud TPU pod scripts: create a slice, install the project on every worker, run the launcher, tear down."""
