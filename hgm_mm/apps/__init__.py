"""What people run: the `hgm-mm` command line, the demo, and the JSON service with its request checks."""
